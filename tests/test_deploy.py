"""`edgeprune deploy` end to end on a tiny model: real training, pruning, quantization, TVM,
cross compiler and QEMU; then the C library built standalone by CMake and by its Makefile fragment."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EP = [sys.executable, "-m", "edgeprune.cli"]
TINY = ["--model", "cnn", "--train-epochs", "0.05", "--finetune", "0.02", "--calib-samples", "64",
        "--eval-samples", "200", "--target-samples", "10", "--ratio", "0.5",
        "--quant-method", "ptq"]


def edgeprune(*args, cache: Path, check=False):
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    r = subprocess.run([*EP, *map(str, args)], capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"edgeprune {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    out = root / "out"
    r = edgeprune("deploy", *TINY, "--out", out, "--json", cache=root / "cache", check=True)
    return out, json.loads(r.stdout), root


def test_deploy_writes_every_artifact(deployed):
    out, report, _ = deployed
    for name in ("model.onnx", "model.pt", "pruning.json", "qmodel/qmodel.json", "firmware.elf",
                 "firmware.bin", "report.json", "report.html", "c_library/model.c",
                 "c_library/model.h", "c_library/kernels.c", "c_library/edgeprune_runtime.c",
                 "c_library/README.md", "c_library/CMakeLists.txt", "c_library/model.mk"):
        assert (out / name).exists(), name
    assert json.loads((out / "report.json").read_text()) == report
    assert not list(out.parent.glob(".*tmp*")), "temporary folders left behind"


def test_report_fields(deployed):
    _, r, _ = deployed
    assert r["target"] == "cortex-m7"
    assert r["latency"]["instructions"] > 0 and r["latency"]["ms"] > 0 and r["latency"]["source"]
    assert r["energy"]["uj"] > 0 and "power-model" in r["energy"]["source"]
    m = r["memory"]
    assert m["flash_bytes"] > m["weights_bytes"] > 0 and m["sram_bytes"] > m["arena_bytes"] > 0
    acc = r["accuracy"]
    assert set(acc) >= {"float", "pruned", "quantized", "on_target", "samples"}
    assert all(0 <= acc[k] <= 100 for k in ("float", "pruned", "quantized", "on_target"))
    assert r["check"]["outputs_match"] and r["check"]["mismatches"] == 0
    assert r["pruning"]["criterion"] == "l1"
    assert any(l["channels_after"] < l["channels_before"] for l in r["pruning"]["per_layer"])
    # as prune does, BatchNorm statistics are re-estimated after the cut, before fine-tuning
    pruning = json.loads((deployed[0] / "pruning.json").read_text())
    assert pruning["bn_recalibrated_batches"] == 20
    assert r["met"] is True and r["budget"] == {}
    # Pruning half the channels must make the measured model cheaper than the unpruned one.
    assert r["latency"]["instructions"] < r["baseline"]["latency"]["instructions"]
    assert sum(l["instructions"] for l in r["layers"]) <= r["latency"]["instructions"]
    html = (deployed[0] / "report.html").read_text()
    assert html.count("<svg") >= 4 and "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    # per-layer charts name the model's layers (the tensor each call writes), not kernels
    assert all(l["writes"] and l["writes"] in html for l in r["layers"])


MAIN_C = r"""
#include <stdio.h>
#include "model.h"
static model_input0_t in[MODEL_INPUT0_SIZE];
static model_output0_t out[MODEL_OUTPUT0_SIZE];
int main(void) {
  int s = model_run(in, out);
  for (int i = 0; i < MODEL_OUTPUT0_SIZE; i++) printf("%d ", (int)out[i]);
  printf("\n");
  return s;
}
"""


def test_c_library_builds_standalone_with_cmake(deployed, tmp_path):
    out, _, _ = deployed
    lib = tmp_path / "c_library"
    shutil.copytree(out / "c_library", lib)  # it must not need anything from the deploy folder
    (tmp_path / "main.c").write_text(MAIN_C)
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.13)\nproject(app C)\nadd_subdirectory(c_library)\n"
        "add_executable(app main.c)\ntarget_link_libraries(app PRIVATE model)\n")
    subprocess.run(["cmake", "-S", tmp_path, "-B", tmp_path / "build"], check=True,
                   capture_output=True)
    subprocess.run(["cmake", "--build", tmp_path / "build"], check=True, capture_output=True)
    r = subprocess.run([tmp_path / "build" / "app"], capture_output=True, text=True)
    assert r.returncode == 0 and len(r.stdout.split()) == 10


def test_c_library_builds_with_makefile_fragment_for_the_target(deployed, tmp_path):
    out, _, _ = deployed
    (tmp_path / "main.c").write_text(MAIN_C.replace("#include <stdio.h>", "")
                                     .replace('printf("%d ", (int)out[i]);', "")
                                     .replace('printf("\\n");', ""))
    (tmp_path / "Makefile").write_text(
        f"include {out}/c_library/model.mk\n"
        "CC := arm-none-eabi-gcc\n"
        "CFLAGS := -mcpu=cortex-m7 -mthumb -mfpu=fpv5-d16 -mfloat-abi=hard -O2 $(MODEL_CFLAGS)\n"
        "OBJS := $(notdir $(MODEL_SRCS:.c=.o)) main.o\n"
        "libapp.a: $(OBJS)\n\tarm-none-eabi-ar rcs $@ $^\n"
        "%.o: $(MODEL_DIR)/%.c\n\t$(CC) $(CFLAGS) -c $< -o $@\n"
        "main.o: main.c\n\t$(CC) $(CFLAGS) -c $< -o $@\n")
    r = subprocess.run(["make", "-C", tmp_path], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "libapp.a").stat().st_size > 0


def test_deploy_refuses_to_overwrite_without_force(deployed):
    out, _, root = deployed
    before = (out / "report.json").read_text()
    r = edgeprune("deploy", *TINY, "--out", out, "--quiet", cache=root / "cache")
    assert r.returncode == 2 and "--force" in r.stderr
    assert (out / "report.json").read_text() == before


def test_report_command_prints_the_summary(deployed):
    out, _, root = deployed
    r = edgeprune("report", out, cache=root / "cache", check=True)
    assert "instructions" in r.stdout and "cortex-m7" in r.stdout


def test_simulate_and_profile_take_the_deploy_folder_and_one_unbatched_sample(deployed):
    out, _, root = deployed
    import numpy as np
    from edgeprune.data import fashion_mnist
    x = root / "one.npy"
    np.save(x, fashion_mnist().x_test[0])                 # (1, 28, 28): no batch axis
    y = root / "y.npy"
    r = edgeprune("simulate", out, "--input", x, "--save-outputs", y, cache=root / "cache",
                  check=True)
    assert "outputs match" in r.stdout and np.load(y).shape == (10,)
    r = edgeprune("profile", out, "--input", x, cache=root / "cache", check=True)
    assert "outputs match" in r.stdout


def test_a_deployed_model_compiles_for_another_target(deployed):
    out, _, root = deployed
    rv = root / "rv32"                        # the deploy folder's integer model, retargeted
    edgeprune("compile", out, "--target", "rv32", "--out", rv, cache=root / "cache", check=True)
    r = edgeprune("simulate", rv, cache=root / "cache", check=True)
    assert "riscv32" in r.stdout and "outputs match" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["--budget", "latency=5"], ["[deploy]", "latency_ms"]),
    (["--model", "nosuch.onnx"], ["[load]", "nosuch.onnx"]),
    (["--input-shape", "1,1,32,32"], ["[load]", "32", "28"]),
    (["--target", "cortex-z9"], ["cortex-z9"]),
    (["--quant-method", "admm"], ["[deploy]", "--mixed-precision"]),    # before any training
    (["--tap-strides", "2"], ["[deploy]", "--budget"]),
    (["--budget", "latency_ms=5", "--tap-strides", "2,x"], ["[deploy]", "--tap-strides"]),
    (["--finetune", "-1"], ["[deploy]", "--finetune must be at least 0, got -1"]),
    (["--target-samples", "0"], ["[deploy]", "--target-samples"]),
    (["--input-shape", "1,x,28"], ["--input-shape '1,x,28' is not a list of integers"]),
])
def test_bad_input_names_the_stage(args, words, tmp_path):
    r = edgeprune("deploy", *TINY, *args, "--out", tmp_path / "o", "--quiet", cache=tmp_path / "c")
    assert r.returncode == 2, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert not (tmp_path / "o").exists()


def test_deploy_with_a_budget_runs_the_measured_search(tmp_path):
    """--budget: the feedback search prunes until the latency measured on the target fits."""
    out = tmp_path / "out"
    r = edgeprune("deploy", *TINY, "--budget", "latency_ms=1.5", "--out", out, "--json",
                  cache=tmp_path / "cache", check=True)
    report = json.loads(r.stdout)
    assert report["budget"] == {"latency_ms": 1.5}
    assert report["met"] is True and report["latency"]["ms"] <= 1.5
    assert report["baseline"]["latency"]["ms"] > 1.5  # the unpruned model did not fit
    assert report["feedback"]["met"] and report["feedback"]["trajectory"]
    for name in ("ratios.json", "trajectory.json", "pareto.png"):
        assert (out / "feedback" / name).exists(), name


def test_deploy_applies_a_feedback_file_with_its_window_patterns(tmp_path):
    """--per-layer with the feedback loop's ratios.json: its ratios, word lengths and window
    patterns; the patterned conv keeps its zero taps through fine-tuning and runs bit-exact."""
    from edgeprune.load import load_torch

    ratios = tmp_path / "ratios.json"
    ratios.write_text(json.dumps({"ratios": {"features.2.0": 0.25}, "bits": {"fc": 4},
                                  "tap_strides": {"features.2.0": 2}}))
    out = tmp_path / "out"
    r = edgeprune("deploy", *TINY, "--per-layer", ratios, "--out", out, "--json",
                  cache=tmp_path / "cache", check=True)
    report = json.loads(r.stdout)
    assert report["check"]["outputs_match"] and report["check"]["mismatches"] == 0
    model, _ = load_torch(str(out / "model.pt"))
    conv = model.get_submodule("features.2.0")
    assert conv.out_channels == 12
    taps = conv.weight.detach().ne(0).any(1).any(0).flatten()
    assert int(taps.sum()) in (4, 5) and not bool(taps.all())
    assert json.loads((out / "pruning.json").read_text())["patterns"]["features.2.0"][
        "intra_kernel"]["stride"] == 2


def test_keras_style_nhwc_onnx_model_deploys_bit_exact(tmp_path):
    """A Keras model as tf2onnx writes it: NHWC input (3 channels) transposed to NCHW, the last
    feature map transposed back to NHWC before Flatten. It prunes through the channels-last
    flatten, quantizes the transposes as int8 moves and runs bit-exact on the target."""
    import numpy as np
    import torch
    import torch.nn as nn

    from edgeprune import data
    from edgeprune.quantize.train_utils import quick_train

    class KerasStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn = nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8)
            self.b = nn.Conv2d(8, 12, 3, 2, 1)
            self.fc = nn.Linear(12 * 7 * 7, 10)

        def forward(self, x):                       # x: N, H, W, C
            x = nn.functional.max_pool2d(torch.relu(self.bn(self.a(x.permute(0, 3, 1, 2)))), 2)
            x = torch.relu(self.b(x))
            return self.fc(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))

    def rgb(x):   # (N, 1, H, W) -> (N, H, W, 3), three different channels
        return np.ascontiguousarray(np.concatenate([x, 0.5 * x, 1 - x], 1)
                                    .transpose(0, 2, 3, 1)).astype(np.float32)

    torch.manual_seed(0)
    fm = data.load("fashion-mnist")
    ds = data.Dataset("rgb", rgb(fm.x_train[:3000]), fm.y_train[:3000], rgb(fm.x_test[:200]),
                      fm.y_test[:200])
    model = KerasStyle()
    quick_train(model, ds, samples=3000, epochs=1.0, lr=0.05)
    torch.onnx.export(model.eval(), (torch.zeros(1, 28, 28, 3),), str(tmp_path / "k.onnx"),
                      dynamo=False)
    np.savez(tmp_path / "d.npz", x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test,
             y_test=ds.y_test)
    report = deploy_user_model(tmp_path / "k.onnx", tmp_path / "d.npz", tmp_path, "0.3", 4)
    assert report["input_shape"] == [1, 28, 28, 3]
    assert report["check"]["outputs_match"] and report["check"]["mismatches"] == 0
    assert report["accuracy"]["quantized"] > 60
    widths = {l["channels_before"]: l["channels_after"] for l in report["pruning"]["per_layer"]}
    # incl. the conv before the NHWC flatten; 9 rounds to the target's channel multiple, 2
    assert widths[8] == 6 and widths[12] == 10, widths
    ops = json.loads((tmp_path / "out" / "qmodel" / "qmodel.json").read_text())["ops"]
    assert [o["attrs"]["perm"] for o in ops if o["kind"] == "transpose"] == [[0, 3, 1, 2],
                                                                              [0, 2, 3, 1]]


def test_keras_style_global_average_pool_over_nhwc_deploys_bit_exact(tmp_path):
    """Keras' GlobalAveragePooling2D as tf2onnx may leave it: ReduceMean over axes 1, 2 of the
    NHWC feature map. It imports as the usual global pool of the NCHW map (the transpose
    cancels), so the conv before it prunes, and runs bit-exact on the target."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgeprune import data

    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((8, 1, 3, 3)) * 0.3, "b1": rng.standard_normal(8) * 0.1,
               "w2": rng.standard_normal((16, 8, 3, 3)) * 0.2, "b2": rng.standard_normal(16) * 0.1,
               "m": rng.standard_normal((16, 10)) * 0.3, "mb": rng.standard_normal(10) * 0.1}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inits.append(numpy_helper.from_array(np.array([1, 2], np.int64), "axes"))
    nodes = [
        helper.make_node("Transpose", ["x"], ["t0"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Transpose", ["r2"], ["t1"], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["t1", "axes"], ["gap"], keepdims=0),
        helper.make_node("MatMul", ["gap", "m"], ["mm"]),
        helper.make_node("Add", ["mm", "mb"], ["y"])]
    graph = helper.make_graph(
        nodes, "keras_gap", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 28, 28, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "gap.onnx")
    fm = data.load("fashion-mnist")
    nhwc = lambda x: np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # noqa: E731
    np.savez(tmp_path / "d.npz", x_train=nhwc(fm.x_train[:500]), y_train=fm.y_train[:500],
             x_test=nhwc(fm.x_test[:200]), y_test=fm.y_test[:200])
    report = deploy_user_model(tmp_path / "gap.onnx", tmp_path / "d.npz", tmp_path, "0", 4)
    assert report["check"]["outputs_match"] and report["check"]["mismatches"] == 0
    widths = {l["channels_before"]: l["channels_after"] for l in report["pruning"]["per_layer"]}
    assert widths[16] == 12, widths          # the conv before the global pool
    ops = json.loads((tmp_path / "out" / "qmodel" / "qmodel.json").read_text())["ops"]
    assert [o["attrs"]["perm"] for o in ops if o["kind"] == "transpose"] == [[0, 3, 1, 2]]


def test_autoencoder_on_regression_targets_deploys_bit_exact(tmp_path):
    """An anomaly-detection autoencoder (dense, MLPerf Tiny's kind) on a .npz whose targets are
    the inputs themselves: pruned and fine-tuned on the squared error, judged by R² on the host
    and on the target (its dequantized outputs), bit-exact; targets of the wrong size are
    refused before anything is written."""
    import numpy as np
    import torch
    import torch.nn as nn

    from edgeprune import data
    from edgeprune.train import evaluate, train

    rng = np.random.default_rng(0)
    mix = rng.standard_normal((3, 64)).astype(np.float32) / 2

    def draw(n):   # 64 values with 3 degrees of freedom: a 4-wide bottleneck can hold them
        return np.tanh(rng.standard_normal((n, 3)).astype(np.float32) @ mix)

    x, xt = draw(2000), draw(200)
    np.savez(tmp_path / "ae.npz", x_train=x, y_train=x, x_test=xt, y_test=xt)

    def block(i, o):
        return [nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU()]
    torch.manual_seed(0)
    model = nn.Sequential(*block(64, 32), *block(32, 4), *block(4, 32), nn.Linear(32, 64))
    ds = data.Dataset("ae", x, x, xt, xt)
    train(model, ds, epochs=8, lr=0.05)
    assert evaluate(model, xt, xt) > 80
    torch.onnx.export(model.eval(), (torch.zeros(1, 64),), str(tmp_path / "ae.onnx"),
                      dynamo=False)
    report = deploy_user_model(tmp_path / "ae.onnx", tmp_path / "ae.npz", tmp_path, "2", 8)
    acc = report["accuracy"]
    assert acc["metric"] == "R²"
    assert report["check"]["outputs_match"] and report["check"]["mismatches"] == 0
    assert acc["quantized"] > 50 and acc["on_target"] > 50, acc
    widths = {l["channels_before"]: l["channels_after"] for l in report["pruning"]["per_layer"]}
    assert widths == {32: 24, 4: 4, 64: 64}, widths   # 3 rounds to the channel multiple, 2
    html = (tmp_path / "out" / "report.html").read_text()
    assert "R² (host, %)" in html

    np.savez(tmp_path / "bad.npz", x_train=x, y_train=x[:, :10], x_test=xt, y_test=xt[:, :10])
    r = edgeprune("deploy", "--model", tmp_path / "ae.onnx", "--data", tmp_path / "bad.npz",
                  "--out", tmp_path / "bad", cache=tmp_path / "cache")
    assert r.returncode == 2 and "regression targets" in r.stderr and "[10] per sample" in r.stderr
    assert not (tmp_path / "bad").exists()


def tones(rng, n: int, classes: int, noise: float):
    """n signals of 32 samples and their labels: a tone at a random phase, faster by class,
    in Gaussian noise."""
    import numpy as np

    y = rng.integers(0, classes, n)
    t = np.linspace(0, 1, 32)
    x = np.sin(2 * np.pi * (2 + 3 * y[:, None]) * t + rng.uniform(0, 6, (n, 1)))
    return (x + rng.normal(0, noise, (n, 32)))[:, None].astype(np.float32), y


def test_binary_classifier_with_one_sigmoid_output_deploys_bit_exact(tmp_path):
    """A wake-word or anomaly detector's head: one sigmoid output against labels 0/1, trained
    and scored as a binary classifier (threshold 0.5, binary cross-entropy), bit-exact."""
    import numpy as np
    import torch
    import torch.nn as nn

    rng = np.random.default_rng(0)
    (x, y), (xt, yt) = tones(rng, 1500, 2, 0.5), tones(rng, 200, 2, 0.5)
    np.savez(tmp_path / "tone.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 5),
                          nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 1),
                          nn.Sigmoid())
    from edgeprune import data
    from edgeprune.train import evaluate, train
    train(model, data.Dataset("tone", x, y, xt, yt), epochs=3, lr=0.2)
    assert evaluate(model, xt, yt) > 80
    torch.onnx.export(model.eval(), (torch.zeros(1, 1, 32),), str(tmp_path / "tone.onnx"),
                      dynamo=False)
    report = deploy_user_model(tmp_path / "tone.onnx", tmp_path / "tone.npz", tmp_path, "1", 20)
    acc = report["accuracy"]
    assert acc["metric"] == "accuracy" and report["check"]["mismatches"] == 0
    assert acc["quantized"] > 75 and acc["on_target"] > 60, acc


def test_pytorch_mnist_example_too_big_unpruned_deploys_pruned(tmp_path):
    """The PyTorch examples' MNIST net (log_softmax head, F.max_pool2d, dropout): its 1.2 MB of
    int8 weights do not fit the M7's 1 MB of flash. Pruned by half it does: the deploy goes on,
    and the report measures the unpruned model (QEMU's board has room) and says it does not
    fit the chip, rather than failing."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, 1), nn.Conv2d(32, 64, 3, 1)
            self.dropout1, self.dropout2 = nn.Dropout(0.25), nn.Dropout(0.5)
            self.fc1, self.fc2 = nn.Linear(9216, 128), nn.Linear(128, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
            x = F.relu(self.fc1(torch.flatten(self.dropout1(x), 1)))
            return F.log_softmax(self.fc2(self.dropout2(x)), dim=1)

    torch.manual_seed(0)
    torch.onnx.export(Net().eval(), (torch.zeros(1, 1, 28, 28),), str(tmp_path / "net.onnx"),
                      dynamo=False)
    r = edgeprune("deploy", "--model", tmp_path / "net.onnx", "--ratio", "0.5", "--finetune",
                  "0.02", "--calib-samples", "64", "--eval-samples", "100", "--target-samples",
                  "2", "--quant-method", "ptq", "--out", tmp_path / "out", "--json",
                  cache=tmp_path / "cache", check=True)
    report = json.loads(r.stdout)
    assert report["check"]["outputs_match"] and report["check"]["mismatches"] == 0
    assert "1048576 B of flash" in report["baseline"]["error"]
    assert report["baseline"]["memory"]["flash_bytes"] > 1048576   # measured all the same
    assert "tmp" not in report["baseline"]["error"]          # no path of the work folder
    assert report["memory"]["flash_bytes"] < 1048576
    ops = json.loads((tmp_path / "out" / "qmodel" / "qmodel.json").read_text())["ops"]
    assert ops[-1]["kind"] == "log_softmax"


def deploy_user_model(model: Path, data: Path, tmp_path: Path, finetune: str,
                      target_samples: int) -> dict:
    """`deploy --json` of a user's model on a user's .npz, cut by 25 %, int8 PTQ: the report."""
    r = edgeprune("deploy", "--model", model, "--data", data, "--ratio", "0.25", "--finetune",
                  finetune, "--calib-samples", "64", "--eval-samples", "200",
                  "--target-samples", str(target_samples), "--quant-method", "ptq",
                  "--out", tmp_path / "out", "--json", cache=tmp_path / "cache", check=True)
    return json.loads(r.stdout)


def test_user_onnx_model_with_batch_and_concat_on_npz_data(tmp_path):
    """A user's own model (ONNX, a static batch of 2, concatenated branches) on a user's own
    data (.npz) deploys: pruned through the concat, int8 with a requantizing concat, and
    bit-exact on the target over whole batches."""
    import numpy as np
    import torch
    import torch.nn as nn

    from edgeprune import data
    from edgeprune.quantize.train_utils import quick_train

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 8, 3, 2, 1), nn.Conv2d(1, 8, 5, 2, 2)
            self.c = nn.Conv2d(16, 16, 3, 2, 1)
            self.fc = nn.Linear(16 * 7 * 7, 10)

        def forward(self, x):
            h = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
            return self.fc(torch.relu(self.c(h)).flatten(1))

    torch.manual_seed(0)
    fm = data.load("fashion-mnist")
    model = Branches()
    quick_train(model, fm, samples=3000, epochs=1.0, lr=0.05)
    torch.onnx.export(model.eval(), (torch.zeros(2, 1, 28, 28),), str(tmp_path / "m.onnx"),
                      dynamo=False)
    np.savez(tmp_path / "d.npz", x_train=fm.x_train[:3000], y_train=fm.y_train[:3000],
             x_test=fm.x_test[:200], y_test=fm.y_test[:200])
    report = deploy_user_model(tmp_path / "m.onnx", tmp_path / "d.npz", tmp_path, "0.3", 11)
    assert report["input_shape"] == [2, 1, 28, 28]
    assert report["check"]["outputs_match"] and report["check"]["mismatches"] == 0
    assert report["accuracy"]["on_target_samples"] == 10       # whole batches of 2
    assert report["accuracy"]["quantized"] > 50                 # fine-tuned on the .npz
    branches = [l for l in report["pruning"]["per_layer"] if l["channels_before"] == 8]
    assert len(branches) == 2 and all(l["channels_after"] < 8 for l in branches), branches
    ops = json.loads((tmp_path / "out" / "qmodel" / "qmodel.json").read_text())["ops"]
    assert "concat" in {o["kind"] for o in ops}


def test_a_zoo_model_on_a_small_dataset_trains_long_enough_by_default(tmp_path):
    """No --train-epochs or --finetune on 300 training samples: one epoch would be 5 steps,
    which learn nothing; the defaults see 20,000 samples (67 epochs) and the model learns."""
    import numpy as np

    from edgeprune.train import default_epochs

    assert default_epochs(60000) == 1 and default_epochs(400) == 50
    rng = np.random.default_rng(0)
    (x, y), (xt, yt) = tones(rng, 300, 3, 0.3), tones(rng, 200, 3, 0.3)
    np.savez(tmp_path / "tones.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    r = edgeprune("deploy", "--model", "cnn", "--data", tmp_path / "tones.npz", "--calib-samples",
                  "64", "--eval-samples", "200", "--target-samples", "5", "--quant-method", "ptq",
                  "--out", tmp_path / "out", "--json", cache=tmp_path / "cache", check=True)
    report = json.loads(r.stdout)
    assert report["config"]["finetune_epochs"] == 67
    # one epoch each (the defaults before): 78 % float, 68 % int8
    assert report["accuracy"]["float"] > 95 and report["accuracy"]["quantized"] > 90, \
        report["accuracy"]
    assert report["check"]["mismatches"] == 0
