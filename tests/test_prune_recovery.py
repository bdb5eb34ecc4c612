"""Recovery after a cut: BatchNorm re-estimation keeps the pruned == zeroed equivalence and
replaces stale statistics by the data's; distillation from the unpruned model trains a cut
model on real Fashion-MNIST."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgeprune import data as datasets
from edgeprune import models
from edgeprune.errors import EdgepruneError
from edgeprune.prune import masked_reference, methods, prune
from edgeprune.prune.methods import Recovery, distill_loss, recalibrate_bn


@pytest.fixture(scope="module")
def fmnist():
    return datasets.fashion_mnist()


def _trained_resnet(fmnist):
    torch.manual_seed(0)
    model, shape = models.build("resnet8", fmnist.input_shape, fmnist.num_classes, 0)
    from edgeprune.train import train
    train(model, fmnist, epochs=1, lr=0.05, max_samples=512)
    return model, shape


def test_bn_recalibration_keeps_pruned_equal_to_zeroed(fmnist):
    model, shape = _trained_resnet(fmnist)
    x = torch.from_numpy(fmnist.x_test[:16])
    pruned, record = prune(model, x[:1], "l1", 0.5)
    stale = pruned.get_submodule("layer1.bn2").running_var.clone()
    recalibrate_bn(pruned, fmnist, batches=3, seed=1)
    assert not torch.allclose(pruned.get_submodule("layer1.bn2").running_var, stale)
    reference = copy.deepcopy(model)
    with masked_reference(reference, record["layers"]):  # the same batches, channels zeroed
        recalibrate_bn(reference, fmnist, batches=3, seed=1)
        with torch.no_grad():
            expected = reference.eval()(x)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), expected, rtol=1e-4, atol=1e-4)
    assert not pruned.training and not reference.training


def test_bn_recalibration_uses_batch_statistics(fmnist):
    model, _ = models.build("cnn")
    model.eval()
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    recalibrate_bn(model, fmnist, batches=2, batch_size=64, seed=3)
    idx = np.random.default_rng(3 + 2000).choice(len(fmnist.x_train), 128, replace=False)
    with torch.no_grad():
        feats = [conv(torch.from_numpy(fmnist.x_train[np.sort(idx[i:i + 64])]))
                 for i in (0, 64)]
    means = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, means, rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not model.training  # restored
    for k, v in weights.items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_distill_loss_is_zero_against_itself_and_has_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    kd_only = distill_loss(copy.deepcopy(net), alpha=1.0, temperature=4.0)
    assert float(kd_only(net(x), x, y).detach()) == pytest.approx(0.0, abs=1e-5)
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    mixed = distill_loss(other, alpha=0.5, temperature=4.0)(net(x), x, y)
    mixed.backward()
    assert float(mixed.detach()) > 0 and net[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in other.parameters())


def test_oneshot_with_recovery_records_it(fmnist):
    model, shape = models.build("cnn")
    accs = []
    pruned, rec = methods.run("oneshot", model, torch.zeros(shape), fmnist,
                              {"criterion": "l1", "ratios": 0.5}, epochs=1, max_samples=256,
                              distill=0.9, bn_batches=2, lr=0.02,
                              evaluate=lambda m: accs.append(1) or float(len(accs)))
    assert rec["acc_after_cut"] == 1.0 and rec["acc_before_finetune"] == 2.0
    assert rec["recovery"] == {"bn_batches": 2, "distill_alpha": 0.9, "temperature": 4.0,
                               "lr": 0.02}
    assert torch.isfinite(pruned(torch.from_numpy(fmnist.x_test[:4]))).all()
    _, plain = methods.run("oneshot", model, torch.zeros(shape), fmnist,
                           {"criterion": "l1", "ratios": 0.5}, bn_batches=0,
                           evaluate=lambda m: 0.0)
    assert "acc_after_cut" not in plain and plain["recovery"]["distill_alpha"] == 0.0


@pytest.mark.parametrize("kw, msg", [({"alpha": 1.5}, "alpha 1.5 is outside"),
                                     ({"temperature": 0}, "temperature 0 must be"),
                                     ({"bn_batches": -1}, "batches -1 must be")])
def test_recovery_rejects_bad_settings(kw, msg):
    with pytest.raises(EdgepruneError, match=msg):
        Recovery(**kw)


def test_cli_distill_and_bn_recal_are_recorded(tmp_path, capsys):
    from edgeprune.cli import main
    out = tmp_path / "p"
    assert main(["prune", "cnn", "--ratio", "0.5", "--data", "fashion-mnist", "--finetune", "1",
                 "--max-samples", "256", "--eval-samples", "200", "--train-epochs", "0.02",
                 "--distill", "--finetune-lr", "0.02", "--bn-recal", "2", "--out", str(out)]) == 0
    import json
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["recovery"] == {"bn_batches": 2, "distill_alpha": 0.9, "temperature": 4.0,
                               "lr": 0.02}
    assert set(rec["accuracy"]) >= {"original", "after_cut", "before_finetune", "after"}
    assert main(["prune", "cnn", "--data", "fashion-mnist", "--distill", "--train-epochs",
                 "0.02", "--out", str(tmp_path / "q")]) != 0
    assert "--distill acts while fine-tuning" in capsys.readouterr().err


def test_a_fine_tune_that_diverges_is_retried_at_a_tenth_of_the_rate():
    """TFLite Micro's hello-world sine MLP (1 -> 16 -> 16 -> 1, inputs up to 2 pi): SGD at the
    fine-tuning rate 0.01 kills its ReLUs (R² ~ 0); the fine-tune goes back to the cut model
    and trains again at 0.001, ending above where the cut left it."""
    from edgeprune.train import evaluate, train_or_retry

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 2 * np.pi, (1200, 1)).astype(np.float32)
    y = (np.sin(x) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    data = datasets.Dataset("sine", x[:1000], y[:1000], x[1000:], y[1000:])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    X, Y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    for _ in range(2000):
        j = torch.randint(0, 1000, (32,))
        loss = nn.functional.mse_loss(model(X[j]), Y[j])
        opt.zero_grad(), loss.backward(), opt.step()
    cut, _ = prune(model.eval(), X[:1], "l1", 0.5)
    at_cut = evaluate(cut, data.x_test, data.y_test)
    assert train_or_retry(copy.deepcopy(cut), data, 0.01, epochs=1) == pytest.approx(0.001)
    pruned, _ = methods.run("oneshot", model, X[:1], data, {"criterion": "l1", "ratios": 0.5},
                            epochs=1)
    assert evaluate(pruned, data.x_test, data.y_test) > at_cut > 50


def test_a_regression_fine_tune_is_not_slowed_by_small_target_units():
    """Targets in [0, 1] pixel units (MSE ~0.01) shrink a trained model's hidden-layer
    gradients by their variance: fine-tuning a cut super-resolution net on the plain MSE
    (train(from_scratch=True)) recovers much less in the same half epoch than on the MSE over
    the targets' variance (1 - R²), which fine-tuning uses."""
    import torch.nn.functional as F

    from edgeprune import task
    from edgeprune.train import evaluate, train

    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def draw(n):   # smooth 8x8 images; the target is their 16x16 upsampling
        lo = torch.from_numpy(rng.random((n, 1, 4, 4)).astype(np.float32))
        x = F.interpolate(lo, size=8, mode="bilinear", align_corners=False)
        y = F.interpolate(lo, size=16, mode="bicubic", align_corners=False).clamp(0, 1)
        return x.numpy(), y.numpy()
    x, y = draw(2000)
    xt, yt = draw(300)
    assert task.loss_scale(y) > 10 and task.loss_scale(np.arange(3)) == 1.0
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(16, 4, 3, padding=1), nn.PixelShuffle(2))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(15):
        for i in range(0, len(x), 50):
            loss = F.mse_loss(model(torch.from_numpy(x[i:i + 50])), torch.from_numpy(y[i:i + 50]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert evaluate(model.eval(), xt, yt) > 95
    cut, _ = prune(model, torch.zeros(1, 1, 8, 8), criterion="l1", ratios=0.5)
    ds = datasets.Dataset("blobs", x, y, xt, yt)
    r2 = {}
    for plain in (False, True):
        m = copy.deepcopy(cut)
        train(m, ds, epochs=0.5, lr=methods.FINETUNE_LR, from_scratch=plain)
        r2[plain] = evaluate(m, xt, yt)
    assert r2[False] > 70 and r2[False] > r2[True] + 8, r2


def test_a_model_without_batchnorm_gets_its_channel_statistics_back_after_a_cut(fmnist):
    """An ONNX exporter folds BatchNorm into the convs, so there is nothing to re-estimate
    after a cut: instead every conv/linear but the output layer is corrected, per kept
    channel, to the mean and standard deviation that channel had before the cut (on the same
    samples), and the cut model's accuracy moves back towards the unpruned one's."""
    from edgeprune.train import evaluate, train

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 49, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    train(model, fmnist, epochs=1, lr=0.05, max_samples=2000, from_scratch=True)
    few = datasets.Dataset("few", fmnist.x_train[:256], fmnist.y_train[:256], fmnist.x_test,
                           fmnist.y_test)
    x = torch.from_numpy(few.x_train)
    cut, rec = prune(model, x[:1], criterion="l1", ratios=0.6)
    acc = {"before": evaluate(model, fmnist.x_test[:1000], fmnist.y_test[:1000]),
           "cut": evaluate(cut, fmnist.x_test[:1000], fmnist.y_test[:1000])}
    corrected = methods.correct_channel_statistics(cut, model, rec["layers"], few)
    acc["corrected"] = evaluate(cut, fmnist.x_test[:1000], fmnist.y_test[:1000])
    assert corrected == ["0", "3", "7"], corrected   # not the output layer "9"

    def moments(m, layer, channels=None):
        out = {}
        h = dict(m.named_modules())[layer].register_forward_hook(
            lambda mod, a, o: out.__setitem__("o", o))
        with torch.no_grad():
            m(x)
        h.remove()
        o = out["o"] if channels is None else out["o"][:, channels]
        dims = [d for d in range(o.dim()) if d != 1]
        return torch.stack([o.mean(dims), o.std(dims, unbiased=False)])
    for layer in corrected:
        torch.testing.assert_close(moments(cut, layer),
                                   moments(model, layer, rec["layers"][layer]["out_kept"]),
                                   atol=1e-4, rtol=1e-3)
    assert acc["corrected"] > acc["cut"] + 5, acc

    _, record = methods.run("oneshot", model, x[:1], few, {"criterion": "l1", "ratios": 0.6})
    assert record["statistics_corrected_layers"] == 3
    assert "bn_recalibrated_batches" not in record
