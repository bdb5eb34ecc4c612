"""The memory planner: arena equals the lower bound on chains, never exceeds the naive sum."""

import random

import numpy as np
import pytest
import torch

from edgeprune.plan import Buffer, lower_bound, plan_buffers


def _check_valid(plan):
    by_name = {b.name: b for b in plan.buffers}
    for a in plan.buffers:
        for b in plan.buffers:
            if a.name < b.name and a.overlaps(b):
                oa, ob = plan.offsets[a.name], plan.offsets[b.name]
                assert oa + a.size <= ob or ob + b.size <= oa, (a, b)
    assert plan.arena_bytes >= plan.lower_bound_bytes
    assert set(plan.offsets) == set(by_name)


def _chain(rng, n, workspace):
    bufs = [Buffer(f"t{i}", 16 * rng.randint(1, 64), i, i + 1) for i in range(n)]
    if workspace:
        bufs += [Buffer(f"w{i}", 16 * rng.randint(0, 64), i, i) for i in range(1, n + 1)]
    return [b for b in bufs if b.size]


def test_arena_equals_lower_bound_on_chains():
    rng = random.Random(0)
    for trial in range(300):
        bufs = _chain(rng, rng.randint(1, 12), workspace=trial % 2 == 1)
        plan = plan_buffers(bufs)
        _check_valid(plan)
        assert plan.arena_bytes == lower_bound(bufs), bufs


def test_residual_graph_arena_at_most_sum_of_tensors():
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(2, 14)
        bufs = []
        for i in range(n):
            # a tensor is read by the next call and, sometimes, by a residual add further on
            end = i + 1 + (rng.randint(1, 3) if rng.random() < 0.4 else 0)
            bufs.append(Buffer(f"t{i}", 16 * rng.randint(1, 64), i, end))
        plan = plan_buffers(bufs)
        _check_valid(plan)
        assert plan.lower_bound_bytes <= plan.arena_bytes <= sum(b.size for b in bufs)


