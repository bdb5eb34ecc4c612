"""`edgeprune targets`: list the targets and their chip facts."""

import json

from ..targets import load_target, target_names


def register(sub) -> None:
    p = sub.add_parser("targets", help="list the targets with their chip facts")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    targets = [load_target(n) for n in target_names()]
    if args.json:
        print(json.dumps({t.name: {"aliases": t.aliases, "chip": t.chip,
                                   "qemu": t.qemu["machine"], "counter": t.counter,
                                   "quant": t.quant, "power": t.power}
                          for t in targets}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    table = Table(title="edgeprune targets")
    table.add_column("target", no_wrap=True)   # the name to type: never cut
    for col in ("stands for", "clock", "flash", "SRAM", "QEMU machine", "word lengths"):
        table.add_column(col)
    for t in targets:
        c = t.chip
        table.add_row("\n".join([t.name] + t.aliases), f"{c['part']} ({c['core']})",
                      f"{c['clock_hz'] / 1e6:.0f} MHz",
                      f"{c['flash_bytes'] // 1024} KiB", f"{c['sram_bytes'] // 1024} KiB",
                      t.qemu["machine"], "w" + "/".join(map(str, t.quant["weight_bits"])) +
                      " a" + "/".join(map(str, t.quant["activation_bits"])))
    Console().print(table)
    return 0
