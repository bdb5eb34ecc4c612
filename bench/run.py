"""`make bench`: run every benchmark study; each writes its JSON under bench/results/.

Usage: python -m bench.run [--quick] [name ...]. Each module in BENCHMARKS has
`main(quick: bool) -> dict` and writes bench/results/<name>.json itself.
"""

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

# Benchmark modules (bench/<name>.py), in the order they run.
BENCHMARKS: list[str] = ["prune", "kernels", "widths", "feedback", "quant", "targets",
                         "memory"]


def write_result(path: Path, result: dict) -> None:
    """Write a study's JSON atomically (a study may checkpoint it many times while it runs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"subset of {BENCHMARKS}")
    parser.add_argument("--quick", action="store_true", help="reduced sizes, for a smoke run")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {BENCHMARKS}")
    failed = []
    for name in args.names or BENCHMARKS:
        start = time.time()
        print(f"== bench {name}", flush=True)
        try:
            result = importlib.import_module(f"bench.{name}").main(quick=args.quick)
        except Exception as e:  # one failing study must not hide the others' numbers
            print(f"bench {name} failed: {e!r}", file=sys.stderr)
            failed.append(name)
            continue
        print(json.dumps(result, indent=1)[:2000])
        print(f"== bench {name}: {time.time() - start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
