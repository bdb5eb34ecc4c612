"""The profile stage: run a build's profiling firmware over a serial link and measure it.

One host code path for QEMU and for a real board: `--port qemu` starts QEMU with its UART on a
loopback TCP port (and the instruction-count plugin attached); `socket://host:port` and
`/dev/tty*` go through pyserial as they are. The report says where every number came from:
`dwt-cycles` (a real core's cycle counter), `qemu-instructions` (exact retired instructions,
QEMU models no pipeline), `power-model` (target file × time) or `meter` (--energy-meter CSV).

Energy-meter CSV (`--energy-meter FILE`), logged by an external meter across the `--runs N`
inferences only (start the logger after "running" is printed, stop it before "done"), with a
header line and one of two column sets:
    timestamp_s,uj     cumulative energy readings (µJ); energy = (last - first) / N
    timestamp_s,mw     power samples (mW); energy = trapezoid integral over time / N
"""

import csv
import hashlib
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from . import protocol as P
from .compile import load_build
from .errors import EdgepruneError, check_at_least
from .firmware import io_layout
from .targets import FIRMWARE_DIR as FIRMWARE_TEMPLATES, Target, load_target

HARNESS = "profile_main.c"
FIRMWARE_DIR = "firmware_profile"
CHUNK = 256  # payload bytes per upload/read frame
QEMU_SOURCE = "qemu-instructions (1 instruction = 1 cycle at the chip clock)"


# ---- numbers → report ----------------------------------------------------------------------------

def power_model_uj(target: Target, ms: float) -> float:
    """Energy (µJ) of `ms` milliseconds at the target file's run-mode power (mW × ms = µJ)."""
    return target.power_mw * ms


def measurement(target: Target, instructions: int | None, layers: list[dict], memory: dict,
                cycles: int | None = None, meter_uj: float | None = None,
                meter_source: str = "") -> dict:
    """The report's latency/energy/memory/layers from counts; `layers` hold name + count.

    Time comes from cycles when the core counted them, else from instructions at the chip clock.
    """
    clock = target.chip["clock_hz"]
    count = cycles if cycles else instructions
    if cycles:
        source = target.counter["board"]
    elif instructions is not None:
        source = QEMU_SOURCE
    else:
        source = "none: the device's cycle counter read 0 and no instruction counter is attached"
    ms = None if count is None else 1000.0 * count / clock
    out_layers = []
    for l in layers:
        n = l.get("cycles") if cycles else l.get("instructions")
        l_ms = None if n is None else 1000.0 * n / clock
        out_layers.append({**l, "ms": l_ms, "uj": None if l_ms is None else power_model_uj(target, l_ms)})
    energy = {"uj": None if ms is None else power_model_uj(target, ms),
              "source": f"power-model: {target.power_mw:.1f} mW × time ({target.power['source']})"}
    if meter_uj is not None:
        energy = {"uj": meter_uj, "source": f"meter: {meter_source}",
                  "model_uj": energy["uj"]}
        if ms:  # split the measured energy over layers in proportion to their time
            for l in out_layers:
                l["uj"] = None if l["ms"] is None else meter_uj * l["ms"] / ms
    return {"target": target.name,
            "latency": {"cycles": cycles, "instructions": instructions, "ms": ms, "source": source},
            "energy": energy, "memory": memory, "layers": out_layers}


def from_simulation(target: Target, sim: dict) -> dict:
    """The report's format from an `edgeprune simulate` result (no serial link: the marks of
    simulate's QEMU run, the ELF's memory, the stack it painted)."""
    memory = {"flash_bytes": sim["flash_bytes"], "sram_bytes": sim["sram_bytes"],
              "arena_bytes": sim["arena_bytes"], "stack_bytes": sim["stack_used_bytes"],
              "stack_reserved_bytes": sim["stack_bytes"], "weights_bytes": sim["weights_bytes"]}
    layers = [{"name": l["name"], "op": _op_of(l["name"]), "instructions": l["instructions"]}
              for l in sim["layers"]]
    return measurement(target, sim["instructions"], layers, memory)


