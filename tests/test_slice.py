"""The vertical slice: models compile through TVM, boot in QEMU and match the host model."""

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from edgeprune import cli
from edgeprune.load import save_torch
from edgeprune.simulate import simulate


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("name", ["cnn", "resnet8", "dscnn", "mobilenet"])
def test_zoo_model_runs_in_qemu_and_matches_onnx_reference(zoo_build, name):
    result, _ = simulate(zoo_build(name), samples=2)
    assert result["outputs_match"], result
    assert result["rel_err"] <= 1e-4
    assert result["instructions"] > 0
    assert sum(l["instructions"] for l in result["layers"]) <= result["instructions"]
    assert result["arena_lower_bound_bytes"] <= result["arena_bytes"]
    assert 0 < result["stack_used_bytes"] < result["stack_bytes"]
    assert result["flash_bytes"] > result["weights_bytes"] > 0


def test_instruction_count_is_deterministic(zoo_build):
    a, _ = simulate(zoo_build("cnn"), samples=1)
    b, _ = simulate(zoo_build("cnn"), samples=1)
    assert a["instructions"] == b["instructions"]
    assert [l["instructions"] for l in a["layers"]] == [l["instructions"] for l in b["layers"]]


def test_simulate_json_reports_the_documented_fields(zoo_build, capsys):
    rc, out, _ = run_cli(capsys, "simulate", zoo_build("cnn"), "--json", "--samples", "2")
    assert rc == 0
    result = json.loads(out)
    for key in ("outputs_match", "max_abs_err", "instructions", "flash_bytes", "sram_bytes",
                "arena_bytes", "arena_lower_bound_bytes"):
        assert key in result
    assert result["outputs_match"] is True
    for command, flag in (("simulate", "--samples"), ("profile", "--runs")):
        rc, _, err = run_cli(capsys, command, zoo_build("cnn"), flag, "0")
        assert rc == 2 and f"{flag} must be at least 1, got 0" in err, err


class TwoHeads(nn.Module):
    """Batch > 1, a residual add, a concat and a final flatten (an output that is a view)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(8, 2, 3, stride=2, padding=1)

    def forward(self, x):
        a = torch.relu(self.a(x))
        y = torch.cat([a + self.b(x), a], dim=1)
        return torch.sigmoid(self.c(y)).flatten(1)


def test_batch_input_file_and_saved_outputs_match_torch(tmp_path, capsys):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    shape = (3, 3, 10, 12)
    save_torch(model, shape, tmp_path / "m.pt")
    rc, _, err = run_cli(capsys, "compile", tmp_path / "m.pt", "--target", "cortex-m7",
                         "--out", tmp_path / "b")
    assert rc == 0, err
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    rc, out, err = run_cli(capsys, "simulate", tmp_path / "b", "--input", tmp_path / "x.npy",
                           "--save-outputs", tmp_path / "y.npy", "--json")
    assert rc == 0, err
    y = np.load(tmp_path / "y.npy")
    expected = model(torch.from_numpy(x)).detach().numpy()
    assert y.shape == expected.shape == (3, 2 * 5 * 6)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def _export(model, shape, path, dynamic_batch=False):
    torch.onnx.export(model.eval(), (torch.zeros(shape),), str(path), dynamo=False,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}} if dynamic_batch else None)


def test_dynamic_onnx_needs_input_shape(tmp_path, capsys):
    _export(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), (1, 1, 8, 8), tmp_path / "d.onnx", True)
    rc, _, err = run_cli(capsys, "compile", tmp_path / "d.onnx", "--out", tmp_path / "o")
    assert rc == 2 and "dynamic shape" in err and "--input-shape" in err
    assert not (tmp_path / "o").exists()
    rc, _, err = run_cli(capsys, "compile", tmp_path / "d.onnx", "--out", tmp_path / "o",
                         "--input-shape", "2,1,8,8")
    assert rc == 0, err
    result, _ = simulate(tmp_path / "o", samples=1)
    assert result["outputs_match"]


def test_onnx_with_exporter_default_names_simulates(tmp_path, capsys):
    """torch names the input "input.1" and the C code cannot: the check still feeds the ONNX
    reference its own name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)).eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(tmp_path / "d.onnx"), dynamo=False)
    rc, _, err = run_cli(capsys, "compile", tmp_path / "d.onnx", "--out", tmp_path / "o")
    assert rc == 0, err
    result, _ = simulate(tmp_path / "o", samples=2)
    assert result["outputs_match"], result


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "compile", tmp_path / "nope.onnx", "--out", tmp_path / "o")
    assert rc == 2 and "nope.onnx" in err and "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_a_file_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "junk.onnx").write_text("hello")
    (tmp_path / "junk.pt").write_text("hello")
    for f in ("junk.onnx", "junk.pt"):
        rc, _, err = run_cli(capsys, "compile", tmp_path / f, "--out", tmp_path / "o",
                             "--input-shape", "1,1,8,8")
        assert rc == 2 and f in err and "not a" in err
    assert not (tmp_path / "o").exists()


