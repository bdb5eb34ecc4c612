"""Schedules that shrink kernel scratch RAM, applied to each fused PrimFunc before codegen.

Legalized TIR materialises whole intermediates: the padded input and the reduction result
before its epilogue (bias, ReLU, residual add), and every step of an elementwise chain. On an
MCU that scratch can exceed the activations. Kernels without a reduction get every
intermediate inlined into the output block. For reductions, two rewrites, each tried and kept
only if TVM accepts it:
  1. the elementwise epilogue is computed right after each output element's reduction, so the
     reduction result shrinks to one scalar;
  2. the padding copy is computed per output row (loops reordered so rows are outermost), so
     the padded buffer shrinks to the kernel's receptive rows.
Correctness is checked end to end: every model is compared with the host in QEMU.
"""

from tvm.s_tir import Schedule


def _iter_kinds(sch: Schedule, block) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _is_reduction(sch: Schedule, block) -> bool:
    return 2 in _iter_kinds(sch, block)


def _spatial_prefix(sch: Schedule, block) -> int | None:
    """Number of leading spatial loops, when loops map 1:1 onto spatial-then-reduce iters."""
    kinds = _iter_kinds(sch, block)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds):
        return None
    n = 0
    while n < len(kinds) and kinds[n] == 0:
        n += 1
    if any(k != 2 for k in kinds[n:]):
        return None
    return n


def _try(sch: Schedule, fn) -> Schedule:
    trial = sch.copy()
    try:
        fn(trial)
        return trial
    except Exception:
        return sch


def schedule_for_small_ram(func):
    sch = Schedule(func)
    root = sch.get_sblock("root") if _has_root(sch) else None
    if root is None:
        return func
    reductions = [b for b in sch.get_child_blocks(root) if _is_reduction(sch, b)]
    if not reductions:
        return _inline_elementwise(sch).mod["main"]
    for red_name in [sch.get(b).name_hint for b in reductions]:
        sch = _inline_read_once_producers(sch, red_name)
        sch = _fuse_epilogue(sch, red_name)
        sch = _pad_per_row(sch, red_name)
    return sch.mod["main"]


def _inline_elementwise(sch: Schedule) -> Schedule:
    """A kernel without reductions (casts, requantized adds, activations): compute every
    intermediate inside the block that writes the output, so none is materialised."""
    for name in [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]:
        sch = _try(sch, lambda s: s.compute_inline(s.get_sblock(name)))
    return sch


def _extent_product(values) -> int:
    n = 1
    for v in values:
        n *= int(v)
    return n


def _inline_read_once_producers(sch: Schedule, red_name: str) -> Schedule:
    """Elementwise producers of a reduction that reads each of their elements once (a sum or
    mean over axes, not a convolution window) are computed inside it instead of stored."""
    while True:
        red = sch.get_sblock(red_name)
        domain = _extent_product(iv.dom.extent for iv in sch.get(red).iter_vars)
        candidates = [p for p in sch.get_producers(red) if not _is_reduction(sch, p)
                      and _extent_product(iv.dom.extent for iv in sch.get(p).iter_vars) == domain]
        before = sch
        for p in candidates:
            name = sch.get(p).name_hint
            sch = _try(sch, lambda s: s.compute_inline(s.get_sblock(name)))
        if sch is before:
            return sch


def _spatial_size(sch: Schedule, block) -> int:
    return _extent_product(iv.dom.extent for iv in sch.get(block).iter_vars
                           if int(iv.iter_type) == 0)


def _has_root(sch: Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def _fuse_epilogue(sch: Schedule, red_name: str) -> Schedule:
    def apply(s: Schedule):
        red = s.get_sblock(red_name)
        consumers = s.get_consumers(red)
        # Inline a chain of elementwise consumers into its last block, then move that block
        # under the reduction's innermost spatial loop.
        while len(consumers) == 1:
            nxt = s.get_consumers(consumers[0])
            if len(nxt) != 1:
                break
            s.compute_inline(consumers[0])
            consumers = s.get_consumers(red)
        if len(consumers) != 1:
            raise ValueError("no single epilogue")
        # only an epilogue over the reduction's own output elements: a consumer with more
        # (a pad for the next layer) would lose the elements no reduction output reaches
        if _spatial_size(s, consumers[0]) != _spatial_size(s, red):
            raise ValueError("the epilogue covers other elements than the reduction's")
        n = _spatial_prefix(s, red)
        if not n:
            raise ValueError("unexpected loop nest")
        s.reverse_compute_at(consumers[0], s.get_loops(red)[n - 1])
    return _try(sch, apply)


def _pad_per_row(sch: Schedule, red_name: str) -> Schedule:
    def apply(s: Schedule):
        red = s.get_sblock(red_name)
        pads = [p for p in s.get_producers(red)
                if not _is_reduction(s, p) and "pad" in s.get(p).name_hint]
        if len(pads) != 1:
            raise ValueError("no padding producer")
        loops = s.get_loops(red)
        n = _spatial_prefix(s, red)
        if n != 4:  # NCHW-style 2-D conv / pool: (n, c, h, w) spatial loops
            raise ValueError("not a 2-D spatial reduction")
        s.reorder(loops[0], loops[2], loops[1], loops[3])
        s.compute_at(pads[0], s.get_loops(red)[1])
    return _try(sch, apply)
