"""qmail report: the HTML page from qmail-send's log, checked as text and as drawn by headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from conftest import CI, VENV_BIN, expect, run
from pyqmail.analog.synthlog import generate

CHROMIUM = "/usr/bin/chromium"
COLORS = {"success": (0x2e, 0x7d, 0x32), "failure": (0xc6, 0x28, 0x28),
          "deferral": (0xef, 0x6c, 0x00), "delay": (0x15, 0x65, 0xc0)}
# the page's fixed layout (report.STYLE): a 70px header, then three 320px plot sections
REGIONS = {"timeline": (70, 390), "delays": (390, 710), "reasons": (710, 1030)}
WINDOW = (900, 1100)


def send_log(home: Path, messages: int = 300, seed: int = 4) -> tuple[bytes, object]:
    """Write a generated TAI64N log as multilog leaves it: one rotated @-file and current."""
    log, counts = generate(messages, seed=seed, tai64n=True)
    lines = log.splitlines(keepends=True)
    logdir = home / "log" / "send"
    logdir.mkdir(parents=True)
    half = len(lines) // 2
    (logdir / "@400000005f5e100000000000.s").write_bytes(b"".join(lines[:half]))
    (logdir / "current").write_bytes(b"".join(lines[half:]))
    (logdir / "lock").write_bytes(b"")
    (logdir / "state").write_bytes(b"")
    return log, counts


def report(*args: str) -> bytes:
    res = expect(run([VENV_BIN / "qmail", "report", *args]))
    assert res.stderr == b""
    return res.stdout


def test_page_from_the_home_log(tmp_path: Path) -> None:
    log, counts = send_log(tmp_path)
    page = report("--home", str(tmp_path)).decode("utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # self-contained: no scripts, no links, no fetched resources
    for bad in ("<script", "<link", "src=", "@import", "url(", "https://"):
        assert bad not in page
    assert re.findall(r"http://[^\"]*", page) == ["http://www.w3.org/2000/svg"] * 3
    for ident, series in (("timeline", ("success", "failure", "deferral")), ("delays", ("delay",)),
                          ("reasons", ("failure", "deferral"))):
        svg = re.search(rf'<svg id="{ident}".*?</svg>', page, re.S)
        assert svg, ident
        for kind in series:
            m = re.search(rf'<path class="series series-{kind}" fill="[^"]+" d="([^"]*)"', svg.group())
            assert m and re.fullmatch(r"(M-?\d+ -?\d+h\d+v\d+h-\d+z)+", m.group(1)), (ident, kind)
    # zoverall's figures, as zoverall prints them for the same log
    (tmp_path / "whole").write_bytes(log)
    matched = expect(run(["/bin/sh", "-c", 'exec "$0" < "$1" 5>/dev/null', VENV_BIN / "matchup",
                          tmp_path / "whole"])).stdout
    overall = expect(run([VENV_BIN / "zoverall"], input=matched)).stdout.decode()
    for line in overall.split("\n\n", 4)[4].splitlines():
        if line:
            label, value = line.rsplit(" ", 1)
            assert f"<tr><th>{label.strip()}</th><td class=\"v\">{value}</td></tr>" in page
    assert f"success ({counts.success})" in page  # type: ignore[attr-defined]
    # the same page from the files named on the command line, in order, to a file
    out = tmp_path / "out.html"
    files = sorted(str(p) for p in (tmp_path / "log" / "send").glob("@*.s")) + [str(tmp_path / "log/send/current")]
    assert report("--log", *files, "-o", str(out)) == b""
    made = out.read_text("utf-8")
    strip = re.compile(r"<p>.*?</p>", re.S)  # sources and time of making differ
    assert strip.sub("", made) == strip.sub("", page)


def test_errors(tmp_path: Path) -> None:
    res = run([VENV_BIN / "qmail", "report", "--home", str(tmp_path)])
    expect(res, 111)
    assert res.stderr.startswith(b"qmail report: fatal: unable to read ")
    res = run([VENV_BIN / "qmail", "report", "--log", str(tmp_path / "nonesuch")])
    expect(res, 111)
    res = run([VENV_BIN / "qmail", "report", "--bogus"])
    expect(res, 100)


def test_empty_and_hostile_logs(tmp_path: Path) -> None:
    (tmp_path / "empty").write_bytes(b"")
    page = report("--log", str(tmp_path / "empty"))
    assert b"no deliveries" in page and b"Completed messages:</th><td class=\"v\">0<" in page
    hostile = (b"@4000000000000000zzzz info msg 1: bytes x\n\x00\xff<script>alert(1)</script>\n"
               b"1.0 info msg 1: bytes 1 from <a@b> qp 1 uid 1\n1.5 starting delivery 1: msg 1 to local <b>@x\n"
               b"2.0 delivery 1: failure: <script>&amp;\"'/\n2.5 end msg 1\n" + b"y" * (2 << 20))
    (tmp_path / "hostile").write_bytes(hostile)
    page = report("--log", str(tmp_path / "hostile"))
    assert b"<script" not in page and b"&lt;script&gt;&amp;amp;&quot;&#x27;/" in page


def _decode_png(data: bytes) -> tuple[int, int, list[bytes], int]:
    """Return width, height, rows of pixels and bytes per pixel of an 8-bit RGB(A) PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, []
    width = height = bpp = 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            width, height, depth, ctype, _c, _f, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and ctype in (2, 6) and interlace == 0
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat.append(body)
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        at = y * (stride + 1)
        kind_, line = raw[at], bytearray(raw[at + 1:at + 1 + stride])
        if kind_ == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind_ == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif kind_ == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind_ == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows, bpp


