"""qmail report: one self-contained HTML page of delivery statistics from qmail-send's log.

usage: qmail report [--home DIR] [--log FILE ...] [-o OUT.html]

Without -o the page goes to stdout, or, when stdout is a terminal, to
./qmail-report.html, whose path is printed.

The log (default: QMAILHOME/log/send, multilog's @-files in order, then
current) goes through matchup and qmailanalog's summaries; the page shows
deliveries over time (success, failure, deferral), the distribution of the
delivery delay, the most frequent failure and deferral reasons, and
zoverall's figures. Plots are inline SVG: no scripts, fonts or other files.
Exit 0, 100 on a usage error, 111 if a log cannot be read or the page written.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from pyqmail.analog import summaries
from pyqmail.analog.matchlog import Matchup, read_lines
from pyqmail.errors import describe

EXIT_OK = 0
EXIT_USAGE = 100
EXIT_TEMPORARY = 111
FD_IN = 0
FD_OUT = 1

SEND_LOG = os.path.join("log", "send")
TTY_FILE = "qmail-report.html"  # written in the current directory when stdout is a terminal
COLORS = {"success": "#2e7d32", "failure": "#c62828", "deferral": "#ef6c00", "delay": "#1565c0"}
TIME_BINS = 60
TOP_REASONS = 10
# ddelay histogram bucket edges in seconds (log scale); the last bucket is open
DELAY_EDGES = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
# plot geometry: the page's layout is fixed so a screenshot's regions are known
PLOT_W, PLOT_H = 860, 300
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 70, 20, 30, 50


class ReportError(Exception):
    """A log could not be read or the page could not be written."""


@dataclass
class Analysis:
    """What the page shows, gathered from matchup's m and d lines."""

    overall: summaries.Overall = field(default_factory=summaries.Overall)
    ends: dict[str, list[float]] = field(default_factory=lambda: {"success": [], "failure": [], "deferral": []})
    ddelays: list[float] = field(default_factory=list)
    failures: dict[bytes, int] = field(default_factory=dict)
    deferrals: dict[bytes, int] = field(default_factory=dict)
    records: list[bytes] = field(default_factory=list)
    pending: int = 0

    def feed(self, record: bytes) -> None:
        """Take one line of matchup output."""
        self.overall.feed(record)
        if not record.startswith(b"d "):
            return
        self.records.append(record)
        f = summaries.awk_fields(record)
        f += [b""] * (11 - len(f))
        kind = {b"k": "success", b"d": "failure", b"z": "deferral"}.get(f[1])
        if kind is None:
            return
        end = summaries.num(f[4])
        self.ends[kind].append(end)
        if kind == "success":
            self.ddelays.append(end - summaries.num(f[2]))
        elif kind == "failure":
            self.failures[f[10]] = self.failures.get(f[10], 0) + 1
        else:
            self.deferrals[f[10]] = self.deferrals.get(f[10], 0) + 1


def log_files(qmail_home: str) -> list[str]:
    """Return multilog's files of qmail-send's log in time order: the @-files by name, then current."""
    logdir = os.path.join(qmail_home, SEND_LOG)
    try:
        names = os.listdir(logdir)
    except OSError as e:
        raise ReportError(f"unable to read {logdir}: {describe(e)}") from e
    old = sorted(n for n in names if n.startswith("@") and n[-2:] in (".s", ".u"))
    files = [os.path.join(logdir, n) for n in old]
    if "current" in names:
        files.append(os.path.join(logdir, "current"))
    if not files:
        raise ReportError(f"no log in {logdir}")
    return files


def _chunks(paths: list[str]) -> Iterator[int]:
    """Yield an open descriptor for each path ("-" is stdin), closing each after use."""
    for path in paths:
        if path == "-":
            yield FD_IN
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ReportError(f"unable to read {path}: {describe(e)}") from e
        try:
            yield fd
        finally:
            os.close(fd)


def analyse(paths: list[str]) -> Analysis:
    """Run the logs, concatenated as `cat` would, through matchup; return the analysis."""
    m = Matchup()
    a = Analysis()
    carry = b""
    for fd in _chunks(paths):
        try:
            for line in read_lines(fd):
                if carry:
                    line, carry = carry + line, b""
                if not line.endswith(b"\n"):
                    carry = line  # an unended last line joins the next file's first, as with cat
                    continue
                out = m.line(line)
                if out:
                    for rec in out[:-1].split(b"\n"):
                        a.feed(rec)
        except OSError as e:
            raise ReportError(f"unable to read log: {describe(e)}") from e
    a.pending = len(m.msgs)
    return a


