"""Process titles (issue 12 A5): each program shows in ps under its own name, as exec would make it.

qmail-start's daemons and tcpserver's connection children are started by
fork-and-call; without titles they would all show their parent's command line.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from conftest import QHome
from sendkit import Running, Site
from ucspikit import DEADLINE, Served


def _title(pid: int) -> tuple[str, list[str]]:
    """Return (comm, argv) of pid as ps reads them."""
    comm = Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    raw = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0")
    # A title set by setproctitle is one string; an exec'd argv is NUL-separated.
    return comm, raw.decode().replace("\0", " ").split(" ") if raw else []


def _children(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_qmail_send_and_its_daemons_show_their_names(qhome: QHome, tmp_path: Path) -> None:
    site = Site(qhome, None, os.getuid(), os.getgid())
    d = Running(site, ["./Maildir/", "cat"], env={"PATH": "/usr/bin:/bin"})
    try:
        d.wait_for(b"status: local 0/10 remote 0/20")
        send = d.proc.pid
        assert _title(send) == ("qmail-send", ["qmail-send"])
        kids = [_title(p) for p in _children(send)]
        assert ("qmail-lspawn", ["qmail-lspawn", "./Maildir/"]) in kids
        assert ("qmail-rspawn", ["qmail-rspawn"]) in kids
        assert ("qmail-clean", ["qmail-clean"]) in kids
        assert ("cat", ["cat"]) in kids  # an exec'd logger keeps what exec gave it
    finally:
        assert d.stop() == 0


def test_tcpserver_children_show_the_program_they_run(qhome: QHome) -> None:
    smtpd = str(qhome.bin("qmail-smtpd"))
    env = {"PATH": "/usr/bin:/bin"}
    with Served([str(qhome.bin("tcpserver")), "-1", "-R", "-H", "-l", "t.example", "127.0.0.1", "0", smtpd],
                env=env) as srv:
        comm, argv = _title(srv.proc.pid)
        # Run from its stub by exec: comm is the script's name, the title its argv.
        assert comm == "tcpserver" and argv[0] == str(qhome.bin("tcpserver")) and argv[-1] == smtpd
        with socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE) as c:
            assert c.recv(100).startswith(b"220 ")
            (child,) = _children(srv.proc.pid)
            assert _title(child) == ("qmail-smtpd", [smtpd])
            c.sendall(b"QUIT\r\n")
            assert c.recv(100).startswith(b"221 ")


def test_an_exec_d_stub_shows_its_argv_not_the_interpreter(qhome: QHome) -> None:
    p = subprocess.Popen([str(qhome.bin("qmail-inject")), "-n", "someone"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            # The title is set before the program's own module is imported.
            comm, argv = _title(p.pid)
            if argv and "python" not in argv[0]:
                break
            assert time.monotonic() < deadline, argv
            time.sleep(0.01)
        assert (comm, argv) == ("qmail-inject", [str(qhome.bin("qmail-inject")), "-n", "someone"])
    finally:
        p.communicate(b"Subject: x\n\n", timeout=DEADLINE)


def test_argv_bytes_that_are_not_utf8_are_shown_escaped() -> None:
    import sys

    from conftest import ROOT

    # Addresses are bytes in qmail: qmail-local's argv may hold any of them.
    code = ("import sys, os; sys.path.insert(0, sys.argv[1]); from pyqmail import proctitle; "
            "proctitle.set_title('/x/qmail-local', ['qmail-local', os.fsdecode(b'a\\xff\\xfeb')]); "
            "print(open('/proc/self/cmdline', 'rb').read().rstrip(b'\\0').decode(), open('/proc/self/comm').read(), sep=chr(10))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "src")], capture_output=True, check=True).stdout
    title, comm = out.split(b"\n")[:2]
    assert title.rstrip() == b"qmail-local a\\xff\\xfeb" and comm == b"qmail-local"
