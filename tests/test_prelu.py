"""PReLU with a slope per channel (MTCNN's P-Net and O-Net): pruned with its channels, and in
int8 a requantization for each side of zero, bit-exact on the host and on a target."""

import torch
import torch.nn as nn

from checks import bit_exact, pruned_equivalently
from edgeprune.onnx_to_torch import onnx_to_torch
from edgeprune.quantize import ptq, to_relax

torch.set_num_threads(1)


class PNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(1, 10, 3), nn.PReLU(10)
        self.c2, self.a2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.c3, self.a3 = nn.Conv2d(16, 12, 3), nn.PReLU()      # one slope: a table
        self.fc, self.a4 = nn.Linear(12, 8), nn.PReLU(8)          # per feature of a vector
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.a1(self.c1(x)), 2, ceil_mode=True)
        x = self.a3(self.c3(self.a2(self.c2(x))))
        return self.head(self.a4(self.fc(x.mean((2, 3)))))


def test_per_channel_prelu_prunes_and_runs_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = PNet().eval()
    for m in model.modules():
        if isinstance(m, nn.PReLU):      # slopes of both signs and sizes, as trained ones get
            m.weight.data = torch.randn(m.num_parameters) * 0.5
    shape, x = (1, 1, 16, 16), torch.randn(8, 1, 16, 16)

    pruned, _ = pruned_equivalently(model, shape, x, ratios=0.5)
    assert [m.num_parameters for m in pruned.modules() if isinstance(m, nn.PReLU)] == [5, 8, 1, 4]

    torch.onnx.export(pruned, (torch.zeros(shape),), str(tmp_path / "m.onnx"), dynamo=False)
    back, _ = onnx_to_torch(tmp_path / "m.onnx")
    qm = ptq.quantize_ptq(back, shape, torch.randn(64, *shape[1:]).numpy())
    assert [o.kind for o in qm.ops].count("prelu") == 3
    # each a kernel that requantizes one side per value (TVM's lowering did both, in 64 bits)
    assert to_relax.to_relax(qm).script().count('"edgeprune.kernel": "prelu"') == 3
    bit_exact(qm, x[:4].numpy(), "cortex-m4", tmp_path, like=pruned, tol=0.1)
