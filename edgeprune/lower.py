"""Lower a model through TVM Relax into C kernels plus the call list the AOT emitter needs.

ONNX → `relax.frontend.onnx.from_onnx` → legalize/fuse → one `call_tir` per fused kernel.
The kernels are built by TVM's `c` target (packed calling convention, asserts stripped); the
graph around them (order, tensors, weights) is returned as plain data for `plan` and `emit`.
"""

import re
from dataclasses import dataclass, field

import numpy as np

from .errors import EdgepruneError
from .kernels.int8 import OVERWRITES_INPUT

# Bytes the runtime shim rounds every workspace request up to (see codegen/edgeprune_runtime.c).
WORKSPACE_ALIGN = 16


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass
class KernelCall:
    kernel: str                 # fused PrimFunc name, e.g. fused_conv2d_add_relu
    args: list[str]             # tensor names in the kernel's parameter order; the last is the output
    workspace_bytes: int = 0    # scratch the kernel asks TVMBackendAllocWorkspace for (peak)
    macs: int | None = None     # multiply-accumulates of its conv/matmul (None: not one)
    elementwise: tuple[int, ...] = ()  # inputs read only for the output element at their index
    overwrites: bool = False    # reads its whole first input before writing over it (an int8 conv)

    @property
    def output(self) -> str:
        return self.args[-1]

    @property
    def inputs(self) -> list[str]:
        return self.args[:-1]


@dataclass
class LoweredModel:
    prefix: str
    kernels_c: str                          # one C file with every kernel
    tensors: dict[str, TensorInfo]          # every activation, input, output and view
    consts: dict[str, np.ndarray]           # weights, by tensor name
    calls: list[KernelCall]
    inputs: list[str]
    outputs: list[str]
    views: dict[str, str] = field(default_factory=dict)  # view -> the tensor it aliases
    view_offsets: dict[str, int] = field(default_factory=dict)  # view -> bytes into that tensor

    def base(self, name: str) -> str:
        while name in self.views:
            name = self.views[name]
        return name

    def offset(self, name: str) -> int:
        """Where `name` starts in its base tensor, in bytes (a contiguous slice's view)."""
        total = 0
        while name in self.views:
            total += self.view_offsets.get(name, 0)
            name = self.views[name]
        return total

    @property
    def weights_bytes(self) -> int:
        return sum(int(c.nbytes) for c in self.consts.values())


_registered = False


def _register_c_intrinsics() -> None:
    """`tirx.fabs` has no `c` lowering in TVM 0.27 (Abs, softplus, mish fail); map it to fabsf."""
    global _registered
    if _registered:
        return
    import tvm

    def fabs(op):
        name = "fabsf" if op.dtype == "float32" else "fabs"
        return tvm.tirx.call_pure_extern(op.dtype, name, *op.args)

    tvm.tirx.register_intrin_lowering("tirx.fabs", target="c", f=fabs, level=99)
    _registered = True


def import_onnx(model, origin: str = "model"):
    import tvm  # noqa: F401  (heavy import, deferred until lowering is needed)
    from tvm.relax.frontend.onnx import from_onnx

    for node in model.graph.node:   # what the frontend takes wrongly: named, not a crash
        size = next((a.i for a in node.attribute if a.name == "size"), 1)
        if node.op_type == "LRN" and size % 2 == 0:
            raise EdgepruneError(f"{origin}: ONNX node '{node.name}' (LRN) has an even size "
                                 f"{size}; TVM's ONNX frontend takes odd sizes only in float "
                                 "(quantize the model: the int8 stages take any size)")
    try:
        return from_onnx(model, keep_params_in_input=False)
    except Exception as e:
        raise EdgepruneError(f"{origin}: TVM's ONNX frontend failed: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}")


