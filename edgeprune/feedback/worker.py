"""The two pure jobs of the search, run inline or in a process pool, with an on-disk cache.

* `measure_job(model bytes, input shape, target file)` → measured costs (compile + QEMU);
* `candidate_job(model bytes, example, removal, criterion, ..., bits)` → (pruned and briefly
  fine-tuned model bytes, holdout accuracy of its int8/low-bit PTQ — what runs on the target —,
  pruning record with the PTQ model's holdout loss). A word-length move has no removal and no
  fine-tune: only the PTQ changes.

Each is a function of its arguments and of the data handed to the worker once at start-up, so a
result is cached under a hash of those arguments; a restarted search replays its cache.
Workers start from a fork server: an interpreter that has only imported torch, TVM and the
stages (no model, no torch or TVM computation state), so a pool starts in milliseconds, not the
~5 s of imports a "spawn" worker pays (every search starts a pool).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from .measure import from_bytes, measure_model, to_bytes


@dataclass
class JobData:
    """What every worker needs, sent once per worker: training/holdout slices and calibration."""
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    calib: np.ndarray
    name: str = "data"
    teacher: bytes | None = None    # the unpruned model: short fine-tunes distil from it
    distill: float = 0.0            # its weight alpha (0: labels only)

    def dataset(self):
        from ..data import Dataset
        return Dataset(self.name, self.x_train, self.y_train, self.x_val, self.y_val)


_DATA: JobData | None = None
_TEACHER = None


def _teacher():
    global _TEACHER
    if _TEACHER is None and _DATA.teacher is not None:
        _TEACHER = from_bytes(_DATA.teacher).eval()
    return _TEACHER


def finetune(model, dataset, epochs: float, lr: float, seed: int, teacher=None,
             distill: float = 0.0):
    """edgeprune.train.train_or_retry with oneDNN off: torch 2.13's oneDNN conv backward aborts
    the process ("double free or corruption") on some pruned widths (ResNet-8 at 7/15/30
    channels, reproduced), which a search visits by design. The native kernels are ~1.5x
    slower. With a `teacher` and `distill` > 0, distils from it (weight alpha = distill)."""
    from ..prune.methods import distill_loss
    from ..train import train_or_retry

    kw = {"loss": distill_loss(teacher, distill)} if teacher is not None and distill > 0 else {}
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        train_or_retry(model, dataset, lr, epochs=epochs, seed=seed, **kw)
        return model.eval()
    finally:
        torch.backends.mkldnn.enabled = was


def init_worker(data: JobData) -> None:
    global _DATA, _TEACHER
    torch.set_num_threads(1)
    _DATA, _TEACHER = data, None


def measure_job(blob: bytes, input_shape: tuple[int, ...], target_file: str,
                bits: dict[str, int] | None = None) -> dict:
    if not bits:
        return measure_model(from_bytes(blob), input_shape, target_file, _DATA.calib)
    try:
        return measure_model(from_bytes(blob), input_shape, target_file, _DATA.calib, bits)
    except Exception as e:  # a word length this layer's kernel cannot take: the search drops it
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def quantized_scores(model, input_shape: tuple[int, ...], calib: np.ndarray, x: np.ndarray,
                     y: np.ndarray, bits: dict[str, int] | None = None) -> tuple[float, float]:
    """(accuracy in percent, mean cross-entropy) of the PTQ model the target runs (weights at
    `bits`, default int8), by the numpy integer reference: bit-exact with the firmware, no
    compile needed. The loss is on the dequantized outputs (monotone: same argmax). On
    regression targets: (R² in percent, mean squared error), edgeprune.task."""
    from ..quantize import reference
    from ..quantize.ptq import quantize_ptq
    from .measure import weight_cfg

    qm = quantize_ptq(model, tuple(input_shape), calib, weight_cfg=weight_cfg(model, bits or {}))
    from ..task import numpy_loss, score

    outputs = reference.predict(qm, x).reshape(len(x), -1).astype(np.float64)
    return score(outputs, y), numpy_loss(outputs, y)


def quantized_accuracy(model, input_shape: tuple[int, ...], calib: np.ndarray, x: np.ndarray,
                       y: np.ndarray, bits: dict[str, int] | None = None) -> float:
    """Accuracy (percent) of the PTQ model the target runs: quantized_scores' first half."""
    return quantized_scores(model, input_shape, calib, x, y, bits)[0]


