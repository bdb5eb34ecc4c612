"""`edgeprune prune` end to end: the three output files, refusal to overwrite, ONNX in and out,
clear errors naming the file or layer, and a pruned model that compiles and runs in QEMU."""

import json
import re

import numpy as np
import pytest
import torch

from edgeprune.cli import main
from edgeprune.errors import EdgepruneError
from edgeprune.load import load_torch
from edgeprune.onnx_to_torch import onnx_to_torch


def _prune(*args):
    return main(["prune", *map(str, args)])


@pytest.fixture(scope="module")
def pruned_cnn(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "p"
    assert _prune("cnn", "--criterion", "l1", "--ratio", "0.5", "--out", out) == 0
    return out


def test_writes_smaller_model_onnx_and_record(pruned_cnn):
    assert sorted(p.name for p in pruned_cnn.iterdir()) == ["model.onnx", "model.pt",
                                                            "pruning.json"]
    rec = json.loads((pruned_cnn / "pruning.json").read_text())
    conv = rec["layers"]["features.0.0"]
    assert conv["out_before"] == 8 and len(conv["out_kept"]) == 4 and len(conv["scores"]) == 8
    assert rec["layers"]["features.2.0"]["in_kept"] == conv["out_kept"]
    assert rec["macs_after"] < rec["macs_before"] and rec["criterion"] == "l1"
    model, shape = load_torch(str(pruned_cnn / "model.pt"))
    assert shape == (1, 1, 28, 28)
    assert model.get_submodule("features.0.0").out_channels == 4 and model.fc.in_features == 8


def test_onnx_round_trip_keeps_the_outputs(pruned_cnn):
    model, _ = load_torch(str(pruned_cnn / "model.pt"))
    back, shape = onnx_to_torch(pruned_cnn / "model.onnx")
    x = torch.rand(shape)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), atol=1e-5, rtol=1e-4)
    convs = [m for m in back.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [4, 8]


def test_refuses_to_overwrite_without_force(pruned_cnn, capsys):
    before = (pruned_cnn / "pruning.json").read_text()
    assert _prune("cnn", "--criterion", "random", "--out", pruned_cnn) == 2
    assert "--force" in capsys.readouterr().err
    assert (pruned_cnn / "pruning.json").read_text() == before
    assert _prune("cnn", "--criterion", "random", "--out", pruned_cnn, "--force") == 0
    assert json.loads((pruned_cnn / "pruning.json").read_text())["criterion"] == "random"


def test_pruned_onnx_compiles_and_runs_in_qemu(pruned_cnn, tmp_path, capsys):
    build = tmp_path / "build"
    assert main(["compile", str(pruned_cnn / "model.onnx"), "--out", str(build)]) == 0
    capsys.readouterr()
    assert main(["simulate", str(build), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs_match"] is True


def test_onnx_input_with_per_layer_ratios_and_flops_target(tmp_path):
    """ONNX in: converted to torch, pruned with per-layer ratios scaled to a MACs target,
    exported back."""
    import onnx

    from edgeprune.frontend import to_onnx
    onnx.save(to_onnx("resnet8"), str(tmp_path / "r8.onnx"))
    src, shape = onnx_to_torch(tmp_path / "r8.onnx")
    convs = [n for n, m in src.named_modules() if isinstance(m, torch.nn.Conv2d)]
    ratios = tmp_path / "ratios.json"
    ratios.write_text(json.dumps({"*": 0.5, convs[1]: 0.25}))
    out = tmp_path / "p"
    assert _prune(tmp_path / "r8.onnx", "--criterion", "fpgm", "--flops-target", "0.5",
                  "--per-layer", ratios, "--out", out) == 0
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["macs_after"] <= 0.5 * rec["macs_before"]
    back, _ = onnx_to_torch(out / "model.onnx")
    pruned, _ = load_torch(str(out / "model.pt"))
    x = torch.rand(shape)
    with torch.no_grad():
        torch.testing.assert_close(back(x), pruned(x), atol=1e-5, rtol=1e-4)


def test_data_criterion_and_finetune_with_real_data(tmp_path):
    out = tmp_path / "p"
    assert _prune("cnn", "--criterion", "taylor", "--ratio", "0.25", "--data", "fashion-mnist",
                  "--finetune", "1", "--max-samples", "256", "--eval-samples", "200",
                  "--train-epochs", "0.02",
                  "--kernel-ratio", "0.5", "--intra-stride", "2", "--out", out) == 0
    rec = json.loads((out / "pruning.json").read_text())
    acc = rec["accuracy"]
    assert acc["samples"] == 200 and acc["dataset"] == "fashion-mnist"
    assert all(0 <= acc[k] <= 100 for k in ("original", "before_finetune", "after"))
    # kernel-wise and strided patterns are recorded and hold in the fine-tuned weights
    pat = rec["patterns"]["features.2.0"]
    model, _ = load_torch(str(out / "model.pt"))
    w = model.get_submodule("features.2.0").weight.detach()
    for f, kept in enumerate(pat["kernel"]["kept_inputs"]):
        dropped = sorted(set(range(w.shape[1])) - set(kept))
        assert (w[f, dropped] == 0).all()
    taps = w.flatten(2)[:, :, [p for p in range(9) if p not in pat["intra_kernel"]["kept_positions"]]]
    assert pat["intra_kernel"]["stride"] == 2 and (taps == 0).all()


def test_a_file_without_an_input_shape_takes_the_datas(tmp_path):
    import torch.nn as nn
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    pt = tmp_path / "bare.pt"
    torch.save(model, pt)                     # no input shape stored: --data gives one
    assert _prune(pt, "--ratio", "0.5", "--data", "fashion-mnist", "--eval-samples", "50",
                  "--out", tmp_path / "p") == 0
    pruned, shape = load_torch(str(tmp_path / "p" / "model.pt"))
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert shape == (1, 1, 28, 28) and [c.out_channels for c in convs] == [4, 4]
    # channels-last images (Keras, PIL) for this NCHW model: its shape is theirs, moved
    _, shape = load_torch(str(pt), data_shape=(1, 28, 28, 1))
    assert shape == (1, 1, 28, 28)
    # grey images without a channel axis (Keras' mnist.npz) get one
    assert load_torch(str(pt), data_shape=(1, 28, 28))[1] == (1, 1, 28, 28)
    # accelerometer traces as (L, C) rows (TFLite Micro's magic wand) for a Conv1d model,
    # which runs lifted to 2-D
    wand = nn.Sequential(nn.Conv1d(3, 8, 4), nn.ReLU(), nn.AdaptiveMaxPool1d(1), nn.Flatten(),
                         nn.Linear(8, 4))
    torch.save(wand, tmp_path / "wand.pt")
    assert load_torch(str(tmp_path / "wand.pt"), data_shape=(1, 128, 3))[1] == (1, 3, 1, 128)
    # and on signals stored lifted, (C, 1, L), as the named ecg200 keeps them
    assert load_torch(str(tmp_path / "wand.pt"), data_shape=(1, 3, 1, 96))[1] == (1, 3, 1, 96)
    with pytest.raises(EdgepruneError, match=r"channels-last samples\?.*--input-shape 1,1,28,28"):
        load_torch(str(pt), input_shape=(1, 28, 28, 1))


def test_a_model_on_token_indices_names_its_embedding(tmp_path):
    import torch.nn as nn
    torch.save(nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(160, 3)),
               tmp_path / "text.pt")
    with pytest.raises(EdgepruneError, match=r"layer '0' \(Embedding\) reads integer indices"):
        load_torch(str(tmp_path / "text.pt"), input_shape=(1, 20))


def test_a_half_precision_model_loads_as_float32(tmp_path):
    """A model saved after mixed-precision training (.half()) runs in float32 like any other."""
    import torch.nn as nn
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 26 * 26, 10))
    torch.save(model.half(), tmp_path / "half.pt")
    loaded, shape = load_torch(str(tmp_path / "half.pt"), data_shape=(1, 1, 28, 28))
    assert shape == (1, 1, 28, 28)
    assert {t.dtype for t in [*loaded.parameters(), *loaded.buffers()]
            if t.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("args, message", [
    (["--criterion", "taylor"], "criterion 'taylor' needs data"),
    (["--ratio", "1.0"], r"--ratio 1.0 is outside \[0, 1\)"),
    (["--finetune", "1"], "--finetune needs training data"),
    (["--round-to", "0"], "--round-to must be at least 1, got 0"),
    (["--data", "fashion-mnist", "--input-shape", "1,1,32,32"],
     r"cnn takes samples of shape \[1, 32, 32\].*are \[1, 28, 28\]"),
])
def test_bad_input_is_a_clear_error(args, message, tmp_path, capsys):
    assert _prune("cnn", *args, "--out", tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert re.search(message, err)
    assert not (tmp_path / "p").exists()


def test_per_layer_file_errors_name_the_file_or_layer(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _prune("resnet8", "--per-layer", bad, "--out", tmp_path / "p") == 2
    assert str(bad) in capsys.readouterr().err
    missing = tmp_path / "missing.json"
    assert _prune("resnet8", "--per-layer", missing, "--out", tmp_path / "p") == 2
    assert str(missing) in capsys.readouterr().err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"layer9.conv": 0.5}))
    assert _prune("resnet8", "--per-layer", unknown, "--out", tmp_path / "p") == 2
    err = capsys.readouterr().err
    assert "'layer9.conv'" in err and "layer1.conv1" in err