def fuse(mod):
    """The CPU backend's legalize and fusion passes, plus: reshapes and contiguous slices as
    views, table lookups fused with their index arithmetic, and each fused kernel's
    elementwise inputs marked for the memory plan (`KernelCall.elementwise`)."""
    import tvm
    from tvm import relax

    legalize = tvm.transform.Sequential([
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
    ])
    group = tvm.transform.Sequential([relax.transform.FoldConstant(), relax.transform.FuseOps()])
    merge = tvm.transform.Sequential([
        relax.transform.FuseTIR(),
        relax.transform.RewriteDataflowReshape(),
        relax.transform.DeadCodeElimination(),
    ])
    with tvm.target.Target("c"):
        mod = group(_fusable_gathers(_unfused_copying_pads(legalize(_slices_as_views(mod)))))
        elementwise = _elementwise_inputs(mod)
        mod = merge(mod)
    for gv, f in list(mod.functions.items()):
        if gv.name_hint in elementwise and isinstance(f, tvm.tirx.PrimFunc):
            mod[gv] = f.with_attr("edgeprune.elementwise", elementwise[gv.name_hint])
    return mod


def _elementwise_inputs(mod) -> dict[str, list[int]]:
    """Per fused function (FuseOps' groups, before FuseTIR): the positions of the inputs it reads
    only to compute the output element at the same index (elementwise and broadcasting ops, a
    table lookup indexed by them). The memory plan may put the output over such an input."""
    from tvm import relax

    pattern = _op_patterns(mod)
    found = {}
    for gv, f in mod.functions.items():
        if not (isinstance(f, relax.Function) and f.attrs and "Primitive" in f.attrs
                and isinstance(f.body, relax.SeqExpr)):
            continue
        bindings = [b for block in f.body.blocks for b in block.bindings]
        keep = []
        for i, p in enumerate(f.params):
            reach = {p}
            for b in bindings:
                v = b.value
                if not any(isinstance(a, relax.Var) and a in reach for a in _call_args(v)):
                    continue
                kernel = v.args[0].name_hint if _is_call_tir(v) else ""
                args = list(v.args[1].fields) if _is_call_tir(v) else []
                lookup = re.fullmatch(r"take\d*", kernel) and args[0] not in reach
                if pattern.get(kernel, 9) <= 1 or lookup:   # kElemWise, kBroadcast
                    reach.add(b.var)
                else:
                    break
            else:
                if f.body.body in reach:
                    keep.append(i)
        if keep:
            found[gv.name_hint] = keep
    return found


def _op_patterns(mod) -> dict[str, int]:
    """Each PrimFunc's TVM op pattern (0 elementwise, 1 broadcast, 2 injective, ... 8 opaque)."""
    import tvm
    return {gv.name_hint: int(f.attrs["op_pattern"]) for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "op_pattern" in f.attrs}


def _is_call_tir(v) -> bool:
    return getattr(getattr(v, "op", None), "name", None) == "relax.call_tir"


def _call_args(v) -> list:
    """What a binding's value reads (a call's arguments, a tuple's fields, ...)."""
    from tvm import relax
    if _is_call_tir(v):
        return list(v.args[1].fields)
    if isinstance(v, relax.Call):
        return list(v.args)
    if isinstance(v, relax.Tuple):
        return list(v.fields)
    if isinstance(v, relax.TupleGetItem):
        return [v.tuple_value]
    return [v]


def _unfused_copying_pads(mod):
    """Pads that copy values (reflect, replicate, circular) run as kernels of their own: fused
    with the index arithmetic of a reshape-transpose (a channel shuffle before a reflecting
    conv), TVM 0.27's simplifier took minutes to build one kernel."""
    import tvm
    for gv, f in list(mod.functions.items()):
        if isinstance(f, tvm.tirx.PrimFunc) and re.fullmatch(
                r"(reflect|replicate|circular)_pad\d*", gv.name_hint):
            mod[gv] = f.with_attr("op_pattern", 8)      # kOpaque: FuseOps leaves it alone
    return mod