def read_energy_meter(path: Path, runs: int) -> tuple[float, str]:
    """µJ per inference from a meter CSV (format in the module docstring)."""
    if not path.exists():
        raise EdgepruneError(f"energy-meter file {path} does not exist")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise EdgepruneError(f"{path}: empty; expected a header 'timestamp_s,uj' or 'timestamp_s,mw'")
    header = [h.strip().lower() for h in rows[0]]
    if header not in (["timestamp_s", "uj"], ["timestamp_s", "mw"]):
        raise EdgepruneError(f"{path}: header {rows[0]} is neither 'timestamp_s,uj' nor 'timestamp_s,mw'")
    try:
        data = np.array([[float(v) for v in r] for r in rows[1:] if r], dtype=np.float64)
    except ValueError as e:
        raise EdgepruneError(f"{path}: a row is not two numbers ({e})")
    if data.ndim != 2 or data.shape[0] < 2 or data.shape[1] != 2:
        raise EdgepruneError(f"{path}: needs at least two rows of two numbers")
    t, v = data[:, 0], data[:, 1]
    if np.any(np.diff(t) <= 0):
        raise EdgepruneError(f"{path}: timestamps must increase")
    if header[1] == "uj":
        total, how = v[-1] - v[0], "cumulative µJ readings"
    else:
        total, how = float(np.sum((v[1:] + v[:-1]) / 2 * np.diff(t))) * 1000.0, "mW samples integrated"
    return float(total) / runs, f"{path.name} ({how}, {len(t)} rows over {t[-1] - t[0]:.3g} s, /{runs} runs)"


# ---- the profiling firmware ----------------------------------------------------------------------

def model_hash(build_dir: Path) -> int:
    """32-bit id of the generated library; the firmware reports it so a stale one is refused."""
    h = hashlib.sha256()
    for name in ("model.c", "kernels.c"):
        h.update((build_dir / "c_library" / name).read_bytes())
    return int.from_bytes(h.digest()[:4], "little")


def profile_firmware(build_dir: Path, defines: dict | None = None, out_dir: Path | None = None) -> Path:
    """The profiling firmware of a build (B/firmware_profile/firmware.elf), built when missing/stale."""
    from .firmware import build_firmware

    build = load_build(build_dir)
    target = load_target(build["target"])
    out = out_dir or build_dir / FIRMWARE_DIR
    # Rebuilt when the model, the defines, the harness or the board support change.
    sources = sorted((target.board_dir).glob("*")) + sorted((FIRMWARE_TEMPLATES / "common").glob("*"))
    digest = hashlib.sha256(repr(sorted((defines or {}).items())).encode()
                            + b"".join(f.read_bytes() for f in sources if f.is_file())).hexdigest()
    digest = f"{model_hash(build_dir):08x} {digest}"
    stamp = out / "model_hash"
    if (out / "firmware.elf").exists() and stamp.exists() and stamp.read_text() == digest:
        return out / "firmware.elf"
    defs = {"EP_MODEL_HASH": f"0x{model_hash(build_dir):08x}u", "EP_NUM_LAYERS": str(len(build["layers"])),
            "EP_LAYER_NAMES": f"{build['prefix']}_layer_names", "EP_ARENA_BYTES": f"{build['arena_bytes']}u",
            **(defines or {})}
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_firmware(target, build_dir / "c_library", build, tmp, harness=HARNESS, defines=defs,
                       chip=not build.get("beyond_chip"))
        (tmp / "model_hash").write_text(digest)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "firmware.elf"


# ---- the session ---------------------------------------------------------------------------------