class _TwoBranch(torch.nn.Module):
    """x -> a (wide output) and x -> b1 (wider) -> b2 (narrow) -> b3, added: running the b
    branch first keeps a's wide output from being live beside b1's."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(4, 32, 3, padding=1)
        self.b1 = torch.nn.Conv2d(4, 64, 3, padding=1)
        self.b2 = torch.nn.Conv2d(64, 8, 1)
        self.b3 = torch.nn.Conv2d(8, 32, 1)

    def forward(self, x):
        return torch.relu(self.a(x)) + self.b3(torch.relu(self.b2(torch.relu(self.b1(x)))))


def test_call_order_search_lowers_the_peak_and_stays_bit_exact(tmp_path):
    """The order search moves a branch when that lowers the peak, and the firmware that runs
    the reordered calls still matches the integer reference in QEMU."""
    from edgeprune.compile import compile_model
    from edgeprune.lower import lower_relax
    from edgeprune.plan import best_order, peak_bytes
    from edgeprune.quantize.ptq import quantize_ptq
    from edgeprune.quantize.to_relax import to_relax
    from edgeprune.simulate import simulate

    torch.manual_seed(0)
    shape = (1, 4, 16, 16)
    qm = quantize_ptq(_TwoBranch().eval(), shape, np.random.RandomState(0).randn(8, *shape[1:])
                      .astype(np.float32))
    lowered = lower_relax(to_relax(qm), "model")
    n = len(lowered.calls)
    order = best_order(lowered)
    assert sorted(order) == list(range(n)) and order != list(range(n))
    assert peak_bytes(lowered, order) < peak_bytes(lowered, list(range(n)))

    build = compile_model(str(qm.save(tmp_path / "q")), "cortex-m7", tmp_path / "b",
                          log=lambda *a: None)
    assert build["arena_bytes"] == peak_bytes(lowered, order)
    result, _ = simulate(tmp_path / "b", samples=3)
    assert result["mismatches"] == 0 and result["outputs_match"], result


def _random_dag(rng, n):
    """A LoweredModel of n calls on a random DAG (each call reads 1-2 earlier tensors)."""
    from edgeprune.lower import KernelCall, LoweredModel, TensorInfo

    tensors = {"x": TensorInfo("x", (16,), "int8")}
    calls = []
    for i in range(n):
        srcs = ["x"] + [f"t{j}" for j in range(i)]
        reads = rng.sample(srcs[-3:], min(len(srcs[-3:]), rng.randint(1, 2)))
        tensors[f"t{i}"] = TensorInfo(f"t{i}", (16 * rng.randint(1, 20),), "int8")
        calls.append(KernelCall(f"k{i}", reads + [f"t{i}"], workspace_bytes=16 * rng.randint(0, 4)))
    return LoweredModel("m", "", tensors, {}, calls, ["x"], [f"t{n - 1}"])


def test_best_order_is_the_optimum_of_all_topological_orders():
    import itertools

    from edgeprune.plan import _dependencies, best_order, peak_bytes

    rng = random.Random(2)
    for _ in range(60):
        lm = _random_dag(rng, rng.randint(2, 7))
        deps = _dependencies(lm)[0]
        valid = [p for p in itertools.permutations(range(len(lm.calls)))
                 if all(p.index(d) < p.index(i) for i in p for d in deps[i])]
        order = best_order(lm)
        assert tuple(order) in valid
        assert peak_bytes(lm, order) == min(peak_bytes(lm, list(p)) for p in valid)


class _DepthwiseResidual(torch.nn.Module):
    """A depthwise conv and a residual add whose inputs die there: both can run in place."""

    def __init__(self):
        super().__init__()
        self.expand = torch.nn.Conv2d(4, 16, 1)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.project = torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Conv2d(16, 8, 1, stride=2)

    def forward(self, x):
        a = torch.relu(self.dw(torch.relu(self.expand(x))))
        return self.head(torch.relu(self.project(a) + a))


def _quantized_and_lowered(model_class, shape, seed: int, samples: int = 16):
    """The int8 model of a fresh `model_class` (PTQ on random inputs) and its lowering."""
    from edgeprune.lower import lower_relax
    from edgeprune.quantize.ptq import quantize_ptq
    from edgeprune.quantize.to_relax import to_relax

    torch.manual_seed(seed)
    qm = quantize_ptq(model_class().eval(), shape,
                      np.random.RandomState(seed).randn(samples, *shape[1:]).astype(np.float32))
    return qm, lower_relax(to_relax(qm), "model")


def _bit_exact_on(qm, targets, tmp_path):
    """The firmware of `qm` matches the integer reference in QEMU on every target."""
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    qdir = qm.save(tmp_path / "q")
    for target in targets:
        compile_model(str(qdir), target, tmp_path / target, log=lambda *a: None)
        result, _ = simulate(tmp_path / target, samples=3)
        assert result["mismatches"] == 0 and result["outputs_match"], (target, result)


def test_depthwise_and_add_run_in_place_and_stay_bit_exact(tmp_path):
    """The depthwise conv and the add overwrite their dying inputs (a smaller arena), and the
    firmware still matches the integer reference on the SMLAD (M7), Helium (M55) and portable
    (RISC-V) kernels."""
    from edgeprune.plan import _buffers, inplace_aliases, lower_bound, plan_model

    qm, lowered = _quantized_and_lowered(_DepthwiseResidual, (1, 4, 12, 12), 1, samples=8)
    aliases = inplace_aliases(lowered)
    kinds = {c.kernel.rstrip("0123456789") for c in lowered.calls if c.output in aliases}
    assert kinds == {"ep_int8_depthwise", "ep_int8_add"}, [c.kernel for c in lowered.calls]
    assert plan_model(lowered).arena_bytes < lower_bound(_buffers(lowered))

    _bit_exact_on(qm, ("cortex-m7", "cortex-m55", "riscv32"), tmp_path)


class _SlicesAndLookups(torch.nn.Module):
    """Channel halves at batch 1, a slice of the input, a slice within one piece of a
    concatenation, table activations (SiLU, sigmoid) and an output that is a slice."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = torch.nn.Conv2d(16, 8, 1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.nn.functional.silu(self.a(x))
        z = torch.cat([self.b(y[:, :8]) + x[:, 1:3].sum(1, keepdim=True), y[:, 8:]], 1)
        w = torch.sigmoid(self.c(z))[:, 2:6] * z[:, 8:12]
        return self.fc(torch.cat([w, z[:, :4]], 1).mean((2, 3)))[:, 1:4]