def test_missing_model_file_is_named(tmp_path, capsys):
    assert _prune(tmp_path / "nope.pt", "--out", tmp_path / "p") == 2
    assert "nope.pt" in capsys.readouterr().err


def test_ratio_is_the_default_for_layers_the_file_does_not_name(tmp_path, capsys):
    ratios = tmp_path / "ratios.json"
    ratios.write_text(json.dumps({"ratios": {"layer1.conv1": 0.5},   # the feedback loop's form
                                  "tap_strides": {"layer2.conv2": 2}}))
    out = tmp_path / "p"
    assert _prune("resnet8", "--per-layer", ratios, "--ratio", "0.25", "--out", out) == 0
    model, _ = load_torch(str(out / "model.pt"))
    assert model.get_submodule("layer1.conv1").out_channels == 8
    assert model.get_submodule("layer2.conv1").out_channels == 24
    # the loop's intra-kernel pattern comes with the file: 1 in 2 window taps of layer2.conv2
    taps = model.get_submodule("layer2.conv2").weight.detach().ne(0).any(1).any(0).flatten()
    assert taps.sum() in (4, 5) and not taps.all()
    pattern = json.loads((out / "pruning.json").read_text())["patterns"]["layer2.conv2"]
    assert pattern["intra_kernel"]["stride"] == 2
    ratios.write_text(json.dumps({"ratios": {"layer1.conv1": 0.5}, "tap_strides": {"x": 0}}))
    assert _prune("resnet8", "--per-layer", ratios, "--out", tmp_path / "q") == 2
    assert "tap_strides must be" in capsys.readouterr().err
    # the same map given inline
    assert _prune("resnet8", "--per-layer", '{"layer1.conv1": 0.5}', "--ratio", "0", "--out",
                  tmp_path / "r") == 0
    model, _ = load_torch(str(tmp_path / "r" / "model.pt"))
    assert [model.get_submodule(f"layer{i}.conv1").out_channels for i in (1, 2)] == [8, 32]
    # --round-to: 16 channels at 0.3 keep 11 (a fraction rounds to whole channels), or 12
    for m, want in (("1", 11), ("4", 12)):
        assert _prune("resnet8", "--ratio", "0.3", "--round-to", m, "--out",
                      tmp_path / f"s{m}") == 0
        model, _ = load_torch(str(tmp_path / f"s{m}" / "model.pt"))
        assert model.get_submodule("layer1.conv1").out_channels == want


