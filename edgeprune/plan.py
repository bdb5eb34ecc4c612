"""Static memory plan: every intermediate tensor and every kernel's scratch in one arena.

Liveness is by call index: a tensor lives from the first call that writes it to the last call
that reads it (directly or through a view: a reshape, a contiguous slice, a piece of a
concatenation its producer writes in place; see lower.py); a kernel's workspace lives during its
call only.
The lower bound is the largest sum of sizes live at one call; several placement heuristics run
and the smallest arena wins (equal to the bound on chains, see tests/test_plan.py).

Where the graph branches (a residual block's shortcut, parallel paths before a concat) the
order of the calls changes what is live at once: `best_order` searches the topological orders
for the lowest peak before planning.

In place: a depthwise conv, a residual add or one of TVM's elementwise kernels whose input dies
at that call writes its output over the input (`inplace_aliases`); each reads an input element
before it writes the output bytes that cover it.
"""

import dataclasses
import heapq
import re
from dataclasses import dataclass

import numpy as np

ALIGN = 16


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Buffer:
    name: str
    size: int      # bytes, aligned
    start: int     # first call index that needs it
    end: int       # last call index that needs it (inclusive)

    def overlaps(self, other: "Buffer") -> bool:
        return self.start <= other.end and other.start <= self.end


@dataclass
class Plan:
    offsets: dict[str, int]
    buffers: list[Buffer]
    arena_bytes: int
    lower_bound_bytes: int


def lower_bound(buffers: list[Buffer]) -> int:
    if not buffers:
        return 0
    steps = range(min(b.start for b in buffers), max(b.end for b in buffers) + 1)
    return max(sum(b.size for b in buffers if b.start <= s <= b.end) for s in steps)


def _first_fit(buffers: list[Buffer], order: list[Buffer]) -> dict[str, int]:
    """Place each buffer, in `order`, at the lowest offset free of already placed conflicts."""
    placed: list[tuple[int, Buffer]] = []
    offsets = {}
    for b in order:
        busy = sorted((o, o + p.size) for o, p in placed if p.overlaps(b))
        offset = 0
        for lo, hi in busy:
            if offset + b.size <= lo:
                break
            offset = max(offset, hi)
        offsets[b.name] = offset
        placed.append((offset, b))
    return offsets


def _two_ended(buffers: list[Buffer], cap: int) -> dict[str, int] | None:
    """In time order, alternate buffers between the bottom and the top of a `cap`-byte arena.

    This is what a chain needs: a kernel's input sits at one end, its output at the other and its
    scratch in between. Returns None when some buffer fits at neither end.
    """
    placed: list[tuple[int, Buffer]] = []
    offsets: dict[str, int] = {}
    side = {}  # name -> "low" | "high"
    for b in sorted(buffers, key=lambda b: (b.start, -b.end, -b.size)):
        busy = sorted((o, o + p.size) for o, p in placed if p.overlaps(b))
        low = 0
        for lo, hi in busy:
            if low + b.size <= lo:
                break
            low = max(low, hi)
        high = cap - b.size
        for lo, hi in sorted(busy, key=lambda r: -r[1]):
            if high >= hi:
                break
            high = min(high, lo - b.size)
        candidates = []
        if low + b.size <= cap:
            candidates.append(("low", low))
        if high >= 0 and all(high >= hi or high + b.size <= lo for lo, hi in busy):
            candidates.append(("high", high))
        if not candidates:
            return None
        # Go to the end opposite the most recent live neighbour, so the middle stays free.
        neighbours = [p for _, p in placed if p.overlaps(b)]
        prefer = None
        if neighbours:
            last = max(neighbours, key=lambda p: p.start)
            prefer = "high" if side[last.name] == "low" else "low"
        candidates.sort(key=lambda c: c[0] != prefer)
        side[b.name], offsets[b.name] = candidates[0]
        placed.append((offsets[b.name], b))
    return offsets


def _arena(buffers: list[Buffer], offsets: dict[str, int]) -> int:
    return max((offsets[b.name] + b.size for b in buffers), default=0)


def plan_buffers(buffers: list[Buffer]) -> Plan:
    bound = lower_bound(buffers)
    candidates = [
        _first_fit(buffers, sorted(buffers, key=lambda b: (-b.size, b.start))),
        _first_fit(buffers, sorted(buffers, key=lambda b: (b.start, -b.size))),
        _first_fit(buffers, sorted(buffers, key=lambda b: (-(b.end - b.start), -b.size))),
    ]
    two = _two_ended(buffers, bound)
    if two is not None:
        candidates.append(two)
    best = min(candidates, key=lambda o: _arena(buffers, o))
    return Plan(best, buffers, _arena(buffers, best), bound)


