"""Measure a torch model on the target: PTQ (int8, as deploy quantizes it) → TVM → firmware →
the profiler (edgeprune.profile over QEMU), per-kernel counts plus flash/SRAM from the ELF.

`measure_model` is a pure function of (model, target, calibration input): the search runs it in
worker processes, each with its own QEMU, and caches its result on disk by model hash.
"""

from __future__ import annotations

import functools
import hashlib
import io
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import EdgepruneError

METRICS = ("latency_ms", "energy_uj", "flash_kb", "sram_kb")


def model_hash(model: nn.Module) -> str:
    """Architecture (fx code or module repr) and every tensor of the state dict."""
    h = hashlib.sha256()
    h.update(str(getattr(model, "code", None) or model).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:20]


# What turns a model into measured numbers: a change to any of these invalidates cached costs.
CODEGEN_SOURCES = ("compile.py", "lower.py", "emit.py", "plan.py", "schedule.py", "firmware.py",
                   "frontend.py", "simulate.py", "qemu.py", "elfinfo.py", "profile.py",
                   "kernels", "quantize", "qemu_plugin")


# What a candidate's pruned, fine-tuned and PTQ-scored result depends on besides its arguments.
CANDIDATE_SOURCES = ("prune", "train.py", "task.py", "data.py", "quantize", "feedback/worker.py")


def toolchain_fingerprint(target) -> str:
    """Hash of the code generator, firmware templates and target file (the cache's namespace).
    Taken once per process, like the imports it stands for."""
    return _fingerprint(Path(target.path))


def candidate_fingerprint() -> str:
    """Hash of the code that prunes, fine-tunes and scores a candidate: part of its cache key,
    so a search after an upgrade does not replay what older code computed."""
    return _fingerprint(None, CANDIDATE_SOURCES)


@functools.lru_cache(maxsize=None)
def _fingerprint(target_file: Path | None, sources: tuple[str, ...] = CODEGEN_SOURCES) -> str:
    from ..targets import FIRMWARE_DIR

    root = Path(__file__).resolve().parent.parent
    files = [target_file] + sorted(FIRMWARE_DIR.rglob("*")) if target_file is not None else []
    for name in sources:
        p = root / name
        files += sorted(p.rglob("*.[pc]*")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if f.is_file() and "__pycache__" not in f.parts:
            h.update(str(f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def to_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model, buf)
    return buf.getvalue()


def from_bytes(blob: bytes) -> nn.Module:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False).eval()


def costs_from_profile(prof: dict) -> dict:
    """The search's view of a profiler report (edgeprune.profile: counts → ms at the chip
    clock, µJ from the target's power model, memory of the profiled firmware) — the same report
    deploy checks its budget against, so both agree."""
    if prof["latency"]["ms"] is None or prof["energy"]["uj"] is None:
        raise EdgepruneError(f"the profiler returned no latency for {prof['target']} "
                             f"({prof['latency']['source']}); the search needs a counted run")
    return {
        "instructions": int(prof["latency"]["cycles"] or prof["latency"]["instructions"]),
        "latency_ms": float(prof["latency"]["ms"]),
        "energy_uj": float(prof["energy"]["uj"]),
        "flash_kb": prof["memory"]["flash_bytes"] / 1024,
        "sram_kb": prof["memory"]["sram_bytes"] / 1024,
        "kernels": [int(l.get("cycles") or l["instructions"]) for l in prof["layers"]],
        "kernel_names": [l["name"] for l in prof["layers"]],
        "source": {"latency": prof["latency"]["source"], "energy": prof["energy"]["source"],
                   "memory": "ELF of the profiled firmware + static arena"},
    }


def weight_cfg(model: nn.Module, bits: dict[str, int]) -> dict[str, tuple[str, int]]:
    """{module name: bits} -> the quantizer's {IR node: ("int", bits)} (quantize.stage's map)."""
    from ..quantize.stage import layer_weight_cfg

    return layer_weight_cfg(model, bits) if any(int(b) != 8 for b in bits.values()) else {}


def measure_model(model: nn.Module, input_shape: tuple[int, ...], target,
                  calib_x: np.ndarray, bits: dict[str, int] | None = None) -> dict:
    """Quantize (weights of layer L at `bits[L]`, default 8), compile and profile `model` once
    on the target (QEMU over the serial protocol, per-kernel counts); its measured costs."""
    from ..compile import compile_model
    from ..profile import profile
    from ..quantize.ptq import quantize_ptq
    from ..targets import load_target

    target = load_target(target) if isinstance(target, str) else target
    with tempfile.TemporaryDirectory(prefix="edgeprune-feedback-") as tmp:
        cfg = weight_cfg(model, bits or {})
        qmodel = quantize_ptq(model, tuple(input_shape), calib_x, weight_cfg=cfg)
        got = {o.name: int(o.attrs.get("weight_bits", 8)) for o in qmodel.weight_ops()}
        wrong = {n: (b, got.get(n)) for n, (_, b) in cfg.items() if got.get(n) != b}
        if wrong:  # never measure int8 while believing it is fewer bits
            raise EdgepruneError(f"word lengths not applied by the quantizer (node: (asked, "
                                 f"got)): {wrong}")
        qmodel.save(Path(tmp) / "q")
        # a candidate may exceed the chip (the unpruned model often does): measured all the
        # same, the search's budgets (and the chip's capacity) judge it
        compile_model(str(Path(tmp) / "q"), str(target.path), Path(tmp) / "b",
                      log=lambda *a: None, check_chip=False, firmware=False)
        x = calib_x[:input_shape[0]].reshape((1,) + tuple(input_shape))
        prof = profile(Path(tmp) / "b", port="qemu", inputs=x)
        if prof["check"].get("mismatches"):
            raise EdgepruneError(f"the target's outputs differ from the golden model "
                                 f"({prof['check']}) while measuring a candidate")
        return costs_from_profile(prof)
