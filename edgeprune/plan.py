"""Static memory plan: every intermediate tensor and every kernel's scratch in one arena.

Liveness is by call index: a tensor lives from the call that writes it to the last call that
reads it (directly or through a reshape view); a kernel's workspace lives during its call only.
The lower bound is the largest sum of sizes live at one call; several placement heuristics run
and the smallest arena wins (equal to the bound on chains, see tests/test_plan.py).
"""

from dataclasses import dataclass

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


def plan_model(lowered) -> Plan:
    """Arena plan for a LoweredModel: intermediates (not inputs/outputs/weights/views) + scratch."""
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
    buffers = [Buffer(n, _align(lowered.tensors[n].nbytes), first[n], last[n])
               for n in first if n not in external]
    buffers += [Buffer(f"__workspace{i}", _align(c.workspace_bytes), i, i)
                for i, c in enumerate(lowered.calls) if c.workspace_bytes]
    return plan_buffers(buffers)