def test_unsupported_op_names_the_op_and_node(tmp_path, capsys):
    from onnx import TensorProto, helper
    graph = helper.make_graph(   # an op TVM's ONNX frontend lacks
        [helper.make_node("LpNormalization", ["x"], ["y"], "norm", axis=1, p=2)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "c.onnx"))
    rc, _, err = run_cli(capsys, "compile", tmp_path / "c.onnx", "--out", tmp_path / "o")
    assert rc == 2 and "'LpNormalization'" in err and "node 'norm'" in err, err
    assert not (tmp_path / "o").exists()


class TwoOutputs(nn.Module):
    """Two heads on one trunk: class scores and a map (a detector's box regression)."""

    def __init__(self):
        super().__init__()
        self.c, self.cls, self.box = nn.Conv2d(1, 4, 3, 2), nn.Linear(4, 3), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return self.cls(h.mean((2, 3))), self.box(h)


def test_a_model_with_two_outputs_compiles_quantizes_prunes_and_runs(tmp_path, capsys):
    """compile and quantize take a model with two outputs (from ONNX and from torch): the C
    library writes both, in the graph's order; the target matches the ONNX reference (float)
    and the golden model bit for bit (int8, calibrated PTQ: no accuracy, which scores one
    output); simulate saves them as an .npz; prune cuts the trunk by a criterion that needs
    no data. With data (a data criterion, fine-tuning, accuracy) pruning needs one output,
    and QAT trains on one: both are refused by name, and nothing is written."""
    _export(TwoOutputs(), (1, 1, 28, 28), tmp_path / "two.onnx")
    rc, _, err = run_cli(capsys, "compile", tmp_path / "two.onnx", "--out", tmp_path / "b")
    assert rc == 0, err
    header = (tmp_path / "b" / "c_library" / "model.h").read_text()
    assert "#define MODEL_OUTPUT1_SIZE 338" in header and "float *output1" in header
    rc, out, err = run_cli(capsys, "simulate", tmp_path / "b", "--save-outputs",
                           tmp_path / "y.npz", "--samples", "3")
    assert rc == 0 and "outputs match" in out, out + err
    y = np.load(tmp_path / "y.npz")
    assert y["output0"].shape == (3, 1, 3) and y["output1"].shape == (3, 1, 2, 13, 13)
    save_torch(TwoOutputs().eval(), (1, 1, 28, 28), tmp_path / "two.pt")
    rc, _, err = run_cli(capsys, "compile", tmp_path / "two.pt", "--out", tmp_path / "bt")
    assert rc == 0 and "float *output1" in (tmp_path / "bt" / "c_library" / "model.h").read_text()
    for model in ("two.onnx", "two.pt"):
        q = tmp_path / f"q-{model}"
        rc, out, err = run_cli(capsys, "quantize", tmp_path / model, "--data", "fashion-mnist",
                               "--out", q)
        assert rc == 0 and "no accuracy (several outputs)" in out, out + err
        assert json.loads((q / "quantize.json").read_text())["outputs"] == 2
    rc, _, err = run_cli(capsys, "compile", q, "--out", tmp_path / "bq")
    assert rc == 0, err
    assert "(output1)" in (tmp_path / "bq" / "c_library" / "README.md").read_text()
    rc, out, err = run_cli(capsys, "simulate", tmp_path / "bq", "--samples", "2")
    assert rc == 0 and "outputs match" in out, out + err
    rc, _, err = run_cli(capsys, "prune", tmp_path / "two.onnx", "--criterion", "l1",
                         "--ratio", "0.5", "--out", tmp_path / "p")   # no data: scores no output
    assert rc == 0, err
    pruned = onnx.load(str(tmp_path / "p" / "model.onnx"))
    assert len(pruned.graph.output) == 2
    assert [i.dims[0] for i in pruned.graph.initializer if len(i.dims) == 4][0] == 2   # c: 4 -> 2
    rc, _, err = run_cli(capsys, "prune", tmp_path / "two.onnx", "--data", "fashion-mnist",
                         "--out", tmp_path / "o")
    assert rc == 2 and "the model has 2 outputs (output, " in err, err
    rc, _, err = run_cli(capsys, "prune", tmp_path / "two.pt", "--data", "fashion-mnist",
                         "--out", tmp_path / "o")
    assert rc == 2 and "returns a tuple of 2, not one tensor" in err, err
    rc, _, err = run_cli(capsys, "quantize", tmp_path / "two.onnx", "--data", "fashion-mnist",
                         "--method", "qat", "--out", tmp_path / "o")
    assert rc == 2 and "2 outputs; --method qat trains" in err, err
    assert not (tmp_path / "o").exists()