def test_lottery_ticket_rewinds_from_a_file(tmp_path):
    model, _ = load_torch("cnn")
    torch.save(model.state_dict(), tmp_path / "early.pt")
    out = tmp_path / "p"
    assert _prune("cnn", "--method", "lth", "--rewind-from", tmp_path / "early.pt", "--data",
                  "fashion-mnist", "--eval-samples", "100", "--train-epochs", "0.02",
                  "--out", out) == 0
    pruned, _ = load_torch(str(out / "model.pt"))
    kept = json.loads((out / "pruning.json").read_text())["layers"]["features.0.0"]["out_kept"]
    torch.testing.assert_close(pruned.get_submodule("features.0.0").weight,
                               model.get_submodule("features.0.0").weight[kept])


@pytest.mark.parametrize("auto_pad, stride", [("SAME_UPPER", 2), ("SAME_LOWER", 2),
                                              ("SAME_UPPER", 1), ("VALID", 2)])
def test_onnx_conv_auto_pad_converts(tmp_path, auto_pad, stride):
    """Convs exported with auto_pad (TensorFlow's SAME/VALID) get the same explicit pads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=auto_pad, strides=[stride] * 2,
                            kernel_shape=[3, 3])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2, 9, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", "c", "h", "w"])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(tmp_path / "c.onnx"))
    x = rng.standard_normal((1, 2, 9, 8)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    back, _ = onnx_to_torch(tmp_path / "c.onnx")
    got = back(torch.from_numpy(x)).detach().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("op, auto_pad, kernel, stride", [
    ("MaxPool", "SAME_UPPER", 2, 2), ("MaxPool", "SAME_UPPER", 3, 2), ("MaxPool", "VALID", 3, 2),
    ("AveragePool", "SAME_UPPER", 3, 1), ("AveragePool", "VALID", 2, 2),
    ("AveragePool", "SAME_UPPER", 2, 2), ("AveragePool", "SAME_UPPER", 3, 2)])
def test_onnx_pool_auto_pad_converts(tmp_path, op, auto_pad, kernel, stride):
    """Pools exported with auto_pad (Keras padding='same' through tf2onnx) get explicit pads:
    -inf for max pools (asymmetric ones as a pad before the pool), uncounted for averages
    (uneven ones as torch's ceil_mode windows).
    (No SAME_LOWER case: onnx.reference gives those pools floor(size / stride) outputs, not the
    ceil the ONNX spec says.)"""
    import onnx
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    node = helper.make_node(op, ["x"], ["y"], auto_pad=auto_pad, strides=[stride] * 2,
                            kernel_shape=[kernel] * 2)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2, 9, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", "c", "h", "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(tmp_path / "p.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 2, 9, 8)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    back, _ = onnx_to_torch(tmp_path / "p.onnx")
    got = back(torch.from_numpy(x)).detach().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_onnx_average_pool_with_pads_it_cannot_place_is_named(tmp_path):
    """Uncounted end pads longer than a window can reach from the begin pads (stride 1)."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("AveragePool", ["x"], ["y"], name="pool_pads", pads=[0, 0, 2, 2],
                            strides=[1, 1], kernel_shape=[3, 3])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2, 9, 9])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["n", "c", "h", "w"])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]),
              str(tmp_path / "p.onnx"))
    with pytest.raises(EdgepruneError, match=r"'pool_pads' .AveragePool.: asymmetric pads "
                                             r"\[0, 0, 2, 2\]"):
        onnx_to_torch(tmp_path / "p.onnx")


