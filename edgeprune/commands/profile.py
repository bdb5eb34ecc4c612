"""`edgeprune profile BUILD --port qemu|socket://HOST:PORT|/dev/ttyACM0`: measure over serial."""

import json
from pathlib import Path

def register(sub) -> None:
    p = sub.add_parser("profile", help="per-layer latency, energy and memory over the serial link")
    p.add_argument("build", type=Path,
                   help="a folder written by `edgeprune compile` or `edgeprune deploy`")
    p.add_argument("--port", default="qemu",
                   help="'qemu' (start QEMU, UART on a loopback TCP port), socket://HOST:PORT, "
                        "or a serial device such as /dev/ttyACM0 (default: qemu)")
    p.add_argument("--baud", type=int, default=115200, help="baud rate of a serial device")
    p.add_argument("--runs", type=int, default=1, help="inferences to run (all are counted)")
    p.add_argument("--input", type=Path, help=".npy input of the model's shape (default: a test image)")
    p.add_argument("--energy-meter", type=Path,
                   help="CSV of an external meter: 'timestamp_s,uj' (cumulative) or "
                        "'timestamp_s,mw' (samples), logged across the runs")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for each reply")
    p.add_argument("--retries", type=int, default=5, help="tries per request after the first")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..profile import profile
    from ..protocol import ProtocolError

    from .simulate import load_npy

    from ..compile import build_folder
    args.build = build_folder(args.build)   # a deploy output: its build/
    x = load_npy(args.input) if args.input is not None else None
    try:
        report = profile(args.build, args.port, args.baud, args.runs, x, args.energy_meter,
                         args.timeout, args.retries)
    except ProtocolError as e:
        if args.json:
            print(json.dumps({"error": str(e)}))
        print(f"edgeprune profile: link failure: {e}", file=__import__("sys").stderr)
        return 3
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(table(report))
    return 0 if report["check"]["outputs_match"] else 1


def table(r: dict) -> str:
    lat, en, mem = r["latency"], r["energy"], r["memory"]
    unit = "cycles" if lat["cycles"] else "instructions"
    total = lat["cycles"] or lat["instructions"]
    lines = [f"profile: {r['target']} over {r['link']['port']} ({r['runs']} run(s), "
             f"{r['link']['retries']} retries)",
             f"{'layer (tensor written)':<28} {'kernel':<28} {unit:>12} {'ms':>9} {'uJ':>9}"]
    for l in r["layers"]:
        n = l.get("cycles") if lat["cycles"] else l.get("instructions")
        lines.append(f"{(l.get('writes') or '-')[:28]:<28} {l['name'][:28]:<28} "
                     f"{_fmt(n, 'd'):>12} {_fmt(l['ms'], '.4f'):>9} {_fmt(l['uj'], '.2f'):>9}")
    lines.append(f"{'total':<57} {_fmt(total, 'd'):>12} {_fmt(lat['ms'], '.4f'):>9} "
                 f"{_fmt(en['uj'], '.2f'):>9}")
    lines += [f"latency source: {lat['source']}", f"energy source: {en['source']}",
              f"memory: flash {mem['flash_bytes']} B, SRAM {mem['sram_bytes']} B, arena "
              f"{mem['arena_bytes']} B, weights {mem['weights_bytes']} B, stack high-water "
              f"{mem['stack_bytes']} of {mem['stack_reserved_bytes']} B",
              f"check: outputs {'match' if r['check']['outputs_match'] else 'MISMATCH'} "
              f"({r['check']['against']}; mismatches {r['check']['mismatches']}, "
              f"max abs err {r['check']['max_abs_err']:.3g})"]
    return "\n".join(lines)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)
