"""The deploy report: report.json → a summary table for the terminal and report.html.

The HTML is one file with inline SVG charts (no scripts, no fonts, no network), so it opens
offline anywhere: accuracy vs latency, per-layer latency and energy before vs after, memory map.
"""

from __future__ import annotations

import html
from pathlib import Path

BEFORE, AFTER = "#9aa5b1", "#1f77b4"


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(what, before = unpruned int8, after = deployed) rows for the terminal table."""
    b, acc = report.get("baseline") or {}, report["accuracy"]
    metric = acc.get("metric", "accuracy")   # R² for regression targets (edgeprune.task)

    def kb(n):
        return f"{n / 1024:.1f} KiB" if n is not None else "-"

    def num(v, spec):   # "-" where the unpruned model could not be measured
        return format(v, spec) if v is not None else "-"

    def get(d, *keys):
        for k in keys:
            d = (d or {}).get(k)
        return d

    rows = [
        (f"{metric} (host, %)", f"{acc['float']:.2f} float", f"{acc['quantized']:.2f} int8"),
        (f"{metric} on target (%)", f"{b.get('accuracy', float('nan')):.2f} (host int8)",
         f"{acc['on_target']:.2f} ({acc['on_target_samples']} samples)"),
        ("latency (ms)", num(get(b, "latency", "ms"), ".3f"), f"{report['latency']['ms']:.3f}"),
        ("instructions", num(get(b, "latency", "instructions"), ","),
         f"{report['latency']['instructions']:,}"),
        ("energy (uJ)", num(get(b, "energy", "uj"), ".1f"), f"{report['energy']['uj']:.1f}"),
        ("flash", kb(get(b, "memory", "flash_bytes")), kb(report["memory"]["flash_bytes"])),
        ("SRAM", kb(get(b, "memory", "sram_bytes")), kb(report["memory"]["sram_bytes"])),
        ("arena", kb(get(b, "memory", "arena_bytes")), kb(report["memory"]["arena_bytes"])),
    ]
    if b.get("error"):
        rows.append(("unpruned model", "does not fit the chip", b["error"]))
    if report.get("budget"):
        rows.append(("budget", ", ".join(f"{k}={v:g}" for k, v in report["budget"].items()),
                     "met" if report["met"] else "NOT met: " + "; ".join(report["violations"])))
    return rows


def print_summary(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"edgeprune deploy: {report['model']} on {report['target']}")
    table.add_column("")
    table.add_column("before (unpruned int8)", justify="right")
    table.add_column("after (deployed)", justify="right")
    for row in summary_rows(report):
        table.add_row(*row)
    (console or Console()).print(table)


# --- SVG charts -------------------------------------------------------------------------------

def _bars(title: str, labels: list[str], series: list[tuple[str, str, list[float]]],
          unit: str) -> str:
    """Horizontal grouped bars: one row per label, one bar per series (name, colour, values)."""
    row_h, bar_h, left, width = 8 + 12 * len(series), 11, 230, 420
    top = 40
    height = top + row_h * len(labels) + 20
    vmax = max([v for _, _, vals in series for v in vals if v is not None] + [1e-12])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" '
           f'height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="4" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    x = left
    for name, colour, _ in series:
        out.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14}" y="33">{html.escape(name)}</text>')
        x += 20 + 7 * len(name)
    for i, label in enumerate(labels):
        y = top + i * row_h
        out.append(f'<text x="{left - 6}" y="{y + row_h / 2 + 3}" text-anchor="end">'
                   f'{html.escape(label[:36])}</text>')
        for j, (_, colour, vals) in enumerate(series):
            v = vals[i] if i < len(vals) else None
            if v is None:
                continue
            w = max(1.0, width * v / vmax)
            by = y + 2 + j * 12
            out.append(f'<rect x="{left}" y="{by}" width="{w:.1f}" height="{bar_h}" fill="{colour}"/>'
                       f'<text x="{left + w + 4:.1f}" y="{by + 9}">{v:.4g} {unit}</text>')
    out.append("</svg>")
    return "".join(out)


def _scatter(title: str, points: list[tuple[float, float, str, str]], xlabel: str,
             ylabel: str) -> str:
    """Points (x, y, label, colour) on linear axes with a margin."""
    w, h, pad = 520, 320, 55
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs + [0.0]), max(xs) * 1.1 or 1.0
    y0, y1 = min(ys) - 2, max(ys) + 2

    def px(x):
        return pad + (w - 2 * pad) * (x - x0) / ((x1 - x0) or 1)

    def py(y):
        return h - pad - (h - 2 * pad) * (y - y0) / ((y1 - y0) or 1)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="4" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
           f'<text x="{w / 2}" y="{h - 15}" text-anchor="middle">{html.escape(xlabel)}</text>',
           f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">'
           f'{html.escape(ylabel)}</text>']
    for k in range(5):
        xv, yv = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        out.append(f'<text x="{px(xv):.1f}" y="{h - pad + 14}" text-anchor="middle">{xv:.3g}</text>'
                   f'<text x="{pad - 4}" y="{py(yv) + 3:.1f}" text-anchor="end">{yv:.3g}</text>')
    for x, y, label, colour in points:
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{colour}"/>'
                   f'<text x="{px(x) + 8:.1f}" y="{py(y) - 6:.1f}">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _memory_map(report: dict, flash_total: int | None, sram_total: int | None) -> str:
    m = report["memory"]
    weights = m.get("weights_bytes") or 0
    stack = m.get("stack_bytes") or 0
    rows = [("flash: weights", weights), ("flash: code + data", m["flash_bytes"] - weights),
            ("SRAM: arena", m["arena_bytes"]), ("SRAM: stack used", stack),
            ("SRAM: other (data, bss, stack reserve)", m["sram_bytes"] - m["arena_bytes"] - stack)]
    chart = _bars("Memory map (bytes)", [r[0] for r in rows],
                  [("deployed", AFTER, [float(r[1]) for r in rows])], "B")
    caps = []
    if flash_total:
        caps.append(f"flash {m['flash_bytes']:,} of {flash_total:,} B "
                    f"({100 * m['flash_bytes'] / flash_total:.1f} %)")
    if sram_total:
        caps.append(f"SRAM {m['sram_bytes']:,} of {sram_total:,} B "
                    f"({100 * m['sram_bytes'] / sram_total:.1f} %)")
    return chart + (f"<p>{html.escape('; '.join(caps))}</p>" if caps else "")


def _per_layer(report: dict, key: str, unit: str, title: str) -> str:
    after = report.get("layers", [])
    before = (report.get("baseline") or {}).get("layers", [])
    def label(l):   # the model's layer (the tensor the call writes), else the kernel
        return l.get("writes") or l["name"]
    labels = [label(l) for l in after]
    by_name = {label(l): l.get(key) for l in before}
    same_shape = len(before) == len(after)
    b_vals = [by_name.get(n, before[i].get(key) if same_shape else None)
              for i, n in enumerate(labels)]
    return _bars(title, labels, [("before (unpruned)", BEFORE, b_vals),
                                 ("after (deployed)", AFTER, [l.get(key) for l in after])], unit)


def write_html(report: dict, path: Path) -> None:
    from .targets import load_target

    try:
        target = load_target(report["target"])
        flash_total, sram_total = target.flash_bytes, target.sram_bytes
    except Exception:  # a report from a target file that is gone: charts without capacities
        flash_total = sram_total = None
    acc, base = report["accuracy"], report.get("baseline") or {}
    metric = acc.get("metric", "accuracy")
    points = []
    if base.get("latency"):
        points.append((base["latency"]["ms"], base.get("accuracy", acc["float"]),
                       "unpruned int8", BEFORE))
    for i, p in enumerate((report.get("feedback") or {}).get("trajectory", []) or []):
        if "latency_ms" in p and "accuracy" in p:
            points.append((p["latency_ms"], p["accuracy"], f"it {i}", "#ff7f0e"))
    points.append((report["latency"]["ms"], acc["quantized"], "deployed int8", AFTER))
    rows = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td>"
                   f"<td>{html.escape(c)}</td></tr>" for a, b, c in summary_rows(report))
    pruned = "".join(f"<tr><td>{html.escape(str(r['layer']))}</td><td>{r['channels_before']}</td>"
                     f"<td>{r['channels_after']}</td></tr>"
                     for r in report.get("pruning", {}).get("per_layer", []))
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgeprune report: {html.escape(report['model'])}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
td:first-child{{text-align:left}}</style></head><body>
<h1>{html.escape(report['model'])} on {html.escape(report['target'])}</h1>
<p>Data: {html.escape(str(report.get('data')))}; latency source: {html.escape(report['latency']['source'])};
energy source: {html.escape(report['energy']['source'])}. Outputs on the target
{'match' if report['check']['outputs_match'] else 'DO NOT match'} the golden model
({report['check']['mismatches']} mismatches over {report['check']['samples']} samples).</p>
<table><tr><th></th><th>before (unpruned int8)</th><th>after (deployed)</th></tr>{rows}</table>
<h2>{metric.capitalize()} vs latency</h2>
{_scatter(f'{metric.capitalize()} vs measured latency', points, 'latency (ms)', f'{metric} (%)')}
<h2>Per layer</h2>
{_per_layer(report, 'ms', 'ms', 'Latency per layer (ms)')}
{_per_layer(report, 'uj', 'uJ', 'Energy per layer (uJ)')}
<h2>Memory</h2>
{_memory_map(report, flash_total, sram_total)}
<h2>Pruning ({html.escape(str(report.get('pruning', {}).get('criterion')))})</h2>
<table><tr><th>layer</th><th>channels before</th><th>after</th></tr>{pruned}</table>
</body></html>
"""
    path.write_text(doc)
