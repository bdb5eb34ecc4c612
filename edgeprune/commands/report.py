"""`edgeprune report DIR`: the summary table (and report.html again) from a deploy folder."""

import json
from pathlib import Path

from ..errors import EdgepruneError


def register(sub) -> None:
    p = sub.add_parser("report", help="show a deploy folder's report (and rewrite report.html)")
    p.add_argument("folder", type=Path, help="a folder written by `edgeprune deploy`")
    p.add_argument("--json", action="store_true", help="print report.json")
    p.add_argument("--html", type=Path, help="write the HTML report here (default: FOLDER/report.html)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import print_summary, write_html

    f = args.folder / "report.json"
    if not f.exists():
        raise EdgepruneError(f"{args.folder} has no report.json; make one with `edgeprune deploy`",
                             stage="report")
    try:
        report = json.loads(f.read_text())
    except ValueError as e:
        raise EdgepruneError(f"{f}: not valid JSON ({e})", stage="report")
    write_html(report, args.html or args.folder / "report.html")
    if args.json:
        print(json.dumps(report))
    else:
        print_summary(report)
    return 0