def test_slices_are_views_and_lookups_fuse_and_stay_bit_exact(tmp_path):
    """A contiguous slice is a view at an offset (no kernel, no copy); a table activation
    computes its int32 index inside its lookup (no tensor four times the activation's size)
    and writes over its dying input; the firmware still matches the integer reference."""
    from edgeprune.plan import inplace_aliases

    qm, lowered = _quantized_and_lowered(_SlicesAndLookups, (1, 4, 8, 8), 2)
    kernels = [c.kernel for c in lowered.calls]
    assert not [k for k in kernels if "strided_slice" in k and "sum" not in k], kernels
    assert len([v for v in lowered.views if lowered.offset(v)]) >= 4, lowered.view_offsets
    wide = [c.output for c in lowered.calls if lowered.tensors[c.output].dtype == "int32"
            and np.prod(lowered.tensors[c.output].shape) >= 8 * 8 * 8]
    assert not wide, wide            # no lookup index tensors (a reduction's sums are small)
    # z's pieces are written in place; the last concatenation has a slice (a view) as a piece
    assert sum("concatenate" in k for k in kernels) == 1, kernels
    assert lowered.outputs[0] in lowered.views   # the output slice is copied out
    in_place = [c.kernel for c in lowered.calls if c.output in inplace_aliases(lowered)]
    assert any("take" in k for k in in_place), in_place

    _bit_exact_on(qm, ("cortex-m7", "riscv32"), tmp_path)


def test_only_elementwise_inputs_may_share_the_output():
    """What the plan may overwrite: the input of a table lookup or a broadcasting add, not the
    rows a gather picks from or the input of a transpose (same shape, other order)."""
    from tvm import relax

    from edgeprune.lower import lower_relax

    def one_kernel(body):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 4, 4), "int8"))
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(relax.op.add(body(x), relax.const(np.int8(1))))
            bb.emit_func_output(out)
        (call,) = lower_relax(bb.get(), "m").calls
        return call.elementwise

    def lookup(h):
        idx = relax.op.subtract(relax.op.astype(h, "int32"), relax.const(np.int32(-128)))
        table = relax.const(np.arange(256).astype(np.int8))
        return relax.op.take(table, idx, axis=0, mode="clip")

    rows = relax.const(np.array([0, 0, 1, 2], np.int32))
    scale = relax.const(np.full((1, 1, 4), 3, np.int8))
    assert 0 in one_kernel(lookup)       # position 0 is x; the others are constants
    assert 0 in one_kernel(lambda h: relax.op.multiply(h, scale))
    assert 0 not in one_kernel(lambda h: relax.op.take(h, rows, axis=1))
    assert 0 not in one_kernel(lambda h: relax.op.permute_dims(h, [0, 2, 1]))


