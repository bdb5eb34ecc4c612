"""The memory planner: arena equals the lower bound on chains, never exceeds the naive sum."""

import random

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