def candidate_job(blob: bytes, example: torch.Tensor, removal: dict[str, float], criterion: str,
                  seed: int, samples: int, lr: float, bits: dict[str, int] | None = None,
                  taps: dict[str, int] | None = None) -> tuple[bytes, float, dict]:
    """Prune `removal` (per-layer ratios) and keep every s-th window tap of each conv in `taps`
    (either may be empty), then fine-tune on `samples` samples; score the PTQ model at `bits`
    on the holdout."""
    from ..prune import patterns, prune
    from ..train import evaluate

    model = from_bytes(blob)
    layers: dict = {}
    if removal:
        from ..prune.methods import correct_channel_statistics, has_batchnorm, scoring_batches
        batches, meta = scoring_batches(_DATA.dataset(), seed=seed)
        before = model
        model, record = prune(model, example, criterion=criterion, ratios={"*": 0.0, **removal},
                              data=batches, meta_batch=meta, seed=seed)
        layers = record["layers"]
        # a model without BatchNorm (folded by an ONNX exporter) gets its channels'
        # statistics back (prune.methods); BatchNorm is not re-estimated here: the search's
        # acceptance study (bench/feedback.py) compares arms that all leave it as the cut did
        if not has_batchnorm(model):
            correct_channel_statistics(model, before, layers, _DATA.dataset(), seed=seed)
    if taps:
        patterns.stride_layers(model, taps)
    if samples > 0:   # a word-length move has none; a grown model (grow.py) only fine-tunes
        finetune(model, _DATA.dataset(), samples / len(_DATA.x_train), lr, seed,
                 _teacher(), _DATA.distill)
    acc, loss = quantized_scores(model, tuple(example.shape), _DATA.calib, _DATA.x_val,
                                 _DATA.y_val, bits)
    return to_bytes(model), acc, {"layers": layers, "holdout_loss": loss,
                                  "float_accuracy": evaluate(model, _DATA.x_val, _DATA.y_val)}


def job_key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


# What the fork server imports once: torch's optimizers import torch._dynamo on first use (~1 s).
PRELOAD = ["torch._dynamo", "tvm", "edgeprune.feedback.measure", "edgeprune.compile",
           "edgeprune.profile", "edgeprune.quantize.ptq", "edgeprune.quantize.to_relax",
           "edgeprune.lower", "edgeprune.prune", "edgeprune.train"]


def _pool_context():
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts: once per process
    return ctx


class Runner:
    """Runs jobs in a process pool; results cached under `cache`.

    Always a pool, even of one, so every job runs the same way in its own process and the
    caller's process (which fine-tunes) never holds TVM/QEMU state. The pool starts on the first
    job that is not cached, so a fully cached (resumed) search starts no process.
    """

    def __init__(self, data: JobData, cache: Path, workers: int):
        self.cache, self.workers, self.data = cache, max(1, workers), data
        self._pool = None
        self.hits = self.runs = 0

    @property
    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=_pool_context(),
                                             initializer=init_worker, initargs=(self.data,))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def measure(self, models: list, input_shape: tuple[int, ...], target, fingerprint: str,
                done: Callable[[], None] | None = None,
                bits: list[dict[str, int] | None] | None = None) -> list[dict]:
        """Measured costs of each model on `target` (weights of layer L at bits[i][L], default
        8), cached by code generator, model hash and word lengths."""
        from .measure import model_hash
        bits = bits or [None] * len(models)
        jobs = []
        for m, b in zip(models, bits):
            low = {k: int(v) for k, v in (b or {}).items() if int(v) != 8}
            # all-int8 keys stay those of before word lengths were searched (caches stay valid)
            key = job_key(fingerprint, model_hash(m), len(self.data.calib), *([low] if low else []))
            jobs.append((key, (to_bytes(m), tuple(input_shape), str(target.path), low)))
        return self.map("measure", measure_job, jobs, done)

    def map(self, kind: str, fn: Callable, jobs: list[tuple[str, tuple]],
            done: Callable[[], None] | None = None) -> list:
        """[(key, args)] → results in order; cached results are not run again."""
        results: list = [None] * len(jobs)
        pending = []
        for i, (key, args) in enumerate(jobs):
            hit = self._load(kind, key)
            if hit is not None:
                results[i] = hit
                self.hits += 1
                if done:
                    done()
            else:
                pending.append((i, key, args))
        futures = [(i, key, self.pool.submit(fn, *args)) for i, key, args in pending]
        for i, key, fut in futures:
            results[i] = fut.result()
            self._store(kind, key, results[i])
            self.runs += 1
            if done:
                done()
        return results

    # cache layout: <cache>/<kind>/<key>.json (+ <key>.pt for model bytes)
    def _load(self, kind: str, key: str):
        f = self.cache / kind / f"{key}.json"
        if not f.exists():
            return None
        obj = json.loads(f.read_text())
        if kind == "candidate":
            return (self.cache / kind / f"{key}.pt").read_bytes(), obj["accuracy"], obj["record"]
        return obj

    def _store(self, kind: str, key: str, result) -> None:
        d = self.cache / kind
        d.mkdir(parents=True, exist_ok=True)
        if kind == "candidate":
            blob, acc, record = result
            _atomic_write(d / f"{key}.pt", blob)
            obj = {"accuracy": acc, "record": record}
        else:
            obj = result
        _atomic_write(d / f"{key}.json", json.dumps(obj).encode())  # written last: marks done


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