def _slice_index(call) -> tuple[list[int], list[slice]] | None:
    """(input shape, one Python slice per axis) of a `strided_slice` with static bounds and
    positive strides, else None."""
    from tvm import relax
    x = call.args[0]
    if not isinstance(x, relax.Var):
        return None
    try:
        shape = [int(d) for d in x.ty.shape.values]
        axes, begin, end = ([int(v.value) for v in t] for t in call.args[1:4])
        strides = [int(v.value) for v in call.args[4]] if len(call.args) > 4 else [1] * len(axes)
    except (AttributeError, TypeError, ValueError):
        return None  # a symbolic shape or bounds
    if min(strides, default=1) < 1:
        return None
    index = [slice(None)] * len(shape)
    for a, b, e, st in zip(axes, begin, end, strides):
        index[a % len(shape)] = slice(b, e, st)
    return shape, index


def _contiguous_slice(call) -> tuple[tuple[int, ...], int] | None:
    """(shape, element offset) of a `strided_slice` whose elements lie in one contiguous run of
    its input (a time step of (1, T, C), a channel range at batch 1), else None."""
    parsed = _slice_index(call)
    if parsed is None or np.prod(parsed[0]) > 1 << 24:
        return None
    shape, index = parsed
    picked = np.arange(int(np.prod(shape))).reshape(shape)[tuple(index)]
    flat = picked.reshape(-1)
    if flat.size == 0 or not np.array_equal(flat, np.arange(flat[0], flat[0] + flat.size)):
        return None
    return picked.shape, int(flat[0])


def _slice_of_concat(call, defs: dict):
    """A slice of a concatenation that lies within one of its pieces, as a slice of that piece
    (a recurrent layer's last step out of its whole output sequence), else None."""
    from tvm import relax
    parsed = _slice_index(call)
    src = defs.get(call.args[0])
    if parsed is None or getattr(getattr(src, "op", None), "name", None) != "relax.concat":
        return None
    pieces = src.args[0]
    pieces = defs.get(pieces, pieces) if isinstance(pieces, relax.Var) else pieces
    if not isinstance(pieces, relax.Tuple):
        return None
    shape, index = parsed
    axis = int(src.attrs.axis) % len(shape)
    lo, hi, step = index[axis].indices(shape[axis])
    start = 0
    for piece in pieces.fields:
        size = int(piece.ty.shape.values[axis])
        if start <= lo and max(lo, hi - 1) < start + size and step > 0:
            axes = list(range(len(shape)))
            bounds = [sl.indices(n) for sl, n in zip(index, shape)]
            begin = [b for b, _, _ in bounds]
            end = [e for _, e, _ in bounds]
            begin[axis], end[axis] = lo - start, min(hi, start + size) - start
            return relax.op.strided_slice(piece, axes, begin, end, [st for *_, st in bounds])
        start += size
    return None


def _slice_before_reshape(call, defs: dict):
    """slice(reshape(c)) as slice(c), to be reshaped to the slice's shape, when the reshape
    only adds or drops unit axes and c is a concatenation (a recurrent layer's output
    sequence, lifted to 2-D), else None."""
    from tvm import relax
    parsed = _slice_index(call)
    src = defs.get(call.args[0])
    if parsed is None or getattr(getattr(src, "op", None), "name", None) != "relax.reshape":
        return None
    c = src.args[0]
    if getattr(getattr(defs.get(c), "op", None), "name", None) != "relax.concat":
        return None
    shape, index = parsed
    before = [int(d) for d in c.ty.shape.values]
    if [d for d in before if d != 1] != [d for d in shape if d != 1]:
        return None
    kept = [sl for sl, d in zip(index, shape) if d != 1]
    if any(len(range(*sl.indices(1))) != 1 for sl, d in zip(index, shape) if d == 1):
        return None
    bounds = [kept.pop(0).indices(d) if d != 1 else (0, 1, 1) for d in before]
    inner = relax.op.strided_slice(c, list(range(len(before))), [b for b, _, _ in bounds],
                                   [e for _, e, _ in bounds], [st for *_, st in bounds])
    return inner


def _as_view(call):
    """A contiguous `strided_slice` as a view at its offset; any other call unchanged."""
    import tvm
    from tvm import relax
    view = _contiguous_slice(call)
    if view is None:
        return call
    shape, start = view
    offset = start * np.dtype(str(call.args[0].ty.dtype)).itemsize
    return relax.op.memory.view(call.args[0], relax.ShapeExpr(list(shape)),
                                relative_byte_offset=relax.prim_value(
                                    tvm.tirx.IntImm("int64", offset)))


