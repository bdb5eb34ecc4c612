"""Space <-> depth moves (PixelShuffle of a super-resolution head, PixelUnshuffle, YOLOv5's
Focus slices), crops (a U-Net's x[:, :, 2:-2, 2:-2]) and the elementwise max/min of two
tensors (LightCNN's Max-Feature-Map): pruned, read back from ONNX, bit-exact in int8 on the
host and on a target."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import bit_exact, conv_widths, pruned_equivalently, read_back
from edgeprune.quantize import ptq

torch.set_num_threads(1)


class SpaceAndMax(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.PixelUnshuffle(2)
        self.c1 = nn.Conv2d(4, 16, 3, padding=1)
        self.focus = nn.Conv2d(64, 16, 1)
        self.c2 = nn.Conv2d(8, 16, 3)
        self.up = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.c1(self.down(x)))                          # (N, 16, 8, 8)
        y = torch.cat([y[..., ::2, ::2], y[..., 1::2, ::2], y[..., ::2, 1::2],
                       y[..., 1::2, 1::2]], 1)                      # Focus: (N, 64, 4, 4)
        y = F.interpolate(self.focus(y), scale_factor=2.0)         # (N, 16, 8, 8)
        a, b = torch.split(y, 8, 1)
        m = torch.max(a, b)                                         # Max-Feature-Map
        z = self.c2(m)                                              # (N, 16, 6, 6)
        z = torch.minimum(z[:, :8], z[:, 8:]) + m[:, :, 1:-1, 1:-1]   # crop
        return self.out(F.pixel_shuffle(self.up(z), 2))             # (N, 1, 12, 12)


def test_space_moves_crops_and_max_feature_map_prune_and_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = SpaceAndMax().eval()
    shape, x = (1, 1, 16, 16), torch.randn(8, 1, 16, 16)
    pruned, _ = pruned_equivalently(model, shape, x, ratios=0.5)
    widths = conv_widths(pruned)
    # c1's channels pass the Focus slices; focus and c2 prune through their channel splits
    # (the max and the min pair the halves' channels); up by blocks of 4, each one output
    # channel of the pixel shuffle; out feeds the output: kept
    assert widths == [8, 8, 8, 4, 1]
    back = read_back(pruned, shape, x, tmp_path, tol=1e-5)
    qm = ptq.quantize_ptq(back, shape, torch.randn(64, *shape[1:]).numpy())
    kinds = [o.kind for o in qm.ops]
    assert {"maximum", "minimum", "transpose"} <= set(kinds)
    bit_exact(qm, x[:4].numpy(), "riscv32", tmp_path, like=pruned, tol=0.1)


class Unshuffled(nn.Module):
    """Pixel unshuffles after convs (module and function): each producer channel becomes four
    of the next conv's input columns."""
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(32, 8, 3, padding=1)
        self.down, self.out = nn.PixelUnshuffle(2), nn.Conv2d(32, 3, 1)

    def forward(self, x):
        y = F.relu(self.b(self.down(F.relu(self.a(x)))))
        return self.out(F.pixel_unshuffle(y, 2))


def test_pixel_unshuffle_prunes_its_producer_by_whole_channels(tmp_path):
    torch.manual_seed(0)
    model, shape, x = Unshuffled().eval(), (1, 1, 16, 16), torch.randn(8, 1, 16, 16)
    pruned, record = pruned_equivalently(model, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [4, 4, 3]
    assert pruned.b.in_channels == pruned.out.in_channels == 16
    assert len(record["layers"]["b"]["in_kept"]) == 16       # blocks of 4 columns
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    bit_exact(qm, x[:4].numpy(), "cortex-m7", tmp_path, like=pruned, tol=0.1)


class Resized(nn.Module):
    """A head resized back to another size by nearest neighbours (no whole factor), branches
    stacked on a new axis, and a gate broadcast with expand_as."""
    def __init__(self):
        super().__init__()
        self.c0, self.a, self.b = nn.Conv2d(1, 6, 3), nn.Conv2d(6, 8, 3), nn.Conv2d(6, 8, 3)
        self.gate = nn.Linear(8, 8)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = F.relu(self.c0(x))
        a, b = self.a(x), self.b(x)
        y = torch.stack([a, b], 1).amax(1) + torch.stack([a, b], 2).mean(2)
        g = torch.sigmoid(self.gate(y.mean((2, 3)))).view(-1, 8, 1, 1)
        y = y * g.expand_as(y)
        return self.out(F.interpolate(y, size=(15, 11), mode="nearest")
                        + F.interpolate(y, size=(15, 11), mode="nearest-exact"))


def test_nearest_to_any_size_stacks_and_expand_as_run_bit_exact(tmp_path):
    torch.manual_seed(0)
    model, shape, x = Resized().eval(), (1, 1, 14, 14), torch.randn(8, 1, 14, 14)
    pruned, _ = pruned_equivalently(model, shape, x, ratios=0.5)
    assert conv_widths(pruned) == [3, 8, 8, 2]
    qm = ptq.quantize_ptq(pruned, shape, torch.randn(64, *shape[1:]).numpy())
    rows = [o.attrs["rows"] for o in qm.ops if "rows" in o.attrs]
    assert len(rows) == 2 and rows[0] != rows[1]       # floor(o * s) and floor((o + .5) * s)
    bit_exact(qm, x[:4].numpy(), "cortex-m55", tmp_path, like=pruned, tol=0.1)
