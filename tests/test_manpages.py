"""Man pages: one per program (and qmail's file-format pages), installed by `qmail init`, readable with man -M."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CI, QHome, make_home
from pyqmail.admin import install, manpages

MAN_ENV = {"PATH": "/usr/bin:/bin", "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "80", "LANG": "C.UTF-8"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if CI:
            pytest.fail(f"{name} missing: .ci/run installs packages man-db and groff-base")
        pytest.skip(f"{name} not installed")
    return path


@pytest.fixture(scope="module")
def home() -> Iterator[QHome]:
    h = make_home()
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


def man(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([tool("man"), *args], capture_output=True, env=MAN_ENV, stdin=subprocess.DEVNULL,
                          timeout=60)


def test_man_m_shows_qmail_smtpd(home: QHome) -> None:
    page = home.path / "man" / "man8" / "qmail-smtpd.8"
    assert page.stat().st_mode & 0o777 == 0o644
    res = man("-M", str(home.path / "man"), "qmail-smtpd")
    text = res.stdout.decode()
    assert res.returncode == 0, res
    assert "NAME\n       qmail-smtpd - receive mail via SMTP\n" in text
    assert "SYNOPSIS\n       qmail-smtpd [ checkprogram subprogram ... ]\n" in text
    assert "DESCRIPTION" in text
    # A page whose synopsis comes from the docstring's usage: block.
    text = man("-M", str(home.path / "man"), "8", "qmail-inject").stdout.decode()
    assert "qmail-inject - preprocess and send a mail message" in text
    assert "qmail-inject [ -nNaAhH ] [ -fsender ] [ recip ... ]" in text
    text = man("-M", str(home.path / "man"), "5", "dot-qmail").stdout.decode()
    assert "dot-qmail - control the delivery of mail messages" in text


def test_every_program_has_a_page_in_its_section(home: QHome) -> None:
    programs = install.programs()
    assert set(manpages.SECTIONS) == set(programs), "SECTIONS must list exactly the console scripts"
    assert set(manpages.SYNOPSES) <= set(programs)
    on_disk = {p.name for p in (home.path / "man").glob("man*/*")}
    for name in programs:
        section = manpages.SECTIONS[name][0]
        assert f"{name}.{section}" in on_disk, name
    for name, (section, _d, _t) in manpages.FORMATS.items():
        assert f"{name}.{section}" in on_disk
    # qmail's sections for qmail's programs, Debian's for daemontools (8) and ucspi-tcp (1).
    assert {n: manpages.SECTIONS[n][0] for n in ("qmail-smtpd", "qmail-inject", "preline", "svscan", "tcpserver",
                                                 "splogger", "maildirmake")} == {
        "qmail-smtpd": 8, "qmail-inject": 8, "preline": 1, "svscan": 8, "tcpserver": 1, "splogger": 8,
        "maildirmake": 1}


def test_every_page_passes_groff_and_man_warnings(home: QHome) -> None:
    groff = tool("groff")
    pages = sorted((home.path / "man").glob("man*/*"))
    assert len(pages) >= len(install.programs()) + len(manpages.FORMATS)
    for page in pages:
        res = subprocess.run([groff, "-ww", "-z", "-man", str(page)], capture_output=True, timeout=60)
        assert (res.returncode, res.stdout, res.stderr) == (0, b"", b""), (page, res)
        res = man("--warnings", "-E", "ascii", "-l", str(page))
        assert res.returncode == 0 and res.stderr == b"", (page, res)
        page.read_text(encoding="ascii")


def test_roff_escaping(tmp_path: Path) -> None:
    body = "a \\n backslash and \\fB\n.dot at the start\n'quote at the start\nna\u00efve caf\u00e9\n\n    .indented line\n    \\x"
    text = manpages.render("x-prog", 1, "a test -- page", "x-prog [ -\\v ] 'arg'", body, "0")
    assert "\n.dot" not in text and "\n'quote" not in text and "\\&.dot" in text
    page = tmp_path / "x-prog.1"
    page.write_text(text, encoding="ascii")
    res = subprocess.run([tool("groff"), "-ww", "-z", "-man", str(page)], capture_output=True, timeout=60)
    assert res.stderr == b""
    out = man("-l", str(page)).stdout.decode()
    for want in ("a \\n backslash and \\fB", ".dot at the start", "'quote at the start", "na\u00efve caf\u00e9",
                 ".indented line", "\\x", "x-prog [ -\\v ] 'arg'", "x-prog - a test -- page"):
        assert want in out, (want, out)


def test_split_docstring_takes_the_usage_block() -> None:
    doc = "prog: does things.\n\nusage: prog [ -a ]\n         [ -b ] file\n\nIt does them well.\n"
    usage, body = manpages.split_docstring(doc)
    assert usage == "prog [ -a ]\n[ -b ] file"
    assert body.strip() == "It does them well."
    assert os.path.basename(manpages.__file__) == "manpages.py"