def _slices_as_views(mod):
    """Contiguous slices become views at an offset of their input: no kernel, no copy. An
    unrolled recurrent layer's time steps were a kernel each. A slice within one piece of a
    concatenation reads that piece (the concatenation may then go unused)."""
    import tvm
    from tvm import relax

    func = mod["main"]
    if not isinstance(func.body, relax.SeqExpr):
        return mod
    defs = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    blocks, changed = [], False
    for block in func.body.blocks:
        bindings = []
        for b in block.bindings:
            v = b.value
            if isinstance(v, relax.Call) and getattr(v.op, "name", None) == "relax.strided_slice":
                piece = _slice_of_concat(v, defs)
                if piece is not None:
                    v = _as_view(piece)
                else:
                    swapped = _slice_before_reshape(v, defs)
                    piece = None if swapped is None else _slice_of_concat(swapped, defs)
                    if piece is not None:
                        shape = [int(d) for d in b.var.ty.shape.values]
                        v = relax.op.reshape(_as_view(piece), shape)
                    else:
                        v = _as_view(v)
                if v is not b.value:
                    b, changed = relax.VarBinding(b.var, v), True
            bindings.append(b)
        blocks.append(type(block)(bindings))
    if not changed:
        return mod
    mod = tvm.IRModule(dict(mod.functions.items()), attrs=mod.attrs)
    mod["main"] = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body),
                                 func.ret_ty, func.is_pure, func.attrs)
    return relax.transform.Normalize()(mod)


def _fusable_gathers(mod):
    """A `take` (a table activation's lookup, a gather of rows) is injective: each output
    element reads one element of the table. TVM marks it opaque, so the int32 index a lookup
    computes was a kernel and a tensor of its own, four times the size of the int8 activation
    it indexes, and the arena's peak wherever an activation was largest. A take read by a
    broadcast (an attention gate of (N, C, 1, 1) times the maps) stays a kernel: fused, it
    would look up every gate once per pixel."""
    import tvm
    from tvm import relax

    pattern = _op_patterns(mod)
    size, readers, kernel = {}, {}, {}
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            if _is_call_tir(b.value):
                size[b.var] = int(np.prod([int(d) for d in b.var.ty.shape.values]))
                kernel[b.var] = b.value.args[0].name_hint
                for a in b.value.args[1].fields:
                    if isinstance(a, relax.Var):
                        readers.setdefault(a, []).append(b.var)

    def spreads(v) -> bool:
        """Does v reach, through ops FuseOps would fuse, an op that reads its elements more
        than once (a broadcast, a repeat; a pad or a concat reads each once)?"""
        todo, seen = [v], set()
        while todo:
            x = todo.pop()
            for r in readers.get(x, ()):
                if r not in seen and pattern.get(kernel[r], 9) <= 2:
                    if size[r] > size[x] and not re.fullmatch(r"(pad|concatenate)\d*",
                                                               kernel[r]):
                        return True
                    seen.add(r)
                    todo.append(r)
        return False

    spread = {kernel[v] for v in kernel if re.fullmatch(r"take\d*", kernel[v]) and spreads(v)}
    for gv, f in list(mod.functions.items()):
        if (isinstance(f, tvm.tirx.PrimFunc) and re.fullmatch(r"take\d*", gv.name_hint)
                and gv.name_hint not in spread):
            mod[gv] = f.with_attr("op_pattern", 2)      # kInjective
    return mod


def _tensor_type(ty, what: str) -> tuple[tuple[int, ...], str]:
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        raise EdgepruneError(f"{what}: its type {ty} is not a tensor with a static shape")
    dims = []
    for d in shape.values:
        if not hasattr(d, "value"):
            raise EdgepruneError(f"{what}: dimension '{d}' is not static; pass --input-shape")
        dims.append(int(d.value))
    return tuple(dims), str(ty.dtype)


