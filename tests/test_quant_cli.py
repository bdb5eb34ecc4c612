"""`edgeprune quantize` end to end (quantize -> compile -> QEMU, bit-exact), mixed precision,
and bad input."""

import json

import pytest
import torch

from edgeprune import data, models
from edgeprune.cli import main
from edgeprune.load import save_torch
from edgeprune.quantize import mixed, ptq, qmodel
from edgeprune.quantize.train_utils import quick_train

torch.set_num_threads(1)
# A zoo model is trained on Fashion-MNIST before quantizing (cached under ~/.cache/edgeprune).
ZOO_ARGS = ["--train-epochs", "0.1", "--eval-samples", "300", "--calib-samples", "256"]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def fmnist():
    return data.load("fashion-mnist")


@pytest.fixture(scope="module")
def cnn(fmnist):
    model, shape = models.build("cnn")
    quick_train(model, fmnist, samples=6000, epochs=1.0, lr=0.1)
    return model, shape


def test_pow2_admm_cli_to_qemu_bit_exact(tmp_path, capsys):
    q, b = tmp_path / "q", tmp_path / "b"
    rc, out, _ = _cli(capsys, "quantize", "cnn", "--target", "cortex-m7", "--data",
                      "fashion-mnist", "--out", q, "--format", "pow2",   # auto: ADMM
                      "--epochs", "0.05", "--train-samples", "4000", *ZOO_ARGS, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report == json.loads((q / "quantize.json").read_text())
    assert report["method"] == "admm"
    layers = {r["layer"]: r for r in report["layers"]}
    formats = [(r["weight_format"], r["weight_bits"]) for r in report["layers"]]
    assert formats[0] == formats[-1] == ("int", 8) and ("pow2", 4) in formats
    assert report["weight_bytes"] == sum(r["weight_bytes"] for r in layers.values())
    assert report["weight_bytes"] < report["weight_bytes_int8"]
    assert report["accuracy"]["float"] > 30 and report["accuracy"]["quantized"] > 20
    assert sorted(p.name for p in q.iterdir()) == ["qmodel.json", "quantize.json", "weights.npz"]

    assert _cli(capsys, "compile", q, "--out", b, "--force", "--json")[0] == 0
    rc, out, _ = _cli(capsys, "simulate", b, "--samples", 100, "--json")
    sim = json.loads(out)
    assert rc == 0 and sim["kind"] == "int" and sim["samples"] == 100
    assert sim["mismatches"] == 0 and sim["outputs_match"]
    # the pow2 layers run in the fast kernels, their packed 4-bit codes widened per channel
    # block (ep_widen_sub; ep_code decodes +-2**k), not in TVM's lowering of the TE kernel
    src = (b / "c_library" / "kernels.c").read_text()
    assert "packed4_pow2" not in src and "ep_widen_sub" in src



@pytest.mark.slow
@pytest.mark.parametrize("name", models.zoo_names())
def test_every_zoo_model_int8_bit_exact_on_100_real_samples(name, tmp_path, capsys):
    # The acceptance, through the CLI: trained zoo model (1 epoch, cached), default
    # quantization, TVM C on the Cortex-M7 in QEMU against the golden model.
    q, b = tmp_path / "q", tmp_path / "b"
    assert _cli(capsys, "quantize", name, "--target", "cortex-m7", "--data", "fashion-mnist",
                "--out", q)[0] == 0
    assert _cli(capsys, "compile", q, "--out", b, "--force")[0] == 0
    rc, out, _ = _cli(capsys, "simulate", b, "--samples", 100, "--json")
    sim = json.loads(out)
    assert rc == 0 and sim["samples"] == 100 and sim["mismatches"] == 0

def test_cli_refuses_bad_input_and_keeps_existing_out(tmp_path, capsys, cnn):
    model, shape = cnn
    q = tmp_path / "q"
    q.mkdir()
    (q / "mine.txt").write_text("keep me")
    pt = tmp_path / "cnn.pt"
    save_torch(model, shape, pt)

    def fails(*argv, match):
        rc, _, err = _cli(capsys, "quantize", *argv)
        assert rc == 2, err
        assert match in err, err
    fails(pt, "--out", q, match="exists (a file, or a folder that is not empty); pass --force")
    assert (q / "mine.txt").read_text() == "keep me"
    out = tmp_path / "o"
    fails(tmp_path / "nope.pt", "--out", out, match="nope.pt does not exist")
    fails(pt, "--out", out, "--data", "cifar", match="unknown dataset 'cifar'")
    fails(pt, "--out", out, "--bits", "3", match="--bits 3")
    fails(pt, "--out", out, "--format", "pow2", "--method", "ptq", match="needs --method admm")
    fails(pt, "--out", out, "--format", "pow2", "--bits", "2", "--method", "admm",
          match="pow2 uses 4-bit codes")
    fails(pt, "--out", out, "--bits", "4", "--method", "qat", match="QAT fine-tunes 8-bit")
    fails(pt, "--out", out, "--input-shape", "1,1,32,32", match="fashion-mnist samples are")
    fails(pt, "--out", out, "--method", "admm", match="--method admm needs low-bit weights")
    target = tmp_path / "tiny-m.toml"
    from edgeprune.targets import TARGETS_DIR
    target.write_text((TARGETS_DIR / "cortex-m7.toml").read_text()
                      .replace('name = "cortex-m7"', 'name = "tiny-m"')
                      .replace("weight_bits = [8, 4, 2]", "weight_bits = [8]"))
    fails(pt, "--out", out, "--target", target, "--bits", "4", "--method", "ptq",
          match="4-bit weights are not among its [quant] weight_bits [8]")
    assert not out.exists()
    assert not list(tmp_path.glob(".*tmp*"))     # nothing half-written left behind
    bad = tmp_path / "lp.pt"
    save_torch(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.LPPool2d(2, 2)),
               shape, bad)
    fails(bad, "--out", out,
          match="(call_module LPPool2d): not supported by the quantizer")
    assert not out.exists()