def _dependencies(lowered) -> tuple[list[set[int]], dict[str, int], dict[str, set[int]]]:
    """Per call, the calls it must follow; producer call (the first that writes into it) and
    reader calls of each base tensor."""
    producer: dict[str, int] = {}
    writers: dict[str, list[int]] = {}
    readers: dict[str, set[int]] = {}
    for i, call in enumerate(lowered.calls):
        for name in call.inputs:
            readers.setdefault(lowered.base(name), set()).add(i)
        producer.setdefault(lowered.base(call.output), i)
        writers.setdefault(lowered.base(call.output), []).append(i)
    # a reader follows every call that wrote into what it reads (the pieces of a concatenation)
    deps = [{w for n in c.inputs for w in writers.get(lowered.base(n), ()) if w < i}
            for i, c in enumerate(lowered.calls)]
    # A call that writes into a tensor another call produced (in place, or the next piece of a
    # concatenation) keeps its place after the producer and its readers so far: order those
    # writes as they were.
    for i, call in enumerate(lowered.calls):
        out = lowered.base(call.output)
        if producer[out] != i:
            deps[i] |= {producer[out]} | {r for r in readers.get(out, ()) if r < i}
    return deps, producer, readers


def peak_bytes(lowered, order: list[int]) -> int:
    """The lower bound of the arena (largest sum of live intermediates + scratch) for `order`."""
    return _order_peaks(lowered, [order])[0]


def _order_peaks(lowered, orders) -> list[int]:
    peaks = []
    for order in orders:
        calls = [lowered.calls[i] for i in order]
        moved = dataclasses.replace(lowered, calls=calls)
        peaks.append(lower_bound(_buffers(moved)))
    return peaks