def collect_calls(mod, prefix: str) -> LoweredModel:
    """Walk the fused `main` and record tensors, weights and kernel calls in execution order."""
    import tvm
    from tvm import relax

    main = mod["main"]
    tensors: dict[str, TensorInfo] = {}
    consts: dict[str, np.ndarray] = {}
    const_names: list[tuple[object, str]] = []
    names: dict[object, str] = {}
    calls: list[KernelCall] = []
    views: dict[str, str] = {}
    view_offsets: dict[str, int] = {}

    def name_of(var) -> str:
        for v, n in names.items():
            if v.same_as(var):
                return n
        raise EdgepruneError(f"internal: variable {var} used before it is defined")

    by_content: dict[tuple, str] = {}

    def const_name(c) -> str:
        for obj, n in const_names:
            if obj.same_as(c):
                return n
        value = c.value.numpy()
        # equal constants are stored once (a recurrent layer's weights at every step)
        key = (str(value.dtype), value.shape, value.tobytes())
        if key in by_content:
            const_names.append((c, by_content[key]))
            return by_content[key]
        n = unique(f"w{len(consts)}")   # not a name a tensor before it took (a layer "w21")
        const_names.append((c, n))
        consts[n], by_content[key] = value, n
        tensors[n] = TensorInfo(n, tuple(value.shape), str(value.dtype))
        return n

    def unique(name: str) -> str:
        base, k = re.sub(r"\W", "_", name) or "t", 0
        name = base
        while name in tensors:
            k += 1
            name = f"{base}_{k}"
        return name

    tuples: dict = {}   # a tuple binding -> its fields
    inputs = []
    for p in main.params:
        n = unique(p.name)
        names[p] = n
        shape, dtype = _tensor_type(p.ty, f"input '{p.name}'")
        tensors[n] = TensorInfo(n, shape, dtype)
        inputs.append(n)

    for block in main.body.blocks:
        for binding in block.bindings:
            value, var = binding.value, binding.var
            if isinstance(value, relax.Var):
                names[var] = name_of(value)
                continue
            if isinstance(value, relax.Tuple):     # the model's outputs, when it has several
                tuples[var] = list(value.fields)
                continue
            op = getattr(value, "op", None)
            op_name = getattr(op, "name", None)
            if op_name == "relax.call_tir":
                kernel = value.args[0].name_hint
                args = []
                for a in value.args[1].fields:
                    if isinstance(a, relax.Var):
                        args.append(name_of(a))
                    elif isinstance(a, tvm.ir.GenericConst) or type(a).__name__.endswith("Const"):
                        args.append(const_name(a))
                    else:
                        raise EdgepruneError(f"kernel {kernel}: argument {a} of kind "
                                             f"{type(a).__name__} is not supported")
                out = unique(var.name)   # after its weights took theirs (a layer named "w0")
                shape, dtype = _tensor_type(value.ty_args[0], f"output of kernel {kernel}")
                tensors[out] = TensorInfo(out, shape, dtype)
                names[var] = out
                attrs = mod[kernel].attrs or {}
                calls.append(KernelCall(kernel, args + [out], elementwise=tuple(
                    int(i) for i in attrs.get("edgeprune.elementwise", ())),
                    overwrites=bool(attrs.get(OVERWRITES_INPUT, 0))))
            elif op_name == "relax.reshape":
                src, out = name_of(value.args[0]), unique(var.name)
                shape, dtype = _tensor_type(var.ty, f"reshape {var.name}")
                tensors[out] = TensorInfo(out, shape, dtype)
                names[var] = out
                views[out] = src
            elif op_name == "relax.memory.view":   # a contiguous slice (_slices_as_views)
                src, out = name_of(value.args[0]), unique(var.name)
                shape, dtype = _tensor_type(var.ty, f"slice {var.name}")
                tensors[out] = TensorInfo(out, shape, dtype)
                names[var] = out
                views[out], view_offsets[out] = src, int(value.args[3].value)
            elif op_name == "relax.null_value":    # the view's "same dtype"
                continue
            else:
                raise EdgepruneError(f"op '{op_name or op}' (binding {var.name}) was not lowered "
                                     "to a TIR kernel; the C target does not support it")

    body = main.body.body
    outs = list(body.fields) if isinstance(body, relax.Tuple) else tuples.get(body, [body])
    outputs = []
    for o in outs:
        if not isinstance(o, relax.Var):
            raise EdgepruneError(f"model output {o} is not a tensor computed by a kernel")
        outputs.append(name_of(o))
    return LoweredModel(prefix, "", tensors, consts, calls, inputs, outputs, views, view_offsets)


