"""The memory plan on model forms where it matters: SRAM, flash and instructions on the M7.

Views (a contiguous slice, a time step of a sequence), concatenations written in place by their
pieces' producers, activation tables fused with their index arithmetic, and elementwise kernels
and convs that copy their input first run in place (edgeprune/lower.py, edgeprune/plan.py)
change these numbers; ResNet-8's plan keeps none of those and is the reference. The weights
are random and calibration uses random inputs: the numbers are the models' structure, not their
accuracy. Every firmware runs 2 samples in
QEMU, checked bit for bit against the numpy golden model.

Writes bench/results/memory.json: {model: {"calls", "kernels", "arena_bytes", "sram_bytes",
"flash_bytes", "instructions", "bit_exact"}}. Run: python -m bench.run memory (about 2 minutes).
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench.run import write_result

RESULTS = Path(__file__).parent / "results" / "memory.json"
TARGET = "cortex-m7"


def _conv(cin, cout, k, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, k, **kw), nn.BatchNorm2d(cout))


class InvertedResidual(nn.Module):
    """MobileNetV3's block: expand, depthwise, squeeze-excitation gate, project, residual."""

    def __init__(self, c, e, act):
        super().__init__()
        self.expand, self.dw = nn.Conv2d(c, e, 1), nn.Conv2d(e, e, 3, padding=1, groups=e)
        self.se1, self.se2 = nn.Conv2d(e, 8, 1), nn.Conv2d(8, e, 1)
        self.project = nn.Conv2d(e, c, 1)
        self.act = act

    def forward(self, x):
        y = self.act(self.dw(self.act(self.expand(x))))
        y = y * F.hardsigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return x + self.project(y)


class MobileNetV3Like(nn.Module):
    def __init__(self, act=None):
        super().__init__()
        self.act = act or nn.Hardswish()
        self.stem = nn.Conv2d(1, 16, 3, padding=1, stride=2)
        self.b1 = InvertedResidual(16, 64, self.act)
        self.b2 = InvertedResidual(16, 64, self.act)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.b2(self.b1(self.act(self.stem(x)))).mean((2, 3)))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand):
        super().__init__()
        self.s, self.a = _conv(cin, squeeze, 1), _conv(squeeze, expand, 1)
        self.b = _conv(squeeze, expand, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.s(x))
        return torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)


class FireDense(nn.Module):
    """Two SqueezeNet Fire modules and a DenseNet block (a concatenation inside another)."""

    def __init__(self):
        super().__init__()
        self.stem = _conv(1, 16, 3, stride=2, padding=1)
        self.f1, self.f2 = Fire(16, 8, 16), Fire(32, 8, 16)
        self.c1, self.c2 = _conv(32, 8, 3, padding=1), _conv(40, 8, 3, padding=1)
        self.fc = nn.Linear(48, 10)

    def forward(self, x):
        x = F.max_pool2d(self.f2(self.f1(torch.relu(self.stem(x)))), 2)
        x = torch.cat([x, torch.relu(self.c1(x))], 1)
        x = torch.cat([x, torch.relu(self.c2(x))], 1)
        return self.fc(x.mean((2, 3)))


class ConvLSTM(nn.Module):
    """A Conv1d front end and an LSTM(16, 16) over 48 frames of a 96-sample signal."""

    def __init__(self):
        super().__init__()
        self.conv, self.lstm = nn.Conv1d(1, 16, 5, stride=2), nn.LSTM(16, 16)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        out, _ = self.lstm(torch.relu(self.conv(x)).permute(2, 0, 1))
        return self.fc(out[-1])


def _measure(model: nn.Module, shape: tuple[int, ...], work: Path) -> dict:
    from edgeprune.compile import compile_model
    from edgeprune.load import load_torch, save_torch
    from edgeprune.quantize.ptq import quantize_ptq
    from edgeprune.simulate import simulate

    save_torch(model.eval(), shape, work / "model.pt")
    model, shape = load_torch(work / "model.pt")
    calib = np.random.RandomState(0).randn(32, *shape[1:]).astype(np.float32)
    qdir = quantize_ptq(model, shape, calib).save(work / "q")
    build = compile_model(str(qdir), TARGET, work / "b", log=lambda *a: None)
    result, _ = simulate(work / "b", samples=2)
    mem = build["memory"]
    return {"calls": len(build["layers"]), "kernels": len({c["name"] for c in build["layers"]}),
            "arena_bytes": build["arena_bytes"], "sram_bytes": mem["sram_bytes"],
            "flash_bytes": mem["flash_bytes"], "instructions": result.get("instructions"),
            "bit_exact": bool(result["outputs_match"] and result["mismatches"] == 0)}


def main(quick: bool = False) -> dict:
    from edgeprune.models import build

    torch.set_num_threads(1)
    models = {
        "resnet8": (lambda: build("resnet8", (1, 1, 28, 28))[0], (1, 1, 28, 28)),
        "dscnn": (lambda: build("dscnn")[0], build("dscnn")[1]),
        "mobilenetv3_like_hardswish": (MobileNetV3Like, (1, 1, 28, 28)),
        "mobilenetv3_like_relu6": (lambda: MobileNetV3Like(nn.ReLU6()), (1, 1, 28, 28)),
        "fire_dense": (FireDense, (1, 1, 28, 28)),
        "conv_lstm_48_frames": (ConvLSTM, (1, 1, 96)),
    }
    if quick:
        models = {k: models[k] for k in ("mobilenetv3_like_hardswish", "fire_dense")}
    results = {"target": TARGET}
    for name, (make, shape) in models.items():
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory(prefix="ep-memory-") as tmp:
            results[name] = _measure(make(), shape, Path(tmp))
        print(name, results[name], flush=True)
    write_result(RESULTS, results)
    return results
