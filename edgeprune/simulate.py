"""The simulate stage: boot the firmware in QEMU on test inputs and check it against the host.

Float models are checked against ONNX's reference evaluator (independent of TVM) within a
relative tolerance; integer models against the numpy golden model, bit for bit.
"""

import struct
from pathlib import Path

import numpy as np

from .compile import load_build
from .errors import EdgepruneError
from .firmware import io_layout
from .qemu import TargetFailure, run_firmware
from .targets import load_target

FLOAT_RTOL = 1e-4
IO_MAGIC = 0x4E495045  # "EPIN"


def default_inputs(shape: tuple[int, ...], samples: int, seed: int = 0) -> np.ndarray:
    """Real Fashion-MNIST test images where the shape fits them, else seeded uniform noise."""
    if tuple(shape[1:]) == (1, 28, 28):
        try:
            from .data import load
            x = load("fashion-mnist").x_test[: samples * shape[0]]
            return x.reshape((samples,) + tuple(shape))
        except EdgepruneError:
            pass
    rng = np.random.default_rng(seed)
    return rng.random((samples,) + tuple(shape), dtype=np.float32)


def as_samples(x: np.ndarray, shape: tuple[int, ...], origin: str) -> np.ndarray:
    """Accept one input of the model's shape, or K of them stacked, or rows (samples without
    the batch axis) whose count is a multiple of the model's batch: K calls of that batch; or,
    at a batch of 1, one sample without the batch axis."""
    shape = tuple(shape)
    if x.shape == shape:
        return x[None]
    if x.shape[1:] == shape:
        return x
    if x.shape[1:] == shape[1:] and len(x) and len(x) % shape[0] == 0:
        return x.reshape((len(x) // shape[0],) + shape)
    if x.shape == shape[1:] and shape[0] == 1:      # one sample, without the batch axis
        return x.reshape((1,) + shape)
    raise EdgepruneError(f"{origin}: input of shape {x.shape} does not fit the model's input "
                         f"{shape} (give {shape}, (K,) + {shape}, or N rows of {shape[1:]} "
                         f"with N a multiple of the batch {shape[0]})")


def outputs_like_input(outputs: list[np.ndarray], x: np.ndarray | None,
                       in_shape: tuple[int, ...]) -> np.ndarray:
    """Stack per-sample outputs the way the input was given (inverse of `as_samples`)."""
    y = np.stack(outputs)
    if x is None or x.shape[1:] == tuple(in_shape):
        return y
    if x.shape == tuple(in_shape):
        return y[0]
    if x.shape == tuple(in_shape[1:]) and in_shape[0] == 1:
        return y[0, 0]                     # one sample in without a batch axis, one out
    return y.reshape((-1,) + y.shape[2:])  # N rows in (K calls of batch B), N rows out


def pack_inputs(samples: list[list[np.ndarray]], tensors: list[dict]) -> bytes:
    offsets, size = io_layout(tensors)
    blob = bytearray(struct.pack("<4I", IO_MAGIC, len(samples), size, 0))
    for arrays in samples:
        rec = bytearray(size)
        for arr, off, t in zip(arrays, offsets, tensors):
            raw = np.ascontiguousarray(arr, dtype=t["dtype"]).tobytes()
            rec[off:off + len(raw)] = raw
        blob += rec
    return bytes(blob)


def parse_outputs(stdout: str, count: int, tensors: list[dict]) -> list[list[np.ndarray]]:
    offsets, _ = io_layout(tensors)
    results: dict[int, list[np.ndarray]] = {}
    for line in stdout.splitlines():
        if line.startswith("ERROR"):
            raise TargetFailure(f"the firmware reported: {line}")
        if not line.startswith("OUT "):
            continue
        _, idx, rc, hexdata = line.split()
        if int(rc) != 0:
            raise TargetFailure(f"sample {idx}: kernel {int(rc) - 1} returned an error on the target")
        raw = bytes.fromhex(hexdata)
        results[int(idx)] = [np.frombuffer(raw[o:o + t["bytes"]], t["dtype"]).reshape(t["shape"])
                             for o, t in zip(offsets, tensors)]
    if len(results) != count or "DONE" not in stdout:
        raise TargetFailure(f"the firmware returned {len(results)} of {count} outputs "
                            f"(output ends with {stdout[-200:]!r})")
    return [results[i] for i in range(count)]


def count_instructions(marks: list[tuple[int, int]], symbols: dict[str, int], layers: list[str]):
    """Instructions of the first inference and of each of its kernels, from the plugin's log."""
    def addr(name):
        return symbols[name] & ~1  # Thumb addresses carry bit 0
    start, stop, mark = addr("ep_bench_start"), addr("ep_bench_stop"), addr("ep_layer_mark")
    seq = iter(marks)
    t0 = next((c for a, c in seq if a == start), None)
    if t0 is None:
        return None, []
    per_layer, prev = [], t0
    for a, c in seq:
        if a == mark:
            per_layer.append(c - prev)
            prev = c
        elif a == stop:
            return c - t0, [{"name": n, "instructions": i} for n, i in zip(layers, per_layer)]
    return None, []


def input_sets(in_t: list[dict], inputs, samples: int, seed: int = 0) -> list[np.ndarray]:
    """One (K,) + shape array per model input: `inputs` as `as_samples` takes it (a model
    with several inputs: a dict of them by name, or input0, input1, ... as in an .npz), or
    `samples` default inputs."""
    shapes = [tuple(t["shape"]) for t in in_t]
    if inputs is None:
        return [default_inputs(sh, samples, seed + k) for k, sh in enumerate(shapes)]
    if len(in_t) == 1:
        if isinstance(inputs, dict):
            if len(inputs) != 1:
                raise EdgepruneError(f"--input holds {len(inputs)} arrays "
                                     f"({', '.join(inputs)}); the model has one input")
            inputs = next(iter(inputs.values()))
        return [as_samples(np.asarray(inputs), shapes[0], "--input")]
    if not isinstance(inputs, dict):
        raise EdgepruneError(f"the model has {len(in_t)} inputs "
                             f"({', '.join(t['name'] for t in in_t)}); give --input an .npz "
                             "with one array per input, by those names or input0, input1, ...")
    sets = []
    for k, (t, sh) in enumerate(zip(in_t, shapes)):
        x = inputs.get(t["name"], inputs.get(f"input{k}"))
        if x is None:
            raise EdgepruneError(f"--input has no array '{t['name']}' (or 'input{k}') for "
                                 f"input {k}; it has {', '.join(inputs)}")
        sets.append(as_samples(np.asarray(x), sh, f"--input '{t['name']}'"))
    if len({len(x) for x in sets}) != 1:
        raise EdgepruneError(f"--input arrays give {[len(x) for x in sets]} samples for the "
                             "model's inputs; each input needs as many")
    return sets


def simulate(build_dir: Path, inputs=None, samples: int = 4,
             timeout: float = 300, seed: int = 0) -> tuple[dict, list[list[np.ndarray]]]:
    """Run `inputs` (or `samples` default ones; see input_sets) in QEMU and check the outputs
    against the host. Returns (result, per sample the target's outputs)."""
    build = load_build(build_dir)
    target = load_target(build["target"])
    in_t, out_t = build["inputs"], build["outputs"]
    sets = input_sets(in_t, inputs, samples, seed)
    x = sets[0]
    if build["kind"] == "int":
        from .quantize import reference
        from .quantize.qmodel import load as load_qmodel
        qmodel = load_qmodel(build_dir / "qmodel")
        x_dev = np.stack([reference.quantize_input(qmodel, s) for s in x]) if x.dtype.kind == "f" else x
        expected = [[np.asarray(o) for o in _as_list(reference.run(qmodel, s))] for s in x_dev]
        sets = [x_dev]
    else:
        from .frontend import graph_inputs, reference_run
        import onnx
        model = onnx.load(str(build_dir / "model.onnx"))
        sets = [s.astype(np.float32) for s in sets]
        # the graph's own names: the C names are sanitised ("input.1" -> input_1)
        names = [i.name for i in graph_inputs(model)]
        expected = [reference_run(model, dict(zip(names, one))) for one in zip(*sets)]
        x_dev = sets[0]

    elf = build_dir / build["firmware"]
    from .elfinfo import read_elf
    mem = read_elf(elf, build["prefix"])
    marks = [mem.symbols[n] & ~1 for n in ("ep_bench_start", "ep_bench_stop", "ep_layer_mark")]
    run = run_firmware(target, elf, pack_inputs([list(one) for one in zip(*sets)], in_t),
                       timeout, marks)
    if run.returncode != 0:
        raise TargetFailure(f"the firmware exited with status {run.returncode}: {run.stdout[-300:]}")
    got = parse_outputs(run.stdout, len(x_dev), out_t)
    instructions, layers = count_instructions(run.marks, mem.symbols, [l["name"] for l in build["layers"]])
    stack_used = next((int(l.split()[1]) for l in run.stdout.splitlines() if l.startswith("STACK")), None)

    max_abs = max(float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64))))
                  for gs, es in zip(got, expected) for g, e in zip(gs, es))
    scale = max(float(np.max(np.abs(e))) for es in expected for e in es) or 1.0
    if build["kind"] == "int":
        mismatches = sum(int(np.sum(g != e.astype(g.dtype))) for gs, es in zip(got, expected)
                         for g, e in zip(gs, es))
        match = mismatches == 0
    else:
        mismatches = None
        match = max_abs <= FLOAT_RTOL * scale
    result = {
        "target": target.name, "kind": build["kind"], "samples": len(x_dev),
        "outputs_match": bool(match), "max_abs_err": max_abs, "rel_err": max_abs / scale,
        "mismatches": mismatches, "instructions": instructions,
        "instructions_source": "qemu-instructions",
        "flash_bytes": mem.flash_bytes, "sram_bytes": mem.sram_bytes,
        "weights_bytes": mem.weights_bytes, "arena_bytes": build["arena_bytes"],
        "arena_lower_bound_bytes": build["arena_lower_bound_bytes"],
        "stack_used_bytes": stack_used, "stack_bytes": mem.stack_bytes, "layers": layers,
    }
    return result, got


def _as_list(out) -> list:
    return list(out) if isinstance(out, (list, tuple)) else [out]
