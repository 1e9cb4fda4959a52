#!/usr/bin/env python3
"""Serving throughput against concurrent clients, drawn as an SVG.

    python3 bench/plot.py --date 2026-12-04T00:56Z bench/work/serving.tsv bench/serving.svg

Reads the TSV that bench/run.sh writes from section 2 (a header line, then
the columns workload, server, clients, requests_per_s, p99_ms) and draws one
panel per workload: requests/s against clients on a log2 axis, one line per
server, each point's p99 in its tooltip. The SVG is written by hand with the
standard library only, so a bench run needs nothing installed for it; it is
written to a temporary file and renamed, so a failed run leaves the last
plot whole.
"""

import argparse
import csv
import math
import os
import sys
import tempfile
from xml.sax.saxutils import escape

COLUMNS = ["workload", "server", "clients", "requests_per_s", "p99_ms"]

# The workloads and servers bench/run.sh measures, in the order drawn. Others
# are drawn too, after these, under their own names.
WORKLOADS = {
    "long-lived": "long-lived connections",
    "new-per-request": "a new connection per request",
    "hot-16-probes": "hot set of 16 probes, long-lived",
    "new-full-handshake": "new connections, full TLS handshakes",
}
SERVERS = {
    # name: (legend label, colour, dash pattern); colours from the Okabe-Ito
    # palette, which stays distinct for colour-blind readers.
    "G": ("GetProbe, tonic's client (G)", "#E69F00", ""),
    "P": ("GetProbe, plain HTTP/2 client (P)", "#0072B2", ""),
    "route": ("Central's HTTPS route, GET", "#009E73", ""),
    "nginx": ("nginx, static files, GET", "#000000", "6 4"),
}
OTHER_COLOURS = ["#CC79A7", "#D55E00", "#56B4E9", "#F0E442"]
# The first is a ring, drawn last, so that a point it shares with another
# server's (equal figures) shows both.
MARKERS = ["ring", "square", "triangle", "diamond"]

PANEL_W, PANEL_H = 460, 270
PLOT_LEFT, PLOT_RIGHT, PLOT_TOP, PLOT_BOTTOM = 70, 20, 34, 48
COLUMNS_OF_PANELS = 2
HEADER_H = 112
LEGEND_COLUMNS = 2


class BadInput(Exception):
    pass


def read_rows(path):
    """The rows of the TSV as dicts with numbers parsed; BadInput names the
    line and what it needs."""
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if header != COLUMNS:
                raise BadInput(f"{path}: the first line must be the header {' '.join(COLUMNS)} "
                               f"(tab-separated), not {header!r}")
            rows = []
            for number, fields in enumerate(reader, start=2):
                if not fields:
                    continue
                if len(fields) != len(COLUMNS):
                    raise BadInput(f"{path}:{number}: {len(fields)} fields, expected {len(COLUMNS)}")
                workload, server, clients, rps, p99 = fields
                try:
                    row = {"workload": workload, "server": server, "clients": int(clients),
                           "rps": float(rps), "p99": float(p99)}
                except ValueError:
                    raise BadInput(f"{path}:{number}: clients must be an integer and requests_per_s, "
                                   f"p99_ms numbers, got {fields!r}") from None
                if row["clients"] < 1 or row["rps"] < 0:
                    raise BadInput(f"{path}:{number}: clients must be at least 1 and requests_per_s "
                                   f"not negative, got {fields!r}")
                rows.append(row)
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror}") from None
    if not rows:
        raise BadInput(f"{path}: no rows after the header; run bench/run.sh's section 2 first")
    return rows


def in_order(names, known):
    """Known names in their order, then the rest in order of appearance."""
    seen = list(dict.fromkeys(names))
    return [n for n in known if n in seen] + [n for n in seen if n not in known]


def nice_step(span, ticks=5):
    """A round step (1, 2, 2.5 or 5 times a power of ten) giving about `ticks` ticks."""
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= raw:
            return factor * power
    return 10 * power


def marker(shape, x, y, colour, tooltip):
    tip = f"<title>{escape(tooltip)}</title>"
    if shape == "ring":
        return (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="none" stroke="{colour}" '
                f'stroke-width="2">{tip}</circle>')
    if shape == "square":
        return f'<rect x="{x - 3.3:.1f}" y="{y - 3.3:.1f}" width="6.6" height="6.6" fill="{colour}">{tip}</rect>'
    if shape == "triangle":
        points = f"{x:.1f},{y - 4.4:.1f} {x + 4.2:.1f},{y + 3.2:.1f} {x - 4.2:.1f},{y + 3.2:.1f}"
        return f'<polygon points="{points}" fill="{colour}">{tip}</polygon>'
    points = f"{x:.1f},{y - 4.6:.1f} {x + 4.2:.1f},{y:.1f} {x:.1f},{y + 4.6:.1f} {x - 4.2:.1f},{y:.1f}"
    return f'<polygon points="{points}" fill="{colour}">{tip}</polygon>'


def style_of(servers):
    styles = {}
    for i, name in enumerate(servers):
        label, colour, dash = SERVERS.get(name, (name, OTHER_COLOURS[i % len(OTHER_COLOURS)], ""))
        styles[name] = (label, colour, dash, MARKERS[i % len(MARKERS)])
    return styles


