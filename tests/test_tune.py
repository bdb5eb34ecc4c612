"""The tile tuner: every candidate measured on the target, the best cached and used by compile."""

import json

import numpy as np
import torch

from edgeprune.cli import main as cli_main


class _TwoConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 6, 3, stride=2)
        self.fc = torch.nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(x.flatten(1))


def test_tune_measures_candidates_caches_the_best_and_compile_uses_it(tmp_path, monkeypatch,
                                                                       capsys):
    from edgeprune.compile import compile_model
    from edgeprune.kernels.tune import ROW_TILES, candidates, load_tuned
    from edgeprune.profile import profile
    from edgeprune.quantize.ptq import quantize_ptq
    from edgeprune.targets import load_target

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch.manual_seed(0)
    shape = (1, 2, 8, 8)
    qm = quantize_ptq(_TwoConv().eval(), shape,
                      np.random.RandomState(0).randn(8, *shape[1:]).astype(np.float32))
    qdir = qm.save(tmp_path / "q")

    assert cli_main(["tune", str(qdir), "--target", "cortex-m7", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["layers"]) == 3                      # two convs and the dense layer
    for key, row in result["layers"].items():
        assert len(row["measured"]) == len(set(candidates(key)))   # every candidate counted
        assert row["best"] == min(row["measured"].values()) <= row["default"]
    assert result["total_tuned"] <= result["total_default"]

    tuned = load_tuned(load_target("cortex-m7"))
    assert {k: f"{a}x{b}" for k, (a, b) in tuned.items()} == \
        {k: r["best_tile"] for k, r in result["layers"].items()}
    # A later compile picks the tuned tiles up: the conv/dense kernels count what the tuner kept.
    compile_model(str(qdir), "cortex-m7", tmp_path / "b", log=lambda *a: None)
    prof = profile(tmp_path / "b", port="qemu")
    assert prof["check"]["mismatches"] == 0
    counted = sum(l["instructions"] for l in prof["layers"] if l["name"].startswith("ep_int8"))
    assert counted == result["total_tuned"]
    assert len(ROW_TILES) == len(set(ROW_TILES))


def test_tune_rejects_a_float_model(tmp_path, capsys):
    assert cli_main(["tune", str(tmp_path), "--target", "cortex-m7"]) == 2
    assert "not a quantized model folder" in capsys.readouterr().err


def test_cores_without_smlad_try_their_own_default_row_tile_first():
    """Without SMLAD (RISC-V) the untuned row tile is int8.ROW_TILE_WITHOUT_DSP, and the tuner
    measures it as the default, then the same other candidates."""
    from edgeprune.kernels.int8 import ROW_TILE_WITHOUT_DSP
    from edgeprune.kernels.tune import ROW_TILES, candidates

    key = "conv|x(1,8,28,28)|w(8,8,3,3)|y(1,8,28,28)|s(1,1)|d(1,1)|p(1,1,1,1)|int8->int8"
    assert candidates(key)[0] == ROW_TILES[0]
    assert candidates(key, dsp=False)[0] == ROW_TILE_WITHOUT_DSP != ROW_TILES[0]
    assert sorted(candidates(key, dsp=False)) == sorted(ROW_TILES)