def _concat_axis(out: TensorInfo, pieces: list[TensorInfo]) -> int | None:
    for a in range(len(out.shape)):
        if (all(p.shape[:a] + p.shape[a + 1:] == out.shape[:a] + out.shape[a + 1:]
                for p in pieces) and sum(p.shape[a] for p in pieces) == out.shape[a]):
            return a
    return None


def _concats_as_views(lowered: LoweredModel) -> None:
    """A concatenation whose pieces lie one after another in its output (channels at batch 1,
    time steps) runs no kernel: each piece's producer writes into its place in the output.
    Later concatenations first, so that one nested in another (DenseNet) chains its views."""
    external = set(lowered.inputs) | set(lowered.outputs) | set(lowered.consts)
    produced = {c.output for c in lowered.calls}
    for call in reversed(list(lowered.calls)):
        if not re.fullmatch(r"concatenate\d*", call.kernel) or call.output in external:
            continue
        out, pieces = lowered.tensors[call.output], call.inputs
        infos = [lowered.tensors[n] for n in pieces]
        axis = _concat_axis(out, infos)
        if (axis is None or int(np.prod(out.shape[:axis])) != 1 or len(set(pieces)) < len(pieces)
                or any(n not in produced or n in external or n in lowered.views
                       or i.dtype != out.dtype for n, i in zip(pieces, infos))):
            continue
        at = 0
        for n, info in zip(pieces, infos):
            lowered.views[n], lowered.view_offsets[n] = call.output, at
            at += info.nbytes
        lowered.calls.remove(call)


def build_kernels(mod, prefix: str) -> str:
    """C source of every PrimFunc, exported as `__tvm_ffi_<prefix>_<name>`, asserts stripped."""
    import tvm

    _register_c_intrinsics()
    funcs = {}
    for gv, f in mod.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc):
            funcs[tvm.ir.GlobalVar(gv.name_hint)] = f.with_attr("global_symbol", f"{prefix}_{gv.name_hint}")
    if not funcs:
        raise EdgepruneError("the model has no computation to lower (no kernels)")
    tir_mod = tvm.IRModule(funcs)
    try:
        with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
            lib = tvm.tirx.build(tir_mod, target="c")
    except Exception as e:
        raise EdgepruneError(f"TVM C code generation failed: {str(e).strip().splitlines()[-1]}")
    src = lib.inspect_source()
    from .kernels import with_prelude
    src = with_prelude(src)  # helpers the hand-scheduled int8 kernels call, if any
    # Every generated file defines this symbol; give it a per-model name so models can be linked together.
    return src.replace("__tvm_ffi__library_ctx", f"{prefix}_tvm_library_ctx")


_FUNC_RE = re.compile(r"^TVM_DLL int32_t __tvm_ffi_(\w+)\(void\* self_handle[^)]*\) \{", re.M)
_ALLOC_RE = re.compile(r"TVMBackendAllocWorkspace\(1, dev_id, \(uint64_t\)(\d+)ULL")


