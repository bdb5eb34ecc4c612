"""The feedback search on a tiny CNN with real measurements: PTQ, TVM, the cross compiler and
QEMU's instruction counts. One cache per module, so the cost table is measured once."""

import copy
import json

import pytest
import torch

from edgeprune import data as datasets
from edgeprune.errors import EdgepruneError
from edgeprune.feedback import search
from edgeprune.feedback.measure import toolchain_fingerprint
from edgeprune.feedback.worker import JobData, Runner
from edgeprune.targets import load_target
from edgeprune.models.cnn import SmallCNN
from edgeprune.train import train

# Small settings: two groups (4 and 8 channels), one grid point each, tiny fine-tunes.
SETTINGS = dict(workers=1, grid=(0.5,), min_keep=0.5, short_finetune_samples=128,
                finetune_epochs=0.0, train_samples=1000, val_samples=200, eval_samples=200,
                calib_samples=16, step_iterations=2, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data = datasets.load("fashion-mnist")
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    train(model, data, epochs=0.3, lr=0.05, max_samples=2000)
    return model, torch.from_numpy(data.x_train[:1]), data, tmp_path_factory.mktemp("fbcache")


@pytest.fixture(scope="module")
def impossible(tiny):
    """A flash budget below the firmware's own code: no pruning can meet it."""
    model, example, data, cache = tiny
    return search(model, example, data, "cortex-m7", {"flash_kb": 1.0}, cache_dir=cache,
                  log=lambda *a: None, **SETTINGS)


def test_impossible_budget_says_which_and_gives_the_closest_point(impossible):
    r = impossible
    assert r.met is False
    assert "cannot be met" in r.message and "flash_kb" in r.message and "> budget 1" in r.message
    assert "closest point" in r.message
    # the closest point is the smallest model, measured: every group at its minimum width (and
    # the fewest bits, if they measure less flash)
    assert r.widths == {"features.0.0": 2, "features.2.0": 4}
    base = r.trajectory[0]["measured"]
    assert r.measured["flash_kb"] < base["flash_kb"]
    assert r.measured["flash_kb"] > 1.0


def test_a_small_training_split_ranks_on_its_last_tenth(tiny, impossible):
    """150 training samples (a small sensor dataset): the holdout shrinks to 15, the rest
    fine-tune; the search runs (here to the impossible budget's closest point)."""
    model, example, data, cache = tiny
    small = datasets.Dataset("fm-150", data.x_train[:150], data.y_train[:150], data.x_test,
                             data.y_test)
    lines = []
    r = search(model, example, small, "cortex-m7", {"flash_kb": 1.0}, cache_dir=cache,
               log=lines.append, **SETTINGS)
    assert not r.met and "closest point" in r.message
    assert "feedback: candidates ranked on the last 15 of 150 training samples" in lines


def test_interrupted_search_resumes_from_its_cache(tiny, impossible):
    model, example, data, cache = tiny
    budget = {"latency_ms": 0.7 * impossible.trajectory[0]["measured"]["latency_ms"]}

    def interrupt(msg):
        if "iteration 1:" in msg:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        search(model, example, data, "cortex-m7", budget, cache_dir=cache, log=interrupt,
               **SETTINGS)
    r = search(model, example, data, "cortex-m7", budget, cache_dir=cache, log=lambda *a: None,
               **{**SETTINGS, "workers": 2})
    assert r.met, r.message
    # the table, iteration 1's candidates and its measurement came from the cache
    assert r.cache["hits"] >= 6
    again = search(model, example, data, "cortex-m7", budget, cache_dir=cache,
                   log=lambda *a: None, **SETTINGS)
    assert again.cache["runs"] == 0 and again.widths == r.widths


def test_search_meets_the_budget_as_re_measured(tiny, impossible, tmp_path):
    model, example, data, cache = tiny
    base = impossible.trajectory[0]["measured"]
    budget = {"latency_ms": 0.7 * base["latency_ms"]}
    r = search(model, example, data, "cortex-m7", budget, cache_dir=cache, work_dir=tmp_path,
               log=lambda *a: None, **SETTINGS)
    assert r.met, r.message
    assert r.measured["latency_ms"] <= budget["latency_ms"]
    assert len(r.trajectory) >= 3  # start, at least one accepted step, final
    # measured once more from scratch, outside the search and its cache
    fresh = Runner(JobData(data.x_train[:16], data.y_train[:16], data.x_test[:16],
                           data.y_test[:16], data.x_train[:16]), tmp_path / "fresh", 1)
    target = load_target("cortex-m7")
    again = fresh.measure([r.model], (1, 1, 28, 28), target, toolchain_fingerprint(target))[0]
    fresh.close()
    assert fresh.runs == 1
    assert again["latency_ms"] <= budget["latency_ms"]
    assert again["instructions"] == r.measured["instructions"]
    # the per-layer file reproduces the chosen widths through `prune --per-layer`'s reader
    from edgeprune.prune import prune
    from edgeprune.prune.cli import read_per_layer
    ratios = read_per_layer(tmp_path / "ratios.json")
    pruned, _ = prune(model, example, criterion="l1", ratios=ratios)
    assert pruned.get_submodule("features.0.0").out_channels == r.widths["features.0.0"]
    assert pruned.get_submodule("features.2.0").out_channels == r.widths["features.2.0"]
    traj = json.loads((tmp_path / "trajectory.json").read_text())
    assert traj[-1]["group"] == "final" and all("latency_ms" in p for p in traj)
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.record["layers"]["features.0.0"]["out_before"] == 4
    assert len(r.record["layers"]["features.0.0"]["out_kept"]) == r.widths["features.0.0"]
    assert len(r.record["layers"]["features.2.0"]["out_kept"]) == r.widths["features.2.0"]


def test_the_slack_a_search_leaves_is_grown_back(tiny, impossible):
    """At 70 % of the latency the second step cuts features.0.0 to its minimum, well under the
    budget: the search grows features.2.0 back into that slack, measured within the budget,
    where without growing it stops at the narrower widths."""
    model, example, data, cache = tiny
    budget = {"latency_ms": 0.7 * impossible.trajectory[0]["measured"]["latency_ms"]}
    kw = dict(cache_dir=cache, log=lambda *a: None, **SETTINGS)
    grown = search(model, example, data, "cortex-m7", budget, **kw)
    narrow = search(model, example, data, "cortex-m7", budget, grow_back=False, **kw)
    assert grown.met and narrow.met
    assert [p["group"] for p in grown.trajectory if str(p["group"]).endswith(" grown")]
    assert sum(grown.widths.values()) > sum(narrow.widths.values())
    assert narrow.measured["latency_ms"] < grown.measured["latency_ms"] <= budget["latency_ms"]


@pytest.mark.parametrize("name", ["resnet8", "mobilenet", "dscnn"])
def test_a_group_grows_back_without_changing_what_the_model_computes(name):
    """Every group of a pruned zoo model (residual adds, depthwise convs, flatten -> dense)
    grown by two channels: the grown model computes what the pruned one does (the returned
    channels' outgoing weights are zero), keeps its weights, and its record names the
    channels it now keeps."""
    import torch.fx as fx

    from edgeprune.feedback.grow import GrowError, grow
    from edgeprune.feedback.search import _compose, _identity_record
    from edgeprune.models import build
    from edgeprune.prune import DepGraph, prune

    model, shape = build(name)
    torch.manual_seed(0)
    x = torch.randn(2, *shape[1:])
    base = fx.symbolic_trace(model)
    graph = DepGraph(base, x[:1])
    cut, rec = prune(base, x[:1], "l1", ratios=0.5, graph=graph)
    layers = _compose(_identity_record(graph), rec)
    with torch.no_grad():   # as if fine-tuned: not the unpruned model's weights any more
        for p in cut.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cut.eval()
    for g in rec["groups"]:
        k = len(g["kept"])
        wide, record = grow(graph, cut, layers, g["name"], min(g["channels_before"], k + 2))
        layer = g["layers"][0]
        assert wide.get_submodule(layer).weight.shape[0] == min(g["channels_before"], k + 2)
        assert set(layers[layer]["out_kept"]) < set(record[layer]["out_kept"])
        assert torch.allclose(wide.eval()(x), cut(x), atol=1e-5), g["name"]
    with pytest.raises(GrowError, match="cannot grow"):
        grow(graph, cut, layers, rec["groups"][0]["name"], 1)


def test_bad_budget_names_the_key(tiny):
    model, example, data, cache = tiny
    with pytest.raises(EdgepruneError, match="unknown budget 'latency'"):
        search(model, example, data, "cortex-m7", {"latency": 1.0}, cache_dir=cache, **SETTINGS)
    with pytest.raises(EdgepruneError, match="flash_kb=-1"):
        search(model, example, data, "cortex-m7", {"flash_kb": -1}, cache_dir=cache, **SETTINGS)


class TinyMLP(torch.nn.Module):
    """A dense layer that holds most of the flash: where fewer bits pay (memory-bound)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(784, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def test_flash_budget_only_fewer_bits_can_meet(tmp_path_factory, tmp_path):
    """Pruning fc1 to its minimum (half) saves ~12 kB of ~34 kB; the budget asks ~15 kB less:
    the search must lower fc1's word length (seen from the measured table), and the chosen bits
    are what the quantize stage deploys."""
    data = datasets.load("fashion-mnist")
    torch.manual_seed(0)
    model = TinyMLP()
    train(model, data, epochs=0.3, lr=0.05, max_samples=2000)
    example = torch.from_numpy(data.x_train[:1])
    cache = tmp_path_factory.mktemp("fbmlp")
    quiet = dict(cache_dir=cache, log=lambda *a: None, **SETTINGS)
    start = search(model, example, data, "cortex-m7", {"flash_kb": 1e6}, **quiet)
    base_flash = start.trajectory[0]["measured"]["flash_kb"]
    budget = {"flash_kb": base_flash - 0.6 * 784 * 32 / 1024}
    # widths alone cannot: the smallest int8 model misses the budget
    widths_only = search(model, example, data, "cortex-m7", budget, word_lengths=(8,), **quiet)
    assert not widths_only.met and "cannot be met" in widths_only.message
    r = search(model, example, data, "cortex-m7", budget, work_dir=tmp_path, **quiet)
    assert r.met, r.message
    assert r.bits["fc1"] < 8, r.bits
    assert r.measured["flash_kb"] <= budget["flash_kb"]
    assert any(p["bits"] for p in r.trajectory[1:])
    ratios_file = json.loads((tmp_path / "ratios.json").read_text())
    assert ratios_file["bits"] == r.bits
    # re-measured from scratch at the chosen word lengths, outside the search and its cache
    fresh = Runner(JobData(data.x_train[:16], data.y_train[:16], data.x_test[:16],
                           data.y_test[:16], data.x_train[:16]), tmp_path / "fresh", 1)
    target = load_target("cortex-m7")
    again = fresh.measure([r.model], (1, 1, 28, 28), target, toolchain_fingerprint(target),
                          bits=[r.bits])[0]
    fresh.close()
    assert again["flash_kb"] <= budget["flash_kb"]
    assert again["instructions"] == r.measured["instructions"]
    # the quantize stage takes the chosen bits (what `deploy --budget` deploys)
    from edgeprune.quantize.stage import QuantizeConfig, quantize
    _, report = quantize(r.model, (1, 1, 28, 28), data, target,
                         QuantizeConfig(method="ptq", layer_bits=r.bits, eval_samples=200,
                                        calib_samples=16), log=lambda *a: None)
    by_layer = {l["layer"]: l for l in report["layers"]}
    assert by_layer["fc1"]["weight_bits"] == r.bits["fc1"]


def test_a_model_larger_than_the_chip_is_pruned_until_it_fits(tmp_path):
    """The unpruned MLP (~34 kB of flash) does not fit a chip of 28 kB (the M7's target file
    with less flash). The search measures it all the same (QEMU's board has room), takes the
    chip's flash as a budget beside the user's latency one and prunes until it fits; deploy's
    own compile (which checks the chip) then accepts the result."""
    from edgeprune.compile import compile_model
    from edgeprune.quantize.ptq import quantize_ptq

    chip = (load_target("cortex-m7").path.read_text()
            .replace("flash_bytes = 1_048_576", "flash_bytes = 28_672")
            .replace('name = "cortex-m7"', 'name = "small-m7"'))
    (tmp_path / "small-m7.toml").write_text(chip)
    target = str(tmp_path / "small-m7.toml")
    data = datasets.load("fashion-mnist")
    torch.manual_seed(0)
    model = TinyMLP()
    train(model, data, epochs=0.3, lr=0.05, max_samples=2000)
    example = torch.from_numpy(data.x_train[:1])
    with pytest.raises(EdgepruneError, match="does not fit small-m7 .flash 28672 B"):
        compile_model(str(quantize_ptq(model, (1, 1, 28, 28), data.x_train[:16])
                          .save(tmp_path / "q")), target, tmp_path / "b", log=lambda *a: None)
    r = search(model, example, data, target, {"latency_ms": 1e3}, cache_dir=tmp_path / "c",
               log=lambda *a: None, word_lengths=(8,), **SETTINGS)
    assert r.met, r.message
    assert r.budget == {"latency_ms": 1e3, "flash_kb": 28.0}
    assert r.trajectory[0]["measured"]["flash_kb"] > 28 >= r.measured["flash_kb"]
    qm = quantize_ptq(r.model, (1, 1, 28, 28), data.x_train[:16])
    compile_model(str(qm.save(tmp_path / "q2")), target, tmp_path / "b2", log=lambda *a: None)


@pytest.mark.parametrize("option, message", [
    ({"port": "/dev/ttyACM0"}, "only run them in QEMU"),
    ({"step_schedule": "halving"}, "step schedule 'halving'"),
    ({"rank": "top5"}, "rank 'top5'"),
    ({"distill": 1.5}, "distillation weight 1.5")])
def test_a_bad_option_is_named(tiny, option, message):
    model, example, data, cache = tiny
    with pytest.raises(EdgepruneError, match=message):
        search(model, example, data, "cortex-m7", {"flash_kb": 10}, cache_dir=cache,
               **option, **SETTINGS)


def test_short_finetune_distils_from_the_unpruned_model(tiny):
    """A candidate's short fine-tune with distillation ends closer to the unpruned model's
    outputs than the same fine-tune on labels."""
    from edgeprune.feedback import worker
    from edgeprune.feedback.measure import from_bytes, to_bytes

    model, example, data, _ = tiny
    x = torch.from_numpy(data.x_train[:300])
    with torch.no_grad():
        teacher_logp = torch.log_softmax(model.eval()(x), 1)

    def kl_after(distill):
        worker.init_worker(JobData(data.x_train[:512], data.y_train[:512], data.x_train[-100:],
                                   data.y_train[-100:], data.x_train[:16], data.name,
                                   to_bytes(model), distill))
        blob, _, _ = worker.candidate_job(to_bytes(model), example, {"features.2.0": 0.5}, "l1",
                                          0, 512, 0.01)
        with torch.no_grad():
            logp = torch.log_softmax(from_bytes(blob).eval()(x), 1)
        return torch.nn.functional.kl_div(logp, teacher_logp, reduction="batchmean",
                                          log_target=True).item()
    assert kl_after(1.0) < kl_after(0.0)


def test_an_untrained_teacher_is_not_distilled_from(tiny):
    """The search distils from the unpruned model only when it has learnt something: an
    untrained CNN does not teach (labels only), the same CNN trained does."""
    from edgeprune.feedback.search import _useful_distillation
    _, _, data, _ = tiny
    torch.manual_seed(0)
    model, said = SmallCNN(width=4), []
    assert _useful_distillation(model, data, 500, 0.9, said.append) == 0.0
    assert len(said) == 1 and "without distilling" in said[0]
    train(model, data, epochs=2.0, lr=0.05, max_samples=6000)
    assert _useful_distillation(model, data, 500, 0.9, said.append) == 0.9


def test_quantized_scores_agree_with_the_reference_accuracy(tiny):
    """The loss that ranks candidates comes from the same integer outputs as the accuracy."""
    import numpy as np

    from edgeprune.feedback.worker import quantized_scores
    from edgeprune.quantize import reference
    from edgeprune.quantize.ptq import quantize_ptq

    model, example, data, _ = tiny
    x, y = data.x_test[:300], data.y_test[:300]
    acc, loss = quantized_scores(model, tuple(example.shape), data.x_train[:16], x, y)
    qm = quantize_ptq(model, tuple(example.shape), data.x_train[:16])
    assert acc == reference.accuracy(qm, x, y)
    logits = torch.from_numpy(reference.predict(qm, x)).double()
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y).long()).item()
    assert np.isclose(loss, expected, rtol=1e-9) and 0 < loss < 5


def test_per_layer_bits_in_the_quantize_stage_name_layer_and_bits():
    from edgeprune.quantize.stage import QuantizeConfig, quantize
    data = datasets.load("fashion-mnist")
    target = load_target("cortex-m7")
    model = TinyMLP().eval()
    for bits, match in (({"fc3": 4}, "no conv/linear layer 'fc3'"), ({"fc1": 3}, "'fc1' has 3")):
        with pytest.raises(EdgepruneError, match=match):
            quantize(model, (1, 1, 28, 28), data, target,
                     QuantizeConfig(method="ptq", layer_bits=bits, eval_samples=50,
                                    calib_samples=8), log=lambda *a: None)


def test_a_peak_budget_also_proposes_shrinking_every_group_together():
    """SRAM is a peak over two live tensors of different groups: no group alone reaches the
    step, so the search also proposes every group shrunk together (measured, not predicted)."""
    from edgeprune.feedback.costs import Predictor
    from edgeprune.feedback.search import _propose

    def costs(sram):
        return {"instructions": 1000, "latency_ms": 1.0, "energy_uj": 1.0, "flash_kb": 50.0,
                "sram_kb": sram, "kernels": []}
    base = costs(60.0)
    tables = {"a": {16: base, 8: costs(58.0)}, "b": {32: base, 16: costs(58.0)}}
    pred = Predictor(base, tables, {"a": 16, "b": 32})
    args = (pred, base, {"a": 16, "b": 32}, {}, {}, {"a": 2, "b": 4}, {}, {}, "sram_kb", 50.0,
            {})
    assert all(p.kind == "width" for p in _propose(*args))
    joint = [p for p in _propose(*args, joint=True) if p.kind == "joint"]
    assert len(joint) == 1 and joint[0].widths == {"a": 15, "b": 30}


def test_a_step_that_would_push_another_budget_over_gives_way_to_a_larger_cut():
    """Latency and flash budgets at once, with a flash staircase: one channel less (7) reaches
    the latency step but takes more flash (another kernel), two less (6) take less. The
    proposal is 6, not nothing (a transposed-conv autoencoder's search on the M4 stalled so,
    proposing only its other groups until they were at their minimum)."""
    from edgeprune.feedback.costs import Predictor
    from edgeprune.feedback.search import _propose

    def costs(ms, flash):
        return {"instructions": int(ms * 1000), "latency_ms": ms, "energy_uj": 1.0,
                "flash_kb": flash, "sram_kb": 10.0, "kernels": []}
    base = costs(10.0, 30.0)
    tables = {"t": {8: base, 7: costs(9.0, 31.0), 6: costs(8.5, 29.0), 4: costs(7.0, 27.0)}}
    pred = Predictor(base, tables, {"t": 8})
    proposals = _propose(pred, base, {"t": 8}, {}, {}, {"t": 1}, {}, {}, "latency_ms", 9.5,
                         {"flash_kb": 30.0})
    assert [(p.name, p.widths["t"]) for p in proposals] == [("t", 6)]


def test_a_growth_offers_the_widest_width_predicted_within_every_budget():
    """A group at 4 of 16 channels (step 2) with slack: the widest width predicted within the
    latency and flash aims, a multiple of its step; below a lowered ceiling (a growth that
    measured over the aim), the widest multiple under it; none where nothing fits."""
    from edgeprune.feedback.costs import Predictor
    from edgeprune.feedback.search import _growths

    def costs(ms, flash):
        return {"instructions": int(ms * 1000), "latency_ms": ms, "energy_uj": 1.0,
                "flash_kb": flash, "sram_kb": 10.0, "kernels": []}
    base = costs(16.0, 40.0)
    pred = Predictor(base, {"a": {16: base, 8: costs(8.0, 32.0), 4: costs(4.0, 28.0)}},
                     {"a": 16})
    now, full = costs(4.0, 28.0), {"a": 16}
    args = (pred, now, {"a": 4}, {}, {})
    assert _growths(*args, {"a": 16}, full, {"latency_ms": 11.0, "flash_kb": 40.0},
                    {"a": 2}) == [("a", 10)]
    assert _growths(*args, {"a": 16}, full, {"latency_ms": 11.0, "flash_kb": 33.0},
                    {"a": 2}) == [("a", 8)]
    assert _growths(*args, {"a": 9}, full, {"latency_ms": 11.0, "flash_kb": 40.0},
                    {"a": 2}) == [("a", 8)]
    assert _growths(*args, {"a": 16}, full, {"latency_ms": 4.5, "flash_kb": 40.0},
                    {"a": 2}) == []


@pytest.mark.parametrize("predicted,goal,expected", [
    (9, 720, 8),     # the table's line put 9 within 720; measured at 730, it walks down
    (8, 790, 10),    # 8 undershoots: 9 and 10 reach 790 too, 11 does not
    (11, 400, 6),    # nothing reaches: the lowest width, the largest cut
    (12, 2000, 15),  # every width below the current one reaches: the widest of them
])
def test_a_step_settles_on_the_widest_width_that_measures_within_its_goal(predicted, goal,
                                                                           expected):
    from edgeprune.feedback.search import _walk_measured
    # a staircase like the M7's 28x28 convs: pairs of input channels, blocks of 4 outputs
    cost = {6: 450, 7: 500, 8: 504, 9: 730, 10: 769, 11: 1000, 12: 1047, 13: 1300, 14: 1350,
            15: 1500, 16: 1550}
    asked = []

    def reaches(k):
        asked.append(k)
        return cost[k] <= goal
    assert _walk_measured(predicted, cost[predicted] <= goal, 16, 6, 1, reaches) == expected
    assert len(set(asked)) == len(asked)   # no width measured twice


def test_widths_keep_the_targets_channel_multiple_in_proposals_and_walks():
    """With a multiple of 2, the width proposed is the largest even one predicted to reach
    the step (the table's line predicts 9 would), and the walk on measurements steps by 2:
    a channel that makes a width odd costs the M7 2.5x what one that makes it even does."""
    from edgeprune.feedback.costs import Predictor, grid_widths, min_width
    from edgeprune.feedback.search import _propose, _shrink_together, _walk_measured

    def costs(ms):
        return {"instructions": int(ms * 1000), "latency_ms": ms, "energy_uj": 1.0,
                "flash_kb": 30.0, "sram_kb": 10.0, "kernels": []}
    base = costs(16.0)
    pred = Predictor(base, {"t": {16: base, 8: costs(8.0)}}, {"t": 16})
    args = (pred, base, {"t": 16}, {}, {}, {"t": 2}, {}, {}, "latency_ms", 9.5, {})
    assert [p.widths["t"] for p in _propose(*args)] == [9]
    assert [p.widths["t"] for p in _propose(*args, step_of={"t": 2})] == [8]
    assert _shrink_together({"a": 16, "b": 9}, {"a": 2, "b": 2}, {"a": 2, "b": 2})[0] == \
        {"a": 14, "b": 8}
    cost = {6: 450, 8: 504, 10: 769, 12: 1047, 14: 1350}
    assert _walk_measured(8, True, 16, 2, 2, lambda k: cost[k] <= 790) == 10
    assert _walk_measured(12, False, 16, 2, 2, lambda k: cost[k] <= 790) == 10
    # the measured grid and the minimum are multiples too (the full width may be odd)
    assert grid_widths(16, (0.75, 0.5, 0.25), 0.1, 2) == [2, 4, 8, 12, 16]
    assert grid_widths(15, (0.75, 0.5, 0.25), 0.1, 2) == [2, 4, 8, 12, 15]
    assert min_width(64, 0.1, 2) == 8 and min_width(64, 0.1) == 7 and min_width(3, 0.9, 2) == 3


def test_a_window_pattern_is_proposed_where_measured_to_cut_the_cost():
    """A conv whose measured cost with every 2nd window tap reaches the step is proposed beside
    the widths (kind "taps"), at the densest pattern that reaches it; a layer that already has a
    pattern is not proposed again, and the prediction multiplies the pattern's factor into the
    widths' (per kernel)."""
    from edgeprune.feedback.costs import Predictor
    from edgeprune.feedback.search import _propose

    def costs(kernels, flash=40.0):
        return {"instructions": sum(kernels), "latency_ms": sum(kernels) / 1000,
                "energy_uj": 1.0, "flash_kb": flash, "sram_kb": 10.0, "kernels": kernels}
    base = costs([6000, 4000])
    tables = {"g": {8: base, 4: costs([3000, 2000])}}
    taps = {"conv": {2: costs([3500, 4000], 38.0), 3: costs([2200, 4000], 37.0)}}
    pred = Predictor(base, tables, {"g": 8}, tap_tables=taps)
    assert pred.predict({"g": 4}, taps={"conv": 2})["instructions"] == 3500 / 2 + 2000
    dense, widths = {"conv": 1}, {"g": 8}
    args = (pred, base, widths, {}, dense, {"g": 2}, {}, {"conv": [2, 3]}, "latency_ms")
    taps_at = {g: [p for p in _propose(*args, g, {}) if p.kind == "taps"] for g in (8.0, 6.5)}
    assert [(p.taps, p.label) for p in taps_at[8.0]] == [({"conv": 2}, "conv/2")]
    assert [p.taps for p in taps_at[6.5]] == [{"conv": 3}]   # 2 (7.5 ms) misses the step
    assert all(p.kind != "taps" for p in _propose(pred, base, widths, {}, {"conv": 2},
                                                  {"g": 2}, {}, {"conv": [2, 3]},
                                                  "latency_ms", 8.0, {}))


def test_a_budget_below_the_narrowest_model_is_met_with_window_patterns(tiny, impossible,
                                                                        tmp_path):
    """Below what the narrowest model measures, only skipping window taps is left: with
    tap_strides the search gives a conv 1 in s taps, the int8 kernel skips the others (fewer
    instructions, measured again from scratch), the fine-tunes keep them zero, and ratios.json
    names the pattern for `prune --per-layer`."""
    model, example, data, cache = tiny
    narrowest = impossible.measured["latency_ms"]   # every group at its minimum, every tap
    budget = {"latency_ms": 0.95 * narrowest}
    r = search(model, example, data, "cortex-m7", budget, cache_dir=cache, work_dir=tmp_path,
               log=lambda *a: None, tap_strides=(3,), word_lengths=(8,), **SETTINGS)
    assert r.met, r.message
    assert r.taps and set(r.taps) <= {"features.0.0", "features.2.0"}, r.taps
    for name, s in r.taps.items():
        w = r.model.get_submodule(name).weight.detach()
        used = w.ne(0).any(1).any(0).flatten()
        assert 0 < int(used.sum()) <= -(-9 // s) and not used.all(), (name, used)
    fresh = Runner(JobData(data.x_train[:16], data.y_train[:16], data.x_test[:16],
                           data.y_test[:16], data.x_train[:16]), tmp_path / "fresh", 1)
    target = load_target("cortex-m7")
    again = fresh.measure([r.model], (1, 1, 28, 28), target, toolchain_fingerprint(target))[0]
    fresh.close()
    assert again["instructions"] == r.measured["instructions"]
    assert again["latency_ms"] <= budget["latency_ms"]
    saved = json.loads((tmp_path / "ratios.json").read_text())
    assert saved["tap_strides"] == r.taps and r.record["tap_strides"] == r.taps
    with pytest.raises(EdgepruneError, match="tap strides \\[1\\]"):
        search(model, example, data, "cortex-m7", budget, cache_dir=cache, tap_strides=(1,),
               log=lambda *a: None, **SETTINGS)


@pytest.mark.parametrize("option, value", [("--finetune", "-1"), ("--short-finetune", "0"),
                                           ("--workers", "0")])
def test_the_command_names_a_number_out_of_range(option, value, tmp_path, capsys):
    from edgeprune.cli import main
    rc = main(["feedback", "cnn", "--budget", "latency_ms=1", option, value,
               "--out", str(tmp_path / "o")])
    assert rc == 2 and f"{option} must be at least" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_candidate_without_batchnorm_gets_its_channel_statistics_back(tiny):
    """A model whose BatchNorm an ONNX exporter folded: each candidate's cut is followed by the
    channel-statistics correction that prune's schedules apply (prune.methods), before its
    short fine-tune; a model with BatchNorm is left as the cut made it."""
    from edgeprune.feedback import worker
    from edgeprune.feedback.measure import from_bytes, to_bytes
    from edgeprune.prune import prune
    from edgeprune.prune.methods import correct_channel_statistics, scoring_batches

    _, example, data, _ = tiny
    torch.manual_seed(0)
    folded = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(),
                                 torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                 torch.nn.Linear(8, 10)).eval()
    jd = JobData(data.x_train[:512], data.y_train[:512], data.x_train[-100:],
                 data.y_train[-100:], data.x_train[:16], data.name)
    worker.init_worker(jd)
    blob, _, _ = worker.candidate_job(to_bytes(folded), example, {"0": 0.5}, "l1", 0, 0, 0.01)
    batches, meta = scoring_batches(jd.dataset(), seed=0)
    cut, record = prune(folded, example, criterion="l1", ratios={"*": 0.0, "0": 0.5},
                        data=batches, meta_batch=meta, seed=0)
    plain = copy.deepcopy(cut)
    assert correct_channel_statistics(cut, folded, record["layers"], jd.dataset()) == ["0", "2"]
    x = torch.from_numpy(data.x_test[:8])
    with torch.no_grad():
        torch.testing.assert_close(from_bytes(blob).eval()(x), cut(x))
        assert not torch.allclose(plain(x), cut(x))