def test_pt_file_ptq_and_qmodel_loads(tmp_path, capsys, cnn):
    model, shape = cnn
    pt = tmp_path / "cnn.pt"
    save_torch(model, shape, pt)
    rc, out, _ = _cli(capsys, "quantize", pt, "--out", tmp_path / "q", "--method", "ptq",
                      "--eval-samples", 500, "--calib-samples", 200)
    assert rc == 0 and "ptq:" in out
    report = json.loads((tmp_path / "q" / "quantize.json").read_text())
    a = report["accuracy"]
    assert a["float"] > 50 and abs(a["float"] - a["quantized"]) <= 2.0, a
    qm = qmodel.load(tmp_path / "q")
    assert [r["weight_bits"] for r in qm.layer_table()] == [8, 8, 8]

    # --layer-bits: the feedback loop's ratios.json (its "bits") sets one layer's word length
    layer = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    (tmp_path / "ratios.json").write_text(json.dumps({"ratios": {}, "bits": {layer: 4}}))
    rc, _, _ = _cli(capsys, "quantize", pt, "--out", tmp_path / "q4", "--method", "ptq",
                    "--eval-samples", 200, "--calib-samples", 200,
                    "--layer-bits", tmp_path / "ratios.json")
    assert rc == 0
    assert [r["weight_bits"] for r in qmodel.load(tmp_path / "q4").layer_table()] == [8, 8, 4]
    rc, _, _ = _cli(capsys, "quantize", pt, "--out", tmp_path / "q2", "--method", "ptq",
                    "--eval-samples", 200, "--calib-samples", 200,
                    "--layer-bits", json.dumps({layer: 2}))     # inline
    assert rc == 0
    assert [r["weight_bits"] for r in qmodel.load(tmp_path / "q2").layer_table()] == [8, 8, 2]
    (tmp_path / "bad.json").write_text(json.dumps({layer: "four"}))
    rc, _, err = _cli(capsys, "quantize", pt, "--out", tmp_path / "qb",
                      "--layer-bits", tmp_path / "bad.json")
    assert rc == 2 and "--layer-bits" in err and "integer bits" in err


def _mixed_setup(fmnist, cnn):
    model, shape = cnn
    net = ptq.extract(model, shape)
    ranges = ptq.calibrate(net, fmnist.x_train[:256])
    x, y = fmnist.x_test[1000:1300], fmnist.y_test[1000:1300]
    float_acc = 100.0 * float((mixed.float_outputs(net, x).argmax(1) == y).mean())
    return net, ranges, x, y, float_acc


