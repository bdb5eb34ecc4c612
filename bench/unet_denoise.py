"""A small U-Net denoiser on Fashion-MNIST: the model for bench.feedback's study of a network
whose cost on the chip is not its MACs (bilinear resizing and the requantizing concatenations
of its skips take 40 % of its time on the M55, and scale with channels the MAC count does
not see).

Noisy images (Gaussian noise, sigma 0.3) in, the clean ones out: a regression task, judged by
R² in percent. 6000 training and 300 test images; 2 epochs of training.

    python -m bench.unet_denoise OUT_DIR   # writes OUT_DIR/denoise.npz and OUT_DIR/unet.onnx
    python -m bench.feedback --model OUT_DIR/unet.onnx --data OUT_DIR/denoise.npz \\
        --target cortex-m55 --seeds 0 --workers 1 --result /tmp/unet/feedback.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _block(i: int, o: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1), nn.BatchNorm2d(o), nn.ReLU())


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _block(1, 12), _block(12, 24, 2), _block(24, 24, 2)
        self.d, self.e = _block(48, 16), _block(28, 12)
        self.out = nn.Conv2d(12, 1, 1)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        c = self.c(b)
        d = self.d(torch.cat([F.interpolate(c, scale_factor=2, mode="bilinear"), b], 1))
        up = F.interpolate(d, size=a.shape[2:], mode="bilinear", align_corners=True)
        return self.out(self.e(torch.cat([up, a], 1)))


def main(out: Path) -> None:
    from edgeprune import data
    from edgeprune.train import evaluate, train

    torch.set_num_threads(1)
    fm = data.load("fashion-mnist")
    rng = np.random.default_rng(0)
    clean, clean_test = fm.x_train[:6000], fm.x_test[:300]
    noisy, noisy_test = (
        (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32) for x in (clean, clean_test))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "denoise.npz", x_train=noisy, y_train=clean, x_test=noisy_test,
             y_test=clean_test)
    torch.manual_seed(0)
    model = UNet()
    train(model, data.Dataset("denoise", noisy, clean, noisy_test, clean_test), epochs=2,
          lr=0.05)
    print(f"unet: test R² {evaluate(model.eval(), noisy_test, clean_test):.2f} %")
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(out / "unet.onnx"),
                      dynamo=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
