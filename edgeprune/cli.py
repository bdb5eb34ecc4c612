"""The `edgeprune` command. Each subcommand lives in its own module with `register(subparsers)`.

Exit codes: 0 success, 1 a check failed (outputs mismatch, budget not met), 2 bad input or
environment (message names the problem), 3 the target crashed or hung, 130 interrupted.
"""

import argparse
import importlib
import sys

from .errors import EdgepruneError

# Modules that register subcommands, in the order `--help` lists them.
COMMAND_MODULES = [
    "edgeprune.commands.targets",
    "edgeprune.commands.compile",
    "edgeprune.commands.tune",
    "edgeprune.commands.simulate",
    "edgeprune.commands.profile",
    "edgeprune.prune.cli",
    "edgeprune.quantize.cli",
    "edgeprune.commands.deploy",
    "edgeprune.commands.report",
    "edgeprune.feedback.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a stage not built yet in this checkout
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgepruneError as e:
        print(f"edgeprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