def workspace_per_kernel(src: str, prefix: str) -> dict[str, int]:
    """Peak scratch bytes per kernel: the sum of its (LIFO-nested) workspace requests, aligned."""
    starts = [(m.start(), m.group(1)) for m in _FUNC_RE.finditer(src)]
    sizes = {}
    for i, (pos, sym) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(src)
        reqs = [int(n) for n in _ALLOC_RE.findall(src, pos, end)]
        sizes[sym.removeprefix(prefix + "_")] = sum(-(-r // WORKSPACE_ALIGN) * WORKSPACE_ALIGN for r in reqs)
    return sizes


def schedule_kernels(mod):
    """Apply the small-RAM schedule to every kernel (see schedule.py)."""
    import tvm

    from .schedule import schedule_for_small_ram

    for gv, f in list(mod.functions.items()):
        if isinstance(f, tvm.tirx.PrimFunc) and "edgeprune.kernel" not in (f.attrs or {}):
            mod[gv] = schedule_for_small_ram(f)
    return mod


MAC_OPS = ("relax.nn.conv1d", "relax.nn.conv2d", "relax.nn.conv3d", "relax.matmul")
MAC_KERNEL = re.compile(r"conv|matmul|dense|depthwise")  # names of kernels that hold one


def mac_ops(mod) -> list[tuple[tuple[int, ...], int]]:
    """(output shape, MACs) of every conv/matmul in `main`, in order, before fusion renames them."""
    found = []
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            name = getattr(getattr(b.value, "op", None), "name", None)
            args = b.value.args if name in MAC_OPS else None
            if name == "relax.call_tir" and _kernel_of(mod, b.value.args[0]) == "matmul":
                name, args = "relax.matmul", b.value.args[1].fields   # kernels.matmul_kernel
            if args is None:
                continue
            out, _ = _tensor_type(b.var.ty, f"{name} {b.var.name}")
            a, _ = _tensor_type(args[0].ty, f"input of {b.var.name}")
            w, _ = _tensor_type(args[1].ty, f"weight of {b.var.name}")
            if name == "relax.matmul":
                per_output = a[-1]
            else:  # weight elements per output channel = (in channels / groups) x window
                per_output = int(np.prod(w)) // w[str(b.value.attrs.kernel_layout).index("O")]
            found.append((out, int(np.prod(out)) * per_output))
    return found


def _kernel_of(mod, gv) -> str | None:
    """The edgeprune.kernel attribute of the PrimFunc a call_tir calls, if any."""
    try:
        attrs = mod[gv].attrs or {}
    except (KeyError, TypeError, ValueError):
        return None
    return str(attrs["edgeprune.kernel"]) if "edgeprune.kernel" in attrs else None


def assign_macs(calls: list[KernelCall], tensors: dict, ops: list[tuple[tuple[int, ...], int]]) -> None:
    """Give each conv/matmul kernel its op's MACs. Fusion keeps their order; if the kernels and
    ops do not pair up one to one with equal output shapes, no kernel gets a (possibly wrong) count."""
    kernels = [c for c in calls if MAC_KERNEL.search(c.kernel)]
    if len(kernels) != len(ops) or any(tensors[c.output].shape != shape
                                       for c, (shape, _) in zip(kernels, ops)):
        return
    for c, (_, macs) in zip(kernels, ops):
        c.macs = macs


def lower_relax(mod, prefix: str = "model", features=()) -> LoweredModel:
    """Lower a Relax IRModule (from ONNX or built by the quantizer) to kernels + call list.
    `features`: the target's [chip] features (they pick e.g. the Helium int8 kernels)."""
    if not re.fullmatch(r"[A-Za-z_]\w*", prefix):
        raise EdgepruneError(f"prefix '{prefix}' is not a C identifier")
    from .kernels import specialize_int8
    ops = mac_ops(mod)
    mod = specialize_int8(mod, features=features)  # quantized conv/dense chains -> hand-scheduled int8 kernels
    mod = fuse(mod)
    mod = schedule_kernels(mod)
    lowered = collect_calls(mod, prefix)
    assign_macs(lowered.calls, lowered.tensors, ops)
    _concats_as_views(lowered)
    lowered.kernels_c = build_kernels(mod, prefix)
    ws = workspace_per_kernel(lowered.kernels_c, prefix)
    for call in lowered.calls:
        call.workspace_bytes = ws.get(call.kernel, 0)
    return lowered


def lower_onnx(model, prefix: str = "model", origin: str = "model") -> LoweredModel:
    return lower_relax(import_onnx(model, origin), prefix)