class _Shifted(torch.nn.Module):
    """A tensor added to itself shifted one channel each way (how a local response norm sums
    its window): one fused kernel reads it whole and through views at other channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.Conv2d(6, 4, 3)

    def forward(self, x):
        s = torch.relu(self.c1(x)) ** 2
        pad = torch.nn.functional.pad
        return self.c2(pad(s[:, :-1], (0, 0, 0, 0, 1, 0)) + s + pad(s[:, 1:], (0, 0, 0, 0, 0, 1)))


def test_a_kernel_that_reads_views_of_its_input_does_not_write_over_it(tmp_path):
    """The kernel reads s[c] for its output at c, but also s[c - 1] and s[c + 1] through the
    views: its output over s would overwrite channels it has yet to read (it did: 149 %
    error)."""
    from edgeprune.compile import compile_model
    from edgeprune.load import save_torch
    from edgeprune.simulate import simulate

    torch.manual_seed(0)
    save_torch(_Shifted().eval(), (1, 1, 6, 6), tmp_path / "m.pt")
    compile_model(str(tmp_path / "m.pt"), "riscv32", tmp_path / "b", log=lambda *a: None)
    result, _ = simulate(tmp_path / "b", np.random.default_rng(0).normal(
        size=(2, 1, 6, 6)).astype(np.float32))
    assert result["outputs_match"], result["rel_err"]


class _Concats(torch.nn.Module):
    """A Fire module (two expands concatenated), a DenseNet pair of concatenations (the first
    inside the second) and a concatenation along the width, which is not contiguous."""

    def __init__(self):
        super().__init__()
        self.squeeze = torch.nn.Conv2d(3, 4, 1)
        self.e1 = torch.nn.Conv2d(4, 8, 1)
        self.e3 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.d1 = torch.nn.Conv2d(16, 4, 3, padding=1)
        self.d2 = torch.nn.Conv2d(20, 4, 3, padding=1)
        self.t = torch.nn.Conv2d(24, 4, 1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        f = torch.cat([torch.relu(self.e1(s)), torch.relu(self.e3(s))], 1)
        d = torch.cat([f, torch.relu(self.d1(f))], 1)
        d = torch.cat([d, torch.relu(self.d2(d))], 1)
        e = torch.relu(self.t(d))
        w = torch.cat([e[:, :, :, :3], e[:, :, :, 5:]], 3)
        return self.fc(w.mean((2, 3)))


def test_concatenations_are_written_in_place_and_stay_bit_exact(tmp_path):
    """Pieces that lie one after another in a concatenation's output are written there by
    their producers: no concat kernel, no copy, a smaller arena."""
    from edgeprune.plan import plan_model

    qm, lowered = _quantized_and_lowered(_Concats, (1, 3, 8, 8), 3)
    concats = [c for c in lowered.calls if "concatenate" in c.kernel]
    assert len(concats) == 1 and lowered.tensors[concats[0].output].shape[3] == 6, concats
    # the expands and the DenseNet convs write into the last concatenation, at their offsets
    written = {c.kernel: lowered.offset(c.output) for c in lowered.calls
               if c.output in lowered.views}
    assert sorted(written.values()) == [0, 8 * 64, 16 * 64, 20 * 64], written
    # the peak: the last concatenation (24 channels of 8 x 8) and a conv's scratch, no copies
    scratch = max(c.workspace_bytes for c in lowered.calls)
    assert plan_model(lowered).arena_bytes <= 24 * 64 + scratch

    _bit_exact_on(qm, ("cortex-m55", "riscv32"), tmp_path)


class _TwoPieces(torch.nn.Module):
    """Two convs of different output ranges, concatenated along `axis`."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis, self.a, self.b = axis, torch.nn.Conv2d(2, 3, 1), torch.nn.Conv2d(2, 3, 1)
        with torch.no_grad():
            self.b.weight.mul_(10)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], self.axis).mean((2, 3))


@pytest.mark.parametrize("axis, batch, shared", [(1, 1, True), (1, 2, False), (3, 1, False)])
def test_a_concatenation_shares_its_range_only_where_written_in_place(axis, batch, shared):
    """Channels at batch 1 lie one after another in the output: the pieces take its range. At
    batch 2, or along the width, the concat stays a kernel that requantizes each piece, so
    each keeps its own (finer) steps."""
    from edgeprune.quantize.ptq import quantize_ptq

    torch.manual_seed(0)
    shape = (batch, 2, 5, 5)
    calib = np.random.RandomState(0).randn(8, *shape[1:]).astype(np.float32)
    qm = quantize_ptq(_TwoPieces(axis).eval(), shape, calib)
    concat = next(op for op in qm.ops if op.kind == "concat")
    scales = {qm.tensors[t].scale for t in [*concat.inputs, concat.output]}
    assert (len(scales) == 1) == shared, scales