def test_an_op_without_a_torch_form_is_named_before_its_neighbours(tmp_path, capsys):
    """A running sum over time first starts with a Transpose of the batch axis; the error names
    the CumSum (the op that cannot be converted), not the Transpose before it."""
    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(torch.cumsum(x.transpose(0, 1), 0).transpose(0, 1)[:, -1])

    _export(Cumulative(), (1, 10, 3), tmp_path / "r.onnx")
    rc, _, err = run_cli(capsys, "quantize", tmp_path / "r.onnx", "--out", tmp_path / "o")
    assert rc == 2 and "(CumSum) is not supported" in err and \
        "CumSum" in err.split("ops in the")[1]
    assert not (tmp_path / "o").exists()


def test_a_pickled_module_whose_class_is_gone_says_how_to_fix_it(tmp_path, capsys, monkeypatch):
    import importlib
    import sys
    (tmp_path / "gone_module.py").write_text(
        "import torch.nn as nn\nclass Net(nn.Sequential):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = importlib.import_module("gone_module").Net(nn.Flatten(), nn.Linear(16, 2))
    save_torch(net.eval(), (1, 1, 4, 4), tmp_path / "m.pt")
    monkeypatch.delitem(sys.modules, "gone_module")
    (tmp_path / "gone_module.py").unlink()
    rc, _, err = run_cli(capsys, "quantize", tmp_path / "m.pt", "--out", tmp_path / "o")
    assert rc == 2 and "class cannot be imported" in err and "gone_module" in err, err
    assert "PYTHONPATH" in err and "ONNX" in err


def test_a_training_checkpoint_loads_its_module_and_a_state_dict_is_named(tmp_path, capsys):
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2)).eval()
    torch.save({"model": net, "epoch": 3, "best": 0.9}, tmp_path / "ckpt.pt")
    rc, _, err = run_cli(capsys, "compile", tmp_path / "ckpt.pt", "--out", tmp_path / "o",
                         "--input-shape", "1,1,4,4")
    assert rc == 0, err
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save({"a": net, "b": net[1]}, tmp_path / "two.pt")
    for f, words in (("sd.pt", "holds a state_dict (weights without the module)"),
                     ("two.pt", "holds several modules (a, b)")):
        rc, _, err = run_cli(capsys, "compile", tmp_path / f, "--out", tmp_path / "p",
                             "--input-shape", "1,1,4,4")
        assert rc == 2 and words in err, err
    assert not (tmp_path / "p").exists()


def test_a_module_with_two_inputs_is_named_as_such(tmp_path, capsys):
    torch.save(TwoInputs().eval(), tmp_path / "two.pt")     # TwoInputs: below
    rc, _, err = run_cli(capsys, "quantize", tmp_path / "two.pt", "--input-shape", "1,1,8,8",
                         "--out", tmp_path / "o")
    assert rc == 2 and "takes 2 inputs (img, meta)" in err and "one input" in err, err