def panel(rows, workload, servers, styles, x_range, left, top):
    """One workload's panel at (left, top): axes, grid, a line per server."""
    out = []
    x0, x1 = left + PLOT_LEFT, left + PANEL_W - PLOT_RIGHT
    y0, y1 = top + PANEL_H - PLOT_BOTTOM, top + PLOT_TOP
    lo, hi = x_range
    mine = [r for r in rows if r["workload"] == workload]
    step = nice_step(max(r["rps"] for r in mine) * 1.05 or 1)
    y_max = step * math.ceil(max(r["rps"] for r in mine) * 1.05 / step or 1)

    def x_of(clients):
        return x0 + (math.log2(clients) - lo) / (hi - lo) * (x1 - x0)

    def y_of(rps):
        return y0 - rps / y_max * (y0 - y1)

    title = WORKLOADS.get(workload, workload)
    counts = sorted({r["clients"] for r in mine})
    if len(counts) == 1:
        title += f" ({counts[0]} client{'s' if counts[0] > 1 else ''} only)"
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{top + 20}" class="panel">{escape(title)}</text>')
    tick = 0.0
    while tick <= y_max + step / 2:
        y = y_of(tick)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" class="grid"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" class="ytick">{tick:,.0f}</text>')
        tick += step
    for exponent in range(math.ceil(lo), math.floor(hi) + 1):
        x = x_of(2 ** exponent)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y0 + 4}" class="axis"/>')
        if exponent % 2 == 0:
            out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}" class="grid"/>')
            out.append(f'<text x="{x:.1f}" y="{y0 + 17}" class="xtick">{2 ** exponent}</text>')
    out.append(f'<polyline points="{x0},{y1} {x0},{y0} {x1},{y0}" class="axis"/>')
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y0 + 36}" class="label">concurrent clients (log2 scale)</text>')
    out.append(f'<text transform="translate({left + 16},{(y0 + y1) / 2:.1f}) rotate(-90)" '
               f'class="label">requests/s</text>')
    series = {name: sorted((r for r in mine if r["server"] == name), key=lambda r: r["clients"])
              for name in servers}
    for name, points in series.items():
        label, colour, dash, shape = styles[name]
        if len(points) > 1:
            line = " ".join(f"{x_of(p['clients']):.1f},{y_of(p['rps']):.1f}" for p in points)
            dashes = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"{dashes}/>')
    # Markers over every line, the first server's rings on top.
    for name, points in reversed(series.items()):
        label, colour, dash, shape = styles[name]
        for p in points:
            tooltip = f"{label}, {p['clients']} clients: {p['rps']:,.0f} requests/s, p99 {p['p99']:g} ms"
            out.append(marker(shape, x_of(p["clients"]), y_of(p["rps"]), colour, tooltip))
    return out


def svg(rows, date):
    workloads = in_order([r["workload"] for r in rows], WORKLOADS)
    servers = in_order([r["server"] for r in rows], SERVERS)
    styles = style_of(servers)
    # One x range for every panel, so that a column of panels lines up.
    lo = math.log2(min(r["clients"] for r in rows))
    hi = math.log2(max(r["clients"] for r in rows))
    if hi - lo < 2:
        lo, hi = lo - 1, hi + 1
    # Room for the markers at either end, clear of the y axis.
    pad = (hi - lo) * 0.04
    lo, hi = lo - pad, hi + pad
    across = min(COLUMNS_OF_PANELS, len(workloads))
    down = math.ceil(len(workloads) / across)
    width, height = across * PANEL_W, HEADER_H + down * PANEL_H
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
           "<style>"
           ".title{font-size:17px;font-weight:bold;text-anchor:middle}"
           ".subtitle{font-size:12px;text-anchor:middle;fill:#444}"
           ".panel{font-size:13px;font-weight:bold;text-anchor:middle}"
           ".label{font-size:12px;text-anchor:middle;fill:#333}"
           ".xtick{font-size:11px;text-anchor:middle;fill:#333}"
           ".ytick{font-size:11px;text-anchor:end;fill:#333}"
           ".legend{font-size:12px;fill:#222}"
           ".grid{stroke:#e3e3e3;stroke-width:1}"
           ".axis{stroke:#555;stroke-width:1;fill:none}"
           "</style>",
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{width / 2}" y="26" class="title">Serving throughput against concurrent clients, '
           f'{escape(date)}</text>',
           f'<text x="{width / 2}" y="46" class="subtitle">bench/run.sh section 2: requests/s per server '
           f'(higher is better); hover a point for its p99</text>']
    slot = width / LEGEND_COLUMNS
    for i, name in enumerate(servers):
        label, colour, dash, shape = styles[name]
        x, y = slot * (i % LEGEND_COLUMNS) + PLOT_LEFT, 70 + 20 * (i // LEGEND_COLUMNS)
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x + 30:.1f}" y2="{y}" stroke="{colour}" '
                   f'stroke-width="2"{dashes}/>')
        out.append(marker(shape, x + 15, y, colour, label))
        out.append(f'<text x="{x + 38:.1f}" y="{y + 4}" class="legend">{escape(label)}</text>')
    for i, workload in enumerate(workloads):
        left, top = (i % across) * PANEL_W, HEADER_H + (i // across) * PANEL_H
        out.extend(panel(rows, workload, servers, styles, (lo, hi), left, top))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_atomically(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".plot-", suffix=".svg")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tsv", help="serving results: workload, server, clients, requests_per_s, p99_ms")
    parser.add_argument("svg", help="the SVG to write (replaced whole)")
    parser.add_argument("--date", required=True, help="the run's date, for the title")
    args = parser.parse_args()
    try:
        rows = read_rows(args.tsv)
    except BadInput as e:
        sys.exit(f"plot.py: {e}")
    try:
        write_atomically(args.svg, svg(rows, args.date))
    except OSError as e:
        sys.exit(f"plot.py: cannot write {args.svg}: {e.strerror}; the directory must exist and be writable")


if __name__ == "__main__":
    main()