# -- SVG ---------------------------------------------------------------------

def _esc(text: bytes | str) -> str:
    """Return text escaped for HTML, log bytes read as latin-1 as qmail writes them."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return html.escape(text, quote=True)


def _nice(value: float) -> float:
    """Return a round number (1, 2 or 5 times a power of ten) at least value."""
    if value <= 0:
        return 1.0
    exp = math.floor(math.log10(value))
    for m in (1, 2, 5, 10):
        if m * 10 ** exp >= value:
            return float(m * 10 ** exp)
    return float(10 ** (exp + 1))


def _fmt_count(value: float) -> str:
    return f"{value:g}"


def _short(seconds: float) -> str:
    """Return a bucket edge for an axis label: 0.3, 30, 3k."""
    return f"{seconds / 1000:g}k" if seconds >= 1000 else f"{seconds:g}"


def _svg_open(ident: str, title: str) -> list[str]:
    return [f'<svg id="{ident}" xmlns="http://www.w3.org/2000/svg" width="{PLOT_W}" height="{PLOT_H}" '
            f'viewBox="0 0 {PLOT_W} {PLOT_H}" shape-rendering="crispEdges" role="img" aria-label="{_esc(title)}">',
            f'<text x="{PLOT_W // 2}" y="18" text-anchor="middle" class="title">{_esc(title)}</text>']


def _y_axis(top: float) -> list[str]:
    """Return the y axis with five gridlines from 0 to top."""
    inner_h = PLOT_H - MARGIN_T - MARGIN_B
    out = []
    for i in range(5):
        v = top * i / 4
        y = PLOT_H - MARGIN_B - inner_h * i / 4
        out.append(f'<line x1="{MARGIN_L}" y1="{y:.0f}" x2="{PLOT_W - MARGIN_R}" y2="{y:.0f}" class="grid"/>')
        out.append(f'<text x="{MARGIN_L - 6}" y="{y + 4:.0f}" text-anchor="end">{_fmt_count(v)}</text>')
    return out


def _bars_path(bars: Iterable[tuple[float, float, float, float]]) -> str:
    """Return one path drawing rectangles (x, y, w, h), pixel-aligned."""
    parts = []
    for x, y, w, h in bars:
        if h <= 0 or w <= 0:
            continue
        x0, y0 = round(x), round(y)
        w1, h1 = max(1, round(x + w) - x0), max(1, round(y + h) - y0)
        parts.append(f"M{x0} {y0}h{w1}v{h1}h{-w1}z")
    return "".join(parts)


def timeline_svg(a: Analysis) -> str:
    """Return the stacked bars of deliveries ended per time bin: success, deferral, failure."""
    out = _svg_open("timeline", "Deliveries over time")
    times = [t for series in a.ends.values() for t in series]
    if not times:
        out.append(f'<text x="{PLOT_W // 2}" y="{PLOT_H // 2}" text-anchor="middle">no deliveries</text></svg>')
        return "\n".join(out)
    t0, t1 = min(times), max(times)
    width = max((t1 - t0) / TIME_BINS, 1.0)
    bins = min(TIME_BINS, int((t1 - t0) / width) + 1)
    counts = {k: [0] * bins for k in a.ends}
    for kind, series in a.ends.items():
        for t in series:
            counts[kind][min(bins - 1, int((t - t0) / width))] += 1
    peak = max(sum(counts[k][i] for k in counts) for i in range(bins))
    top = _nice(peak)
    out += _y_axis(top)
    inner_w = PLOT_W - MARGIN_L - MARGIN_R
    inner_h = PLOT_H - MARGIN_T - MARGIN_B
    bar_w = inner_w / bins
    base = [0.0] * bins
    for kind in ("success", "deferral", "failure"):
        bars = []
        for i in range(bins):
            h = inner_h * counts[kind][i] / top
            bars.append((MARGIN_L + i * bar_w, PLOT_H - MARGIN_B - base[i] - h, bar_w, h))
            base[i] += h
        d = _bars_path(bars)
        if d:
            out.append(f'<path class="series series-{kind}" fill="{COLORS[kind]}" d="{d}"/>')
    for i in range(0, bins + 1, max(1, bins // 4)):
        x = MARGIN_L + i * bar_w
        stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0 + i * width))
        anchor = "start" if i == 0 else "end" if i + max(1, bins // 4) > bins else "middle"
        out.append(f'<text x="{x:.0f}" y="{PLOT_H - MARGIN_B + 16}" text-anchor="{anchor}">{stamp}</text>')
    out.append(_legend([("success", a.ends["success"]), ("deferral", a.ends["deferral"]),
                        ("failure", a.ends["failure"])]))
    out.append("</svg>")
    return "\n".join(out)


def _legend(items: list[tuple[str, list[float]]]) -> str:
    parts = []
    x = MARGIN_L
    for kind, series in items:
        parts.append(f'<rect x="{x}" y="{PLOT_H - 18}" width="12" height="12" fill="{COLORS[kind]}"/>'
                     f'<text x="{x + 16}" y="{PLOT_H - 8}">{kind} ({len(series)})</text>')
        x += 160
    return "".join(parts)


def delay_svg(a: Analysis) -> str:
    """Return the histogram of ddelay (queued to delivered) for successful deliveries."""
    out = _svg_open("delays", "Delivery delay of successful deliveries (ddelay, seconds)")
    if not a.ddelays:
        out.append(f'<text x="{PLOT_W // 2}" y="{PLOT_H // 2}" text-anchor="middle">no successful deliveries</text>')
        out.append("</svg>")
        return "\n".join(out)
    counts = [0] * len(DELAY_EDGES)
    for d in a.ddelays:
        i = 0
        while i + 1 < len(DELAY_EDGES) and d >= DELAY_EDGES[i + 1]:
            i += 1
        counts[i] += 1
    top = _nice(max(counts))
    out += _y_axis(top)
    inner_w = PLOT_W - MARGIN_L - MARGIN_R
    inner_h = PLOT_H - MARGIN_T - MARGIN_B
    slot = inner_w / len(counts)
    bars = []
    for i, c in enumerate(counts):
        h = inner_h * c / top
        bars.append((MARGIN_L + i * slot + slot * 0.1, PLOT_H - MARGIN_B - h, slot * 0.8, h))
        lo = _short(DELAY_EDGES[i])
        label = f"≥{lo}" if i + 1 == len(DELAY_EDGES) else f"{lo}–{_short(DELAY_EDGES[i + 1])}"
        out.append(f'<text x="{MARGIN_L + (i + 0.5) * slot:.0f}" y="{PLOT_H - MARGIN_B + 16}" '
                   f'text-anchor="middle">{label}</text>')
    out.append(f'<path class="series series-delay" fill="{COLORS["delay"]}" d="{_bars_path(bars)}"/>')
    out.append("</svg>")
    return "\n".join(out)


def reasons_svg(a: Analysis) -> str:
    """Return horizontal bars for the most frequent failure reasons, then deferral reasons."""
    out = _svg_open("reasons", "Top failure and deferral reasons")
    rows = [("failure", r, n) for r, n in sorted(a.failures.items(), key=lambda x: (-x[1], x[0]))[:TOP_REASONS // 2]]
    rows += [("deferral", r, n) for r, n in sorted(a.deferrals.items(), key=lambda x: (-x[1], x[0]))[:TOP_REASONS // 2]]
    if not rows:
        out.append(f'<text x="{PLOT_W // 2}" y="{PLOT_H // 2}" text-anchor="middle">no failures or deferrals</text>')
        out.append("</svg>")
        return "\n".join(out)
    top = max(n for _k, _r, n in rows)
    left = 40
    bar_max = 300
    row_h = (PLOT_H - MARGIN_T - 10) / TOP_REASONS
    for kind in ("failure", "deferral"):
        bars = []
        for i, (k, reason, n) in enumerate(rows):
            if k != kind:
                continue
            y = MARGIN_T + i * row_h
            bars.append((left, y + 2, max(1.0, bar_max * n / top), row_h - 4))
            text = reason.replace(b"_", b" ")
            if len(text) > 80:
                text = text[:77] + b"..."
            out.append(f'<text x="{left - 4}" y="{y + row_h * 0.7:.0f}" text-anchor="end">{n}</text>')
            out.append(f'<text x="{left + bar_max + 8}" y="{y + row_h * 0.7:.0f}" class="reason">{_esc(text)}</text>')
        d = _bars_path(bars)
        if d:
            out.append(f'<path class="series series-{kind}" fill="{COLORS[kind]}" d="{d}"/>')
    out.append("</svg>")
    return "\n".join(out)


# -- the page ----------------------------------------------------------------

STYLE = """
body { margin: 0; padding: 0; font-family: sans-serif; font-size: 14px; color: #222; background: #fff; }
header { height: 70px; padding: 10px 20px 0 20px; box-sizing: border-box; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0 0; color: #555; }
section.plot { height: 320px; padding: 10px 20px; box-sizing: border-box; }
svg text { font-size: 12px; fill: #333; }
svg text.title { font-size: 14px; font-weight: bold; }
svg .grid { stroke: #ddd; stroke-width: 1; }
table { border-collapse: collapse; margin: 10px 20px; }
td, th { padding: 2px 10px; text-align: left; }
td.v { text-align: right; font-family: monospace; }
pre { margin: 10px 20px; }
"""


def page(a: Analysis, sources: list[str], now: float | None = None) -> bytes:
    """Return the whole HTML page for an analysis."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(time.time() if now is None else now))
    figures = "\n".join(
        f"<tr><th>{_esc(label.strip())}</th><td class=\"v\">{_esc(value)}</td></tr>" if label else
        '<tr><td colspan="2">&nbsp;</td></tr>'
        for label, value in a.overall.figures())
    ddist = summaries.columnt(b"doneby avg pct\n" + b"".join(x + b"\n" for x in summaries.ddist(a.records)))
    body = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>qmail delivery report</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>qmail delivery report</h1>
<p>{_esc(", ".join(sources))} &middot; made {stamp} &middot; {a.pending} message(s) still in the queue at the end</p>
</header>
<section class="plot">
{timeline_svg(a)}
</section>
<section class="plot">
{delay_svg(a)}
</section>
<section class="plot">
{reasons_svg(a)}
</section>
<section id="overall">
<h2 style="margin: 10px 20px">Basic statistics (zoverall)</h2>
<table>
{figures}
</table>
<h2 style="margin: 10px 20px">Distribution of ddelays (zddist)</h2>
<pre>{_esc(ddist)}</pre>
</section>
</body>
</html>
"""
    return body.encode("utf-8")


def _parser(prog: str) -> argparse.ArgumentParser:
    from pyqmail.admin import install

    p = argparse.ArgumentParser(prog=prog, description="Write an HTML page of delivery statistics from qmail-send's log.")
    p.add_argument("--home", default=None, help=install.HOME_HELP)
    p.add_argument("--log", nargs="+", default=None, metavar="FILE",
                   help="qmail-send log files to read, in order (- for stdin; default: QMAILHOME/log/send)")
    p.add_argument("-o", "--output", default=None, metavar="OUT.html",
                   help="where to write the page, - for stdout (default: stdout, or ./qmail-report.html when "
                        "stdout is a terminal)")
    return p


def _write_file(path: str, data: bytes) -> None:
    """Write data to path (replacing it) or, for "-", to stdout."""
    from pyqmail.durable import write_all

    if path == "-":
        write_all(FD_OUT, data)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def command(argv: list[str]) -> int:
    """Run `qmail report`; return the exit code."""
    try:
        args = _parser(argv[0]).parse_args(argv[1:])
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    try:
        if args.log:
            paths = list(args.log)
        else:
            from pyqmail.admin import install

            paths = log_files(os.path.abspath(args.home or install.default_home()))
        data = page(analyse(paths), paths)
        output = args.output
        if output is None:
            # HTML on a terminal helps nobody: write a file and say where it is.
            output = os.path.abspath(TTY_FILE) if os.isatty(FD_OUT) else "-"
        try:
            _write_file(output, data)
        except OSError as e:
            raise ReportError(f"unable to write {output}: {describe(e)}") from e
        if args.output is None and output != "-":
            os.write(FD_OUT, f"qmail report: wrote {output} (open it in a browser)\n"
                     .encode("utf-8", "backslashreplace"))
    except ReportError as e:
        os.write(2, f"{argv[0]}: fatal: {e}\n".encode("utf-8", "backslashreplace"))
        return EXIT_TEMPORARY
    return EXIT_OK
