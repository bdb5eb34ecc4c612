"""Every pruning schedule runs on real data with a tiny budget and returns a smaller model whose
record says what was removed, in the original model's channel numbering."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgeprune import data as datasets
from edgeprune import models
from edgeprune.errors import EdgepruneError
from edgeprune.prune import methods


@pytest.fixture(scope="module")
def fmnist():
    return datasets.fashion_mnist()


@pytest.mark.parametrize("method", [m for m in methods.METHODS if m != "lth"])
def test_method_runs_and_shrinks(method, fmnist):
    model, shape = models.build("cnn")
    spec = {"criterion": "l1", "ratios": 0.5}
    accs = []  # methods report the accuracy of the cut model before fine-tuning
    extra = {"aux_steps": 20} if method == "ccp-ac" else {}
    pruned, rec = methods.run(method, model, torch.zeros(shape), fmnist, spec, epochs=1,
                              max_samples=256, evaluate=lambda m: accs.append(1) or 0.0, **extra)
    assert rec["method"] == method and rec["macs_after"] < rec["macs_before"]
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]
    assert accs and rec["acc_before_finetune"] == 0.0
    x = torch.from_numpy(fmnist.x_test[:4])
    assert torch.isfinite(pruned(x)).all()
    for name, layer in rec["layers"].items():  # indices refer to the original model
        if "out_kept" in layer:
            assert max(layer["out_kept"]) < layer["out_before"] == \
                model.get_submodule(name).weight.shape[0]


@pytest.mark.parametrize("criterion", ["taylor", "mfp", "particle"])
def test_data_driven_criteria_score_on_a_training_set_smaller_than_their_batches(criterion,
                                                                                 fmnist):
    small = datasets.Dataset("small", fmnist.x_train[:50], fmnist.y_train[:50],
                             fmnist.x_test[:20], fmnist.y_test[:20])   # ECG200 has 100
    batches, meta = methods.scoring_batches(small)
    seen = np.concatenate([x.numpy() for x, _ in batches] + [meta[0].numpy()])
    assert len(batches) == 4 and len(seen) == 50 and len(np.unique(seen, axis=0)) == 50
    model, shape = models.build("cnn")
    pruned, rec = methods.run("oneshot", model, torch.zeros(shape), small,
                              {"criterion": criterion, "ratios": 0.5}, epochs=0)
    assert [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)] == [4, 8]


def test_iterative_reaches_the_ratio_in_steps(fmnist):
    model, shape = models.build("cnn")
    pruned, rec = methods.run("iterative", model, torch.zeros(shape), fmnist,
                              {"criterion": "l1", "ratios": 0.5}, epochs=0.5, max_samples=256,
                              steps=2)
    assert len(rec["steps"]) == 2
    assert rec["steps"][0]["macs_after"] > rec["steps"][1]["macs_after"] == rec["macs_after"]
    assert len(rec["layers"]["features.0.0"]["out_kept"]) == 4


def test_lottery_ticket_rewinds_to_early_weights(fmnist):
    model, shape = models.build("cnn")
    early = {k: v.clone() for k, v in model.state_dict().items()}
    from edgeprune.train import train
    train(model, fmnist, epochs=1, max_samples=256)
    pruned, rec = methods.run("lth", model, torch.zeros(shape), fmnist,
                              {"criterion": "l1", "ratios": 0.5}, epochs=0,
                              rewind_state=early)
    kept = rec["layers"]["features.0.0"]["out_kept"]
    torch.testing.assert_close(pruned.get_submodule("features.0.0").weight,
                               early["features.0.0.weight"][kept])
    with pytest.raises(EdgepruneError, match="--rewind-from"):
        methods.run("lth", model, torch.zeros(shape), fmnist, {"ratios": 0.5})


def test_training_methods_need_data():
    model, shape = models.build("cnn")
    with pytest.raises(EdgepruneError, match="method 'soft' trains, so it needs --data"):
        methods.run("soft", model, torch.zeros(shape), None, {"ratios": 0.5})


def test_loss_of_a_softmax_model_is_the_cross_entropy_of_its_logits():
    """Fine-tuning a model that ends in a softmax trains on log-probabilities, not on the
    probabilities taken as logits (which barely moves it)."""
    from edgeprune.task import loss as cross_entropy

    z, y = torch.randn(16, 10) * 3, torch.randint(0, 10, (16,))
    want = torch.nn.functional.cross_entropy(z, y)
    torch.testing.assert_close(cross_entropy(z, y), want)
    torch.testing.assert_close(cross_entropy(torch.softmax(z, 1), y), want, atol=1e-5, rtol=1e-5)
    assert cross_entropy(torch.relu(z), y) != want     # non-negative scores are still logits


def test_kernel_wise_pruning_removes_tiles_that_training_keeps_removed():
    """Kernel-wise pruning removes the same input-channel pairs from each block of 4 filters
    (the int8 kernel's tile, which it then skips), the same number in every block; after
    `finalize` (no masks attached) fine-tuning keeps those tiles zero."""
    from edgeprune.data import Dataset
    from edgeprune.prune import patterns
    from edgeprune.train import train

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(5, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    record = patterns.apply(model, kernel_ratio=0.5)
    patterns.finalize(model)
    assert record["0"]["kernel"]["tile"] == [4, 2] and set(record) == {"0", "2"}
    rng = np.random.default_rng(0)
    data = Dataset("d", rng.standard_normal((64, 5, 6, 6)).astype(np.float32),
                   rng.integers(0, 6, 64), None, None)
    train(model, data, epochs=2, lr=0.05)
    for conv, pairs in ((model[0], 3), (model[2], 4)):
        used = conv.weight.detach().ne(0).flatten(2).any(2)          # [O, I] kernels
        o, i = used.shape
        for f0 in range(0, o, 4):
            block = used[f0:f0 + 4]
            assert (block == block[0]).all()                          # one set per block
            kept = [p for p in range(pairs) if block[0, 2 * p:2 * p + 2].any()]
            assert len(kept) == pairs - pairs // 2
            assert all(block[0, 2 * p:2 * p + 2].all() for p in kept if 2 * p + 1 < i)


def test_training_keeps_window_taps_that_every_filter_has_pruned():
    """stride_layers zeroes all but every s-th tap of a conv for good (the offset keeping the
    most weight), and fine-tuning keeps those taps zero: the code generator skips them."""
    from edgeprune.data import Dataset
    from edgeprune.prune.patterns import stride_layers
    from edgeprune.train import train

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    nn.init.zeros_(model[2].weight)   # a zero-initialised conv is not a pattern: it learns
    record = stride_layers(model, {"0": 2})
    kept = record["0"]["intra_kernel"]["kept_positions"]
    assert kept in ([0, 2, 4, 6, 8], [1, 3, 5, 7])
    rng = np.random.default_rng(0)
    data = Dataset("d", rng.standard_normal((64, 2, 6, 6)).astype(np.float32),
                   rng.integers(0, 3, 64), None, None)
    before = model[2].weight.detach().clone()
    train(model, data, epochs=2, lr=0.05)
    w = model[0].weight.detach().flatten(2)
    pruned = [p for p in range(9) if p not in kept]
    assert w[:, :, pruned].abs().max() == 0 and w[:, :, kept].abs().min() > 0
    assert not torch.equal(model[2].weight, before)   # the zero-initialised conv trains
    assert model[2].weight.detach().ne(0).flatten(2).any(1).any(0).all()
    with pytest.raises(EdgepruneError, match="layer 1: an intra-kernel pattern"):
        stride_layers(model, {"1": 2})
    # QAT trains the folded graph's weights, not the Conv2d: the pattern holds there too
    from edgeprune.quantize.ptq import calibrate, extract
    from edgeprune.quantize.qat import qat_finetune
    net = extract(model.eval(), (1, 2, 6, 6))
    qat_finetune(net, data, calibrate(net, data.x_train[:16]), epochs=1, lr=0.05)
    folded = [w for w in net.parameters() if w.dim() == 4 and w.shape[1] == 2]
    assert len(folded) == 1
    assert folded[0].detach().flatten(2)[:, :, pruned].abs().max() == 0
    # and ADMM's low-bit training, with its own loop
    from edgeprune.quantize.admm import admm_train, default_layer_formats
    net = extract(model.eval(), (1, 2, 6, 6))
    codes = admm_train(net, data, default_layer_formats(net, "int", 4), epochs=20, lr=2.0,
                       admm_every=2)
    first = next(q for q, _ in codes.values() if q.shape[1] == 2)
    assert np.abs(first.reshape(*first.shape[:2], -1)[:, :, pruned]).max() == 0