def test_model_too_big_for_flash_says_both_numbers(tmp_path, capsys):
    big = nn.Sequential(nn.Flatten(), nn.Linear(784, 512))  # 1.6 MB of float weights
    _export(big, (1, 1, 28, 28), tmp_path / "big.onnx")
    rc, _, err = run_cli(capsys, "compile", tmp_path / "big.onnx", "--out", tmp_path / "o")
    assert rc == 2 and "flash" in err and "1607680" in err and "1048576" in err
    assert not (tmp_path / "o").exists()


def test_arena_too_big_for_sram_says_both_numbers(tmp_path, capsys):
    wide = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1))
    _export(wide, (1, 1, 64, 64), tmp_path / "wide.onnx")
    rc, _, err = run_cli(capsys, "compile", tmp_path / "wide.onnx", "--out", tmp_path / "o")
    assert rc == 2 and "SRAM" in err and "327680" in err
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    rc, _, err = run_cli(capsys, "compile", "cnn", "--out", out)
    assert rc == 2 and "--force" in err
    assert (out / "mine.txt").read_text() == "user data"


def test_targets_lists_chip_facts(capsys):
    rc, out, _ = run_cli(capsys, "targets", "--json")
    facts = json.loads(out)
    assert rc == 0 and facts["cortex-m7"]["chip"]["part"] == "STM32F746NG"


def test_broken_target_file_names_the_field(tmp_path):
    from edgeprune.errors import EdgepruneError
    from edgeprune.targets import TARGETS_DIR, load_target

    text = (TARGETS_DIR / "cortex-m7.toml").read_text().replace("sram_bytes", "sram_byte")
    bad = tmp_path / "cortex-m7.toml"
    bad.write_text(text)
    with pytest.raises(EdgepruneError, match=r"missing field \[chip\] sram_bytes"):
        load_target(str(bad))


class TwoInputs(nn.Module):
    """An image and a vector of side information (sensor fusion)."""

    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 + 5, 3)

    def forward(self, img, meta):
        return self.fc(torch.cat([torch.relu(self.c(img)).mean((2, 3)), meta], 1))


def test_a_float_model_with_two_inputs_compiles_simulates_and_profiles(tmp_path, capsys):
    """compile takes an ONNX model with two inputs; simulate and profile feed default inputs
    or an .npz of one array per input (by name), and match the ONNX reference; the int8 stages
    need one input and say so."""
    torch.onnx.export(TwoInputs().eval(), (torch.zeros(1, 1, 8, 8), torch.zeros(1, 5)),
                      str(tmp_path / "in2.onnx"), dynamo=False, input_names=["img", "meta"])
    rc, _, err = run_cli(capsys, "compile", tmp_path / "in2.onnx", "--out", tmp_path / "b")
    assert rc == 0, err
    assert "const float *input1" in (tmp_path / "b" / "c_library" / "model.h").read_text()
    rc, out, err = run_cli(capsys, "simulate", tmp_path / "b")
    assert rc == 0 and "4 samples, outputs match" in out, out + err
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", img=rng.random((3, 1, 1, 8, 8), np.float32),
             meta=rng.random((3, 1, 5), np.float32))
    rc, out, err = run_cli(capsys, "simulate", tmp_path / "b", "--input", tmp_path / "x.npz",
                           "--save-outputs", tmp_path / "y.npy")
    assert rc == 0 and "3 samples, outputs match" in out, out + err
    assert np.load(tmp_path / "y.npy").shape == (3, 1, 3)
    rc, out, err = run_cli(capsys, "profile", tmp_path / "b", "--port", "qemu", "--input",
                           tmp_path / "x.npz", "--json")
    assert rc == 0 and json.loads(out)["check"]["outputs_match"], out + err
    np.save(tmp_path / "one.npy", rng.random((1, 1, 8, 8), np.float32))
    rc, _, err = run_cli(capsys, "simulate", tmp_path / "b", "--input", tmp_path / "one.npy")
    assert rc == 2 and "the model has 2 inputs (img, meta); give --input an .npz" in err, err
    rc, _, err = run_cli(capsys, "quantize", tmp_path / "in2.onnx", "--data", "fashion-mnist",
                         "--out", tmp_path / "q")
    assert rc == 2 and "the model has 2 inputs (img, meta)" in err, err
    assert not (tmp_path / "q").exists()