def test_bn_scale_on_a_model_without_batchnorm_says_l1_scored_it(tmp_path, capsys):
    """An eval-mode ONNX export folds BatchNorm into the convs: bn-scale has nothing to read,
    falls back to L1 per group (recorded), and the command says so and how to keep it."""
    import torch.nn as nn

    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    torch.onnx.export(model.eval(), (torch.zeros(1, 1, 12, 12),), str(tmp_path / "m.onnx"),
                      dynamo=False)
    assert _prune(tmp_path / "m.onnx", "--criterion", "bn-scale", "--ratio", "0.5",
                  "--out", tmp_path / "p") == 0
    out = capsys.readouterr()
    log = out.out + out.err
    assert "bn-scale: 1 of 1 channel groups have no BatchNorm, L1 scored them" in log, log
    assert ".pt file" in log
    rec = json.loads((tmp_path / "p" / "pruning.json").read_text())
    assert rec["groups"][0]["note"].startswith("no BatchNorm")


@pytest.mark.parametrize("form", ["script", "trace", "export"])
def test_torchscript_and_exported_programs_prune(form, tmp_path):
    """A TorchScript file (scripted or traced) and a torch.export program (.pt2) are read
    through torch's ONNX export; a .pt2 stores its input shape."""
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Hardswish(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    x = torch.zeros(1, 1, 12, 12)
    path = tmp_path / ("m.pt2" if form == "export" else "m.pt")
    if form == "export":
        torch.export.save(torch.export.export(model, (x,)), str(path))
    else:
        torch.jit.save(torch.jit.script(model) if form == "script" else
                       torch.jit.trace(model, x), str(path))
    loaded, shape = load_torch(str(path), None if form == "export" else (1, 1, 12, 12))
    probe = torch.randn(3, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(probe), model(probe), atol=1e-5, rtol=1e-5)
    shape_args = [] if form == "export" else ["--input-shape", "1,1,12,12"]
    assert _prune(path, *shape_args, "--ratio", "0.5", "--out", tmp_path / "p") == 0
    pruned, _ = load_torch(str(tmp_path / "p" / "model.pt"))
    assert [m.out_channels for m in pruned.modules() if isinstance(m, torch.nn.Conv2d)] == [4, 4]
