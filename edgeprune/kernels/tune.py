"""The tile tuner: per conv/dense layer shape, the register tile measured fastest on the target.

The SMLAD conv kernel (int8.py) keeps oc_block output channels x px_block pixels of a row in
registers; which tile wins depends on the shape (channel count, row width, kernel window) and
on the core. The tuner compiles the whole model once per candidate round — round r gives every
layer its r-th candidate — and reads each kernel's count from the profiler (retired
instructions in QEMU, deterministic; the cycle counter on a board with `port`), so R rounds
measure R candidates of every layer at once. The best tile per layer key (kernel shape, see
`int8.layer_key`) is kept in a per-target cache that `compile` reads, so later compiles,
deploys and feedback searches of any model with that layer shape use it.

The cache is namespaced by a hash of the kernel generator and the target file: a change to
either makes old measurements stale.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from .int8 import KERNEL_LAYERS, ROW_TILE_WITHOUT_DSP, TUNED_TILES

# Candidate tiles, best-known first (the untuned default is the first; see candidates for cores
# without SMLAD). A tile's sums live in registers: oc_block * px_block <= 12 leaves room for
# pointers and loads on a Cortex-M.
ROW_TILES = [(4, 2), (2, 4), (4, 3), (3, 3), (8, 1), (2, 2)]
ONE_PIXEL_TILES = [(8, 1), (4, 1), (12, 1), (6, 1), (10, 1), (2, 1)]


def candidates(key: str, dsp: bool = True) -> list[tuple[int, int]]:
    """The tiles tried for a layer key: one-pixel rows (dense, width-1 outputs) only vary oc.
    The first is the untuned default (without `dsp`, int8.ROW_TILE_WITHOUT_DSP for rows)."""
    y = re.search(r"\|y\(([\d,]+)\)", key)
    one_px = key.startswith("dense") or (y is not None and y.group(1).rstrip(",").split(",")[-1] == "1")
    if one_px:
        return ONE_PIXEL_TILES
    if dsp:
        return ROW_TILES
    return [ROW_TILE_WITHOUT_DSP] + [t for t in ROW_TILES if t != ROW_TILE_WITHOUT_DSP]


def _fingerprint(target) -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(here.glob("*.py")) + [Path(target.path)]:
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:12]


def cache_file(target) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "edgeprune" / "tuning" / f"{target.name}-{_fingerprint(target)}.json"


def load_tuned(target) -> dict[str, tuple[int, int]]:
    """layer key -> tile from the target's cache (empty when nothing was tuned)."""
    path = cache_file(target)
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged cache only costs speed; tuning again rewrites it
    return {k: tuple(v["tile"]) for k, v in entries.items()}


@contextlib.contextmanager
def tiles_for(target):
    """Around one lowering: the tuned tiles of `target`, unless a caller (the tuner) set some."""
    if TUNED_TILES.get():
        yield
        return
    token = TUNED_TILES.set(load_tuned(target))
    try:
        yield
    finally:
        TUNED_TILES.reset(token)


def _measure_round(spec: str, target, tiles: dict, workdir: Path, port: str) -> tuple[dict, dict]:
    """Compile `spec` with `tiles` and profile it: (kernel name -> layer key, name -> count)."""
    from ..compile import compile_model
    from ..profile import profile

    names: dict[str, str] = {}
    t1, t2 = TUNED_TILES.set(tiles), KERNEL_LAYERS.set(names)
    try:
        compile_model(spec, str(target.path), workdir, log=lambda *a: None)
    finally:
        TUNED_TILES.reset(t1)
        KERNEL_LAYERS.reset(t2)
    prof = profile(workdir, port=port)
    if prof["check"].get("mismatches"):
        from ..errors import EdgepruneError
        raise EdgepruneError(f"tile round {tiles}: outputs differ from the golden model "
                           f"({prof['check']}); a kernel generator bug")
    counts: dict[str, int] = {}
    for layer in prof["layers"]:
        n = layer.get("cycles") or layer["instructions"]
        if n is None:
            from ..errors import EdgepruneError
            raise EdgepruneError(f"the profiler returned no per-layer count on {port} "
                                 f"for {target.name}; the tuner needs one")
        counts[layer["name"]] = counts.get(layer["name"], 0) + int(n)
    return names, counts


def tune(spec: str, target_name: str, port: str = "qemu", log=print) -> dict:
    """Measure every candidate tile of every conv/dense layer of the quantized model `spec`;
    keep the best per layer key in the target's cache. Returns the per-layer table."""
    from ..errors import EdgepruneError
    from ..targets import load_target

    target = load_target(target_name)
    dsp = "dsp" in tuple(target.chip.get("features", ()))
    table: dict[str, dict[str, int]] = {}   # key -> "OCxPX" -> count
    with tempfile.TemporaryDirectory(prefix="edgeprune-tune-") as tmp:
        keys: list[str] = []
        rounds = len(ROW_TILES)
        for r in range(rounds):
            tiles = {k: candidates(k, dsp)[r] for k in keys}
            log(f"tuning round {r + 1}/{rounds}")
            names, counts = _measure_round(spec, target, tiles, Path(tmp) / f"r{r}", port)
            if not names:
                raise EdgepruneError(f"{spec}: no tiled int8 conv/dense kernel to tune on "
                                     f"{target.name} (a float model: run `edgeprune quantize` "
                                     f"first; Helium (MVE) kernels have no register tile)")
            keys = sorted(set(names.values()))
            per_key: dict[str, int] = {}
            for name, key in names.items():
                per_key[key] = per_key.get(key, 0) + counts.get(name, 0)
            for key, n in per_key.items():
                tile = tiles.get(key) or candidates(key, dsp)[0]  # round 0: the defaults
                table.setdefault(key, {})[f"{tile[0]}x{tile[1]}"] = n
    best = {k: min(v.items(), key=lambda kv: kv[1]) for k, v in table.items()}
    path = cache_file(target)
    cached = {}
    if path.exists():
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(path.read_text())
    for key, (tile, n) in best.items():
        cached[key] = {"tile": [int(t) for t in tile.split("x")], "count": n,
                       "measured": table[key], "port": port}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_suffix(f".{os.getpid()}.tmp")   # runs may tune at once
    tmp_path.write_text(json.dumps(cached, indent=1, sort_keys=True))
    tmp_path.replace(path)
    default = {k: v[next(iter(v))] for k, v in table.items()}
    return {"target": target.name, "cache": str(path), "layers": {
        k: {"default": default[k], "best_tile": best[k][0], "best": best[k][1], "measured": table[k]}
        for k in sorted(table)},
        "total_default": sum(default.values()), "total_tuned": sum(n for _, n in best.values())}