class _Pointwise(torch.nn.Module):
    """Depthwise-separable convs (1x1 stride 1 over a dying input: in place) and a 1x1 stride-2
    conv on a large image, whose bands of outputs land on input rows not yet read."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = torch.nn.Conv2d(16, 24, 1)
        self.down = torch.nn.Conv2d(24, 32, 1, stride=2)
        self.fc = torch.nn.Linear(32, 4)

    def forward(self, x):
        y = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x))))))
        return self.fc(torch.relu(self.down(y)).mean((2, 3)))


def test_convs_that_copy_their_input_first_run_in_place_and_stay_bit_exact(tmp_path):
    from edgeprune.plan import inplace_aliases

    qm, lowered = _quantized_and_lowered(_Pointwise, (1, 1, 24, 24), 4)
    convs = [c for c in lowered.calls if "conv" in c.kernel]
    aliases = inplace_aliases(lowered)
    pointwise, down = convs[-2], convs[-1]     # 16 -> 24 at 24 x 24; 24 -> 32, stride 2
    assert pointwise.overwrites and pointwise.output in aliases
    assert not down.overwrites and down.output not in aliases

    _bit_exact_on(qm, ("cortex-m7", "cortex-m55", "riscv32"), tmp_path)


def test_a_banded_pointwise_conv_with_wider_outputs_stays_out_of_place(tmp_path):
    """The same pointwise conv with int16 outputs (mixed precision): a band's outputs would land
    on input rows not yet read (two bytes each for one), so it is not run in place; bit-exact."""
    from edgeprune.lower import lower_relax
    from edgeprune.quantize import ptq
    from edgeprune.quantize.to_relax import to_relax

    torch.manual_seed(4)
    model, shape = _Pointwise().eval(), (1, 1, 24, 24)
    convs = [n for n in ptq.extract(model, shape).nodes if n.kind == "conv2d"]
    pw = convs[2]                      # stem, depthwise, pointwise, stride-2 1x1
    calib = np.random.RandomState(4).randn(16, *shape[1:]).astype(np.float32)
    qm = ptq.quantize_ptq(model, shape, calib, act_dtypes={pw.output: "int16"})
    assert qm.tensors[pw.output].dtype == "int16"
    lowered = lower_relax(to_relax(qm), "model")
    pointwise = [c for c in lowered.calls if "conv" in c.kernel][-2]
    assert not pointwise.overwrites
    _bit_exact_on(qm, ("cortex-m7", "riscv32"), tmp_path)


@pytest.mark.parametrize("first, second", [("w1", "y"), ("w0", "w1")])
def test_a_tensor_named_like_a_weight_keeps_its_own_name(first, second):
    """Weights are named w0, w1, ... as the walk meets them; a layer's output may hold such a
    name (a model with layers named w0, w1, or a name TVM derives from them, w21), met before
    the weight (w1 here) or as the output of the call that reads it (w0). Each takes its own
    name: before, they shared one, and a kernel read one for the other on the target."""
    from tvm import relax

    from edgeprune.lower import lower_relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():   # two products: two kernels
            a = bb.emit(relax.op.matmul(x, relax.const(np.full((4, 4), 2, "float32"))),
                        name_hint=first)
            y = bb.emit(relax.op.matmul(a, relax.const(np.full((4, 4), 3, "float32"))),
                        name_hint=second)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    lowered = lower_relax(bb.get(), "model")
    computed = {c.output for c in lowered.calls}
    assert not computed & set(lowered.consts), (computed, lowered.consts)
    assert lowered.calls[1].args[0] == lowered.calls[0].output
    read = [a for c in lowered.calls for a in c.args[:-1] if a in lowered.consts]
    assert sorted(float(lowered.consts[a][0, 0]) for a in read) == [2.0, 3.0]