def run_session(link: P.Link, build: dict, expected_hash: int, sample: bytes, runs: int,
                run_timeout: float) -> dict:
    """hello → upload → run N → read outputs, per-layer cycles, stack → bye."""
    hello = P.parse_hello(link.request(P.HELLO))
    link.booted_once = True  # from here on a boot frame means the device reset
    if hello["model_hash"] != expected_hash:
        raise P.ProtocolError(f"the device runs another model (hash {hello['model_hash']:08x}, this "
                              f"build {expected_hash:08x}); flash {FIRMWARE_DIR}/firmware.elf")
    n_layers = len(build["layers"])
    if hello["layers"] != n_layers or hello["in_bytes"] != len(sample):
        raise P.ProtocolError(f"the device reports {hello['layers']} layers and {hello['in_bytes']} B "
                              f"of input; this build has {n_layers} and {len(sample)}")
    names = []
    for i in range(n_layers):
        r = link.request(P.LAYER_NAME, struct.pack("<H", i))
        names.append(r[2:].decode(errors="replace"))
    for off in range(0, len(sample), CHUNK):
        part = sample[off:off + CHUNK]
        r = link.request(P.UPLOAD, struct.pack("<I", off) + part)
        if struct.unpack("<II", r) != (off, len(part)):
            raise P.ProtocolError(f"upload at offset {off} was acknowledged as {struct.unpack('<II', r)}")
    rc, done, total_cycles = struct.unpack("<iII", link.request(P.RUN, struct.pack("<I", runs),
                                                              timeout=run_timeout))
    if rc != 0:
        raise P.ProtocolError(f"kernel {-rc - 1} ({names[-rc - 1] if 0 < -rc <= n_layers else '?'}) "
                              f"returned an error on the device")
    if done != runs:
        raise P.ProtocolError(f"the device ran {done} of {runs} inferences")
    out = b""
    while len(out) < hello["out_bytes"]:
        n = min(CHUNK, hello["out_bytes"] - len(out))
        part = link.request(P.READ_OUTPUT, struct.pack("<IH", len(out), n))
        if len(part) != n:
            raise P.ProtocolError(f"asked for {n} output bytes, got {len(part)}")
        out += part
    layer_cycles = []
    for first in range(0, n_layers, CHUNK // 4):
        n = min(CHUNK // 4, n_layers - first)
        r = link.request(P.READ_LAYERS, struct.pack("<HH", first, n))
        layer_cycles += list(struct.unpack(f"<{n}I", r))
    used, size = struct.unpack("<II", link.request(P.STACK))
    link.request(P.BYE, b"\x00")
    return {"hello": hello, "names": names, "outputs": out, "cycles": total_cycles,
            "layer_cycles": layer_cycles, "stack_used": used, "stack_size": size,
            "retries": link.retried, "dropped_bytes": link.reader.dropped}


def runs_from_marks(marks: list[tuple[int, int]], symbols: dict[str, int]) -> list[tuple[int, list[int]]]:
    """(instructions, per-layer instructions) of every inference in the plugin's log."""
    start, stop, mark = (symbols[n] & ~1 for n in ("ep_bench_start", "ep_bench_stop", "ep_layer_mark"))
    runs, t0, prev, layers = [], None, None, []
    for a, c in marks:
        if a == start:
            t0, prev, layers = c, c, []
        elif a == mark and t0 is not None:
            layers.append(c - prev)
            prev = c
        elif a == stop and t0 is not None:
            runs.append((c - t0, layers))
            t0 = None
    return runs


def open_port(url: str, baud: int, timeout: float):
    import serial
    try:
        return serial.serial_for_url(url, baudrate=baud, timeout=timeout)
    except (serial.SerialException, ValueError, OSError) as e:
        raise EdgepruneError(f"cannot open serial port {url}: {e}")


def open_qemu_port(port: int, baud: int, timeout: float):
    """pyserial's socket:// port to QEMU's UART on 127.0.0.1:`port`. Its close() skips the
    0.3 s pause pyserial takes so a server can be reconnected at once: QEMU's is not, it exits."""
    from serial.urlhandler.protocol_socket import Serial

    class QemuUart(Serial):
        def close(self):
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            self.is_open = False

    ser = QemuUart(None, baudrate=baud, timeout=timeout)
    ser.port = f"socket://127.0.0.1:{port}"
    ser.open()
    return ser


def profile(build_dir: Path, port: str = "qemu", baud: int = 115200, runs: int = 1,
            inputs: np.ndarray | None = None, energy_meter: Path | None = None,
            timeout: float = 3.0, retries: int = 5, elf: Path | None = None) -> dict:
    """Profile one build; returns the report dict (see the issue's field list)."""
    from .elfinfo import read_elf
    from .simulate import input_sets, pack_inputs

    check_at_least((("--runs", runs, 1),))
    build = load_build(build_dir)
    target = load_target(build["target"])
    sets = [x[:1] for x in input_sets(build["inputs"], inputs, 1)]
    x_dev, expected = golden(build_dir, build, sets)
    sample = pack_inputs([[x[0] for x in x_dev]], build["inputs"])[16:]
    meter = read_energy_meter(energy_meter, runs) if energy_meter else None
    elf = elf or profile_firmware(build_dir)
    mem = read_elf(elf, build["prefix"])
    expected_hash = model_hash(build_dir)
    run_timeout = max(60.0, timeout)

    if port == "qemu":
        from .qemu import start_qemu_tcp, stop_qemu
        with tempfile.TemporaryDirectory(prefix="edgeprune-profile-") as tmp:
            log = Path(tmp) / "icount.txt"
            marks = [mem.symbols[n] & ~1 for n in ("ep_bench_start", "ep_bench_stop", "ep_layer_mark")]
            plugin_args = ",".join([f"out={log}"] + [f"mark={m:#x}" for m in marks])
            proc, ser = start_qemu_tcp(
                target, elf, lambda p: open_qemu_port(p, baud, timeout), plugin_args)
            try:
                link = P.Link(ser, timeout, retries, f"QEMU ({target.qemu['machine']}, pid {proc.pid})")
                session = run_session(link, build, expected_hash, sample, runs, run_timeout)
            except BaseException:
                ser.close()
                stop_qemu(proc, timeout=0)
                raise
            ser.close()
            err = stop_qemu(proc)
            if proc.returncode != 0:
                raise P.ProtocolError(f"QEMU exited with status {proc.returncode}: {err[-300:]}")
            counted = runs_from_marks(_read_log(log), mem.symbols)
        if len(counted) != runs:
            raise P.ProtocolError(f"the plugin saw {len(counted)} of {runs} inferences")
        instructions, per_layer = counted[0]
        deterministic = all(c == counted[0] for c in counted)
    else:
        ser = open_port(port, baud, timeout)
        try:
            link = P.Link(ser, timeout, retries, f"the device on {port}")
            session = run_session(link, build, expected_hash, sample, runs, run_timeout)
        finally:
            ser.close()
        instructions, per_layer, deterministic = None, [None] * len(build["layers"]), None

    # 0: the core has no cycle counter (QEMU's Arm models). RISC-V's mcycle under QEMU -icount
    # reads non-zero and equals the instruction count; it is reported as what it is, mcycle.
    cycles = session["cycles"] or None
    layers = []
    for i, l in enumerate(build["layers"]):
        entry = {"name": session["names"][i], "op": _op_of(l["name"]), "macs": l.get("macs"),
                 # the model's tensor the call writes: its layer (kernels are shared by shape)
                 "writes": l["args"][-1] if l.get("args") else None,
                 "instructions": per_layer[i]}
        if cycles:
            entry["cycles"] = session["layer_cycles"][i]
        layers.append(entry)
    memory = {"flash_bytes": mem.flash_bytes, "sram_bytes": mem.sram_bytes,
              "arena_bytes": build["arena_bytes"], "stack_bytes": session["stack_used"],
              "stack_reserved_bytes": session["stack_size"], "weights_bytes": mem.weights_bytes,
              "kernels_bytes": mem.kernels_bytes,
              "stack_source": "painted stack high-water on the device"}
    report = measurement(target, instructions, layers, memory, cycles,
                         *(meter if meter else (None, "")))
    got = _split_outputs(session["outputs"], build["outputs"])
    report["check"] = check_outputs(build["kind"], got, expected)
    report["runs"] = runs
    report["deterministic"] = deterministic
    report["link"] = {"port": port, "protocol_version": session["hello"]["version"],
                      "model_hash": f"{expected_hash:08x}", "retries": session["retries"],
                      "dropped_bytes": session["dropped_bytes"]}
    report["firmware"] = str(elf)
    return report


def _read_log(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        raise P.ProtocolError("the QEMU counting plugin wrote no log")
    return [(int(a, 16), int(b)) for a, b in (l.split() for l in log.read_text().splitlines())
            if a != "total"]


def _op_of(kernel: str) -> str:
    """The ops of a kernel from TVM's fused name, without its dedup digits
    (fused_conv2d1_add1_relu1 → conv2d_add_relu)."""
    import re
    parts = [re.sub(r"(?<=[a-z])\d+$", "", p) for p in kernel.split("_") if p and p != "fused"]
    return "_".join(parts) or kernel


def _split_outputs(raw: bytes, tensors: list[dict]) -> list[np.ndarray]:
    offsets, _ = io_layout(tensors)
    return [np.frombuffer(raw[o:o + t["bytes"]], t["dtype"]).reshape(t["shape"])
            for o, t in zip(offsets, tensors)]


def golden(build_dir: Path, build: dict, sets: list[np.ndarray]
           ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The device-format inputs (one array of samples per model input) and the golden model's
    outputs for the first sample."""
    if build["kind"] == "int":
        from .quantize import reference
        from .quantize.qmodel import load as load_qmodel
        qmodel = load_qmodel(build_dir / "qmodel")
        x = sets[0]
        x_dev = [np.stack([reference.quantize_input(qmodel, s) for s in x])
                 if x.dtype.kind == "f" else x]
        out = reference.run(qmodel, x_dev[0][0])
    else:
        import onnx
        from .frontend import graph_inputs, reference_run
        x_dev = [x.astype(np.float32) for x in sets]
        model = onnx.load(str(build_dir / "model.onnx"))
        # the graph's own input names: the build's are C identifiers ("input.1" -> input_1)
        out = reference_run(model, {i.name: x[0] for i, x in zip(graph_inputs(model), x_dev)})
    return x_dev, [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def check_outputs(kind: str, got: list[np.ndarray], expected: list[np.ndarray]) -> dict:
    from .simulate import FLOAT_RTOL
    diff = [np.abs(g.astype(np.float64) - e.astype(np.float64)) for g, e in zip(got, expected)]
    max_abs = max(float(d.max()) for d in diff)
    if kind == "int":
        mismatches = sum(int(np.sum(g != e.astype(g.dtype))) for g, e in zip(got, expected))
        match = mismatches == 0
        against = "numpy integer golden model (bit-exact)"
    else:
        scale = max(float(np.max(np.abs(e))) for e in expected) or 1.0
        mismatches = sum(int(np.sum(d > FLOAT_RTOL * scale)) for d in diff)
        match = mismatches == 0
        against = f"ONNX reference (within {FLOAT_RTOL:g} × max |y|)"
    return {"outputs_match": bool(match), "mismatches": mismatches, "max_abs_err": max_abs,
            "against": against}