def test_mixed_precision_follows_sensitivity_and_budget(fmnist, cnn):
    net, ranges, x, y, float_acc = _mixed_setup(fmnist, cnn)
    names = [n.name for n in net.weight_nodes()]
    # a generous budget lowers every inner layer to the fewest bits the target offers
    wcfg, _, rec = mixed.choose(net, ranges, x, y, float_acc, [8, 4, 2], [8], max_drop=100.0)
    assert wcfg[names[0]] == wcfg[names[-1]] == ("int", 8)
    assert all(wcfg[n] == ("int", 2) for n in names[1:-1])
    # sensitivity grows as bits shrink, for every layer
    sens = {(r["layer"], r["bits"]): r["sensitivity"] for r in rec["weights"]}
    for n in names[1:-1]:
        assert sens[(n, 4)] < sens[(n, 2)]
    # no budget: only moves that keep the tuning accuracy are taken
    wcfg0, _, rec0 = mixed.choose(net, ranges, x, y, float_acc, [8, 4, 2], [8], max_drop=0.0)
    assert rec0["final_accuracy"] >= rec0["int8_accuracy"]
    kept = [r for r in rec0["weights"] if r["kept"]]
    assert all(wcfg0[r["layer"]] in {("int", 4), ("int", 2)} for r in kept)
    # the target's word lengths bound the choice
    wcfg8, _, _ = mixed.choose(net, ranges, x, y, float_acc, [8], [8], max_drop=100.0)
    assert set(wcfg8.values()) == {("int", 8)}
    assert mixed.weight_options([8, 4, 2], "pow2") == [("pow2", 4), ("int", 2)]


def test_mixed_precision_promotes_activations_to_int16(fmnist, cnn):
    net, ranges, x, y, float_acc = _mixed_setup(fmnist, cnn)
    # an impossible float gap forces promotions; each must move the outputs towards float
    _, act, rec = mixed.choose(net, ranges, x, y, float_acc + 50.0, [8], [8, 16], max_drop=0.0,
                               max_int16=2)
    assert len(act) == 2 and set(act.values()) == {"int16"}
    qm8 = ptq.to_qmodel(net, ranges)
    qm16 = ptq.to_qmodel(net, ranges, act_dtypes=act)
    yf = mixed.float_outputs(net, x)
    err = {k: float(((mixed._outputs(q, x) - yf) ** 2).sum()) for k, q in (("8", qm8), ("16", qm16))}
    assert err["16"] < err["8"]
    assert all(qm16.tensors[t].dtype == "int16" for t in act)
    _, act8, _ = mixed.choose(net, ranges, x, y, float_acc + 50.0, [8], [8], max_drop=0.0)
    assert act8 == {}



def test_auto_fine_tunes_with_qat_when_ptq_loses_accuracy(fmnist, cnn):
    from edgeprune.quantize.stage import QuantizeConfig, quantize
    from edgeprune.targets import load_target

    model, shape = cnn
    # one calibration image with clipped ranges: PTQ loses accuracy, so auto runs QAT
    cfg = QuantizeConfig(calib_samples=1, calib_method="percentile", max_drop=0.0,
                         eval_samples=300, epochs=0.05)
    qm, report = quantize(model, shape, fmnist, load_target("cortex-m7"), cfg, log=lambda m: None)
    acc = report["accuracy"]
    assert acc["by_method"]["ptq"] < acc["float"]
    assert set(acc["by_method"]) == {"ptq", "qat"}
    assert acc["quantized"] == max(acc["by_method"].values())
    assert report["method"] == qm.meta["method"] == max(acc["by_method"], key=acc["by_method"].get)


def test_mixed_precision_on_a_small_test_split_tunes_on_training_samples(fmnist, cnn):
    """Every test sample scored (the default --eval-samples exceeds a small set's): the word
    lengths are chosen on the training split's last samples instead of refusing."""
    from edgeprune.quantize.stage import QuantizeConfig, quantize
    from edgeprune.targets import load_target

    model, shape = cnn
    small = data.Dataset("small", fmnist.x_train[:3000], fmnist.y_train[:3000],
                         fmnist.x_test[:200], fmnist.y_test[:200])
    said = []
    cfg = QuantizeConfig(method="ptq", mixed=True, calib_samples=64, tune_samples=100)
    qm, report = quantize(model, shape, small, load_target("cortex-m7"), cfg, log=said.append)
    assert any("tunes on the last 100 training samples" in m for m in said)
    assert report["accuracy"]["quantized"] > 50


def test_int16_activations_and_int4_weights_bit_exact_in_qemu(tmp_path, fmnist, cnn):
    from edgeprune.compile import compile_model
    from edgeprune.simulate import simulate

    model, shape = cnn
    qm = ptq.quantize_ptq(model, shape, fmnist.x_train[:200],
                          weight_cfg={"features_2_0": ("int", 4), "fc": ("ternary", 2)},
                          act_dtypes={"input": "int16", "features_0_0": "int16"})
    qm.save(tmp_path / "q")
    compile_model(str(tmp_path / "q"), "cortex-m7", tmp_path / "b", log=lambda *a: None)
    sim, _ = simulate(tmp_path / "b", fmnist.x_test[:20])
    assert sim["mismatches"] == 0 and sim["samples"] == 20