def best_order(lowered, max_work: int = 2_000_000) -> list[int]:
    """The topological order of `lowered.calls` with the lowest peak of live bytes.

    A search over the sets of calls already run (the live tensors depend only on that set),
    cheapest peak first; ties keep the original order. Graphs with too many such sets for
    `max_work` (each set costs about one step per call: a recurrent layer unrolled over a
    hundred steps has many hundred calls) keep the original order."""
    n = len(lowered.calls)
    max_states = min(50_000, max_work // max(n, 1))
    deps, producer, readers = _dependencies(lowered)
    external = set(lowered.inputs) | set(lowered.outputs) | set(lowered.consts)
    final = {lowered.base(o) for o in lowered.outputs if o in lowered.views}
    size = {t: _align(lowered.tensors[t].nbytes) for t in producer if t not in external}
    out_of = [lowered.base(c.output) for c in lowered.calls]
    work = [_align(c.workspace_bytes) for c in lowered.calls]

    def live(done: int) -> int:
        return sum(s for t, s in size.items() if done >> producer[t] & 1 and
                   (t in final or any(not done >> r & 1 for r in readers.get(t, ()))))

    full = (1 << n) - 1
    heap = [(0, (), 0)]           # (peak so far, order so far, done mask)
    seen: set[int] = set()
    while heap:
        peak, order, done = heapq.heappop(heap)
        if done == full:
            return list(order)
        if done in seen:
            continue
        seen.add(done)
        if len(seen) > max_states:
            return list(range(n))
        base = live(done)
        for i in range(n):
            if done >> i & 1 or any(not done >> d & 1 for d in deps[i]):
                continue
            fresh = size.get(out_of[i], 0) if producer[out_of[i]] == i else 0  # else in place
            step = max(peak, base + fresh + work[i])
            nxt = done | 1 << i
            if nxt not in seen:
                heapq.heappush(heap, (step, order + (i,), nxt))
    return list(range(n))


def reorder_for_memory(lowered) -> int:
    """Run `lowered`'s calls in the order of `best_order` (in place); the bytes saved."""
    before = peak_bytes(lowered, list(range(len(lowered.calls))))
    order = best_order(lowered)
    after = peak_bytes(lowered, order)
    if after < before:
        lowered.calls = [lowered.calls[i] for i in order]
        return before - after
    return 0


# Kernels that may overwrite a dying input (kernels/int8.py, kernels/simd.py): a depthwise conv
# copies each channel's plane into its scratch before writing that channel's outputs, which
# land on the bytes of planes already copied (an output plane is no larger than an input
# plane); an add reads a[i] and b[i] before it writes y[i]. TVM's fused elementwise kernels
# (a requantization, a table activation) read x[i] only for y[i]: with elements of one size
# y[i] covers x[i] alone, whatever order their loops take (KernelCall.elementwise).
INPLACE_KERNEL = re.compile(r"ep_int8_(depthwise|add)\d*$")


def _inplace_candidates(call, convs: bool) -> tuple[list[int], str]:
    """(positions of the inputs the call's output may overwrite, how they must fit)."""
    if call.overwrites:      # an int8 conv that copies its input whole or by its own bands
        return ([0] if convs else []), "any"
    if INPLACE_KERNEL.match(call.kernel):
        if "depthwise" in call.kernel:
            return [0], "plane"
        return list(range(len(call.inputs))), "element"
    return list(call.elementwise), "same"


def inplace_aliases(lowered, convs: bool = True) -> dict[str, str]:
    """Output tensor -> the dying input tensor whose bytes it reuses (in call order); with
    `convs`, also the outputs of the convs that copy their input before writing."""
    external = set(lowered.inputs) | set(lowered.outputs) | set(lowered.consts)
    last: dict[str, int] = {}
    for i, call in enumerate(lowered.calls):
        for name in call.inputs:
            last[lowered.base(name)] = i
    for name in lowered.outputs:
        last[lowered.base(name)] = len(lowered.calls)
    aliases: dict[str, str] = {}
    for i, call in enumerate(lowered.calls):
        out = call.output
        if out in external or out in lowered.views:
            continue
        y = lowered.tensors[out]
        positions, fit = _inplace_candidates(call, convs)
        for k in positions:
            name = call.inputs[k]
            t = lowered.base(name)
            if (t in external or last.get(t) != i or t in aliases.values()
                    or lowered.offset(name)):   # a slice: the kernel reads past its output
                continue
            if any(lowered.base(n) == t and (n != name or j not in positions)
                   for j, n in enumerate(call.inputs)):
                continue   # also read at other elements (a view of it at another channel)
            x = lowered.tensors[t]
            size_x, size_y = np.dtype(x.dtype).itemsize, np.dtype(y.dtype).itemsize
            if fit == "plane":  # same N, C; an output plane within an input plane
                fits = (len(x.shape) == len(y.shape) == 4 and x.shape[:2] == y.shape[:2] and
                        y.nbytes <= x.nbytes)
            elif fit == "element":  # same shape; an output element within its input element
                fits = x.shape == y.shape and size_y <= size_x
            elif fit == "same":
                fits = x.shape == y.shape and size_y == size_x
            else:
                fits = True
            if fits:
                aliases[out] = t
                break
    return aliases


def _root(aliases: dict[str, str], name: str) -> str:
    while name in aliases:
        name = aliases[name]
    return name


def plan_model(lowered) -> Plan:
    """Arena plan for a LoweredModel: intermediates (not inputs/outputs/weights/views) + scratch,
    in-place outputs sharing their input's bytes. A conv's output over its input is one buffer
    of the larger size for both lifetimes, which can raise the peak elsewhere (a wide output
    reserved from when its narrow input was made): the plan with and without those is kept
    whichever is smaller."""
    best = None
    for convs in (True, False):
        aliases = inplace_aliases(lowered, convs)
        plan = plan_buffers(_buffers(lowered, aliases))
        for name in aliases:
            plan.offsets[name] = plan.offsets[_root(aliases, name)]
        if best is None or plan.arena_bytes < best.arena_bytes:
            best = plan
    return best


def _buffers(lowered, aliases: dict[str, str] | None = None) -> list[Buffer]:
    """The arena's buffers; tensors in `aliases` are folded into their root's buffer."""
    aliases = aliases or {}
    external = set(lowered.inputs) | set(lowered.outputs) | set(lowered.consts)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, call in enumerate(lowered.calls):
        for name in call.inputs:
            last[lowered.base(name)] = i
        out = lowered.base(call.output)
        first.setdefault(out, i)
        last[out] = max(last.get(out, i), i)
    # Outputs that are views of intermediates are copied out after the last call.
    end = len(lowered.calls)
    for name in lowered.outputs:
        if name in lowered.views:
            last[lowered.base(name)] = end
    groups: dict[str, list[str]] = {}
    for n in first:
        if n not in external:
            groups.setdefault(_root(aliases, n), []).append(n)
    buffers = [Buffer(root, _align(max(lowered.tensors[n].nbytes for n in names)),
                      min(first[n] for n in names), max(last[n] for n in names))
               for root, names in groups.items()]
    buffers += [Buffer(f"__workspace{i}", _align(c.workspace_bytes), i, i)
                for i, c in enumerate(lowered.calls) if c.workspace_bytes]
    return buffers