def _count(rows: list[bytes], bpp: int, rgb: tuple[int, int, int], top: int, bottom: int) -> int:
    """Count pixels within 3 of rgb in rows top..bottom."""
    n = 0
    for row in rows[top:bottom]:
        for x in range(0, len(row), bpp):
            if abs(row[x] - rgb[0]) <= 3 and abs(row[x + 1] - rgb[1]) <= 3 and abs(row[x + 2] - rgb[2]) <= 3:
                n += 1
    return n


def test_screenshot_shows_the_plots(tmp_path: Path) -> None:
    if not os.access(CHROMIUM, os.X_OK) and not shutil.which("chromium"):
        if CI:
            pytest.fail("chromium missing: CI must install it")
        pytest.skip("chromium not installed")
    browser = CHROMIUM if os.access(CHROMIUM, os.X_OK) else str(shutil.which("chromium"))
    send_log(tmp_path)
    page = tmp_path / "report.html"
    report("--home", str(tmp_path), "-o", str(page))
    shot = tmp_path / "shot.png"
    res = run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", page.as_uri()], timeout=120)
    assert shot.exists(), res.explain()
    width, height, rows, bpp = _decode_png(shot.read_bytes())
    assert (width, height) == WINDOW
    seen = {(kind, region): _count(rows, bpp, rgb, *REGIONS[region])
            for kind, rgb in COLORS.items() for region in REGIONS}
    where = {"success": {"timeline"}, "deferral": {"timeline", "reasons"}, "failure": {"timeline", "reasons"},
             "delay": {"delays"}}
    for (kind, region), n in seen.items():
        if region in where[kind]:
            assert n > 300, (kind, region, seen)  # a plot drawn in that colour
        else:
            assert n == 0, (kind, region, seen)  # and nowhere else


def test_terminal_gets_a_file_and_its_path(tmp_path: Path) -> None:
    """On a terminal, `qmail report` writes ./qmail-report.html and prints where; `-o -` still means stdout."""
    import pty
    import subprocess

    send_log(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    controller, terminal = pty.openpty()
    try:
        p = subprocess.run([VENV_BIN / "qmail", "report", "--home", str(tmp_path)], stdout=terminal,
                           stderr=subprocess.PIPE, cwd=work, env={"PATH": "/usr/bin:/bin"}, timeout=120)
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert p.returncode == 0, p.stderr
    out = work / "qmail-report.html"
    assert shown == f"qmail report: wrote {out} (open it in a browser)\r\n".encode()
    assert out.read_text().startswith("<!DOCTYPE html>")
    # not a terminal: stdout, as before
    res = expect(run([VENV_BIN / "qmail", "report", "--home", str(tmp_path)], cwd=tmp_path))
    assert res.stdout.startswith(b"<!DOCTYPE html>")
