"""qmail-start as root in a root-mode installation: every daemon under its qmail ids, deliveries as the user."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TEST_USER, QHome, expect, run, world_dir
from queuefmt import messages
from sendkit import Running, Site, qqueue

FQDN = "test.example.com"


@pytest.fixture
def rsite(root_home: QHome) -> Site:
    # Running is written for Site; here the site's "user" is None: qmail-start runs as root.
    return Site(root_home, None, 0, 0)


@pytest.fixture
def pqdir() -> Path:
    base = world_dir()
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _pq_home(base: Path, name: str, dotqmail: str | None = None) -> Path:
    pw = pwd.getpwnam(TEST_USER)
    home = base / name
    for d in (home, home / "Maildir", home / "Maildir" / "tmp", home / "Maildir" / "new", home / "Maildir" / "cur"):
        d.mkdir()
        os.chown(d, pw.pw_uid, pw.pw_gid)
        d.chmod(0o700)
    home.chmod(0o755)
    if dotqmail is not None:
        (home / ".qmail").write_text(dotqmail)
        os.chown(home / ".qmail", pw.pw_uid, pw.pw_gid)
    return home


def _assign(home: QHome, lines: list[str]) -> None:
    (home.path / "users" / "assign").write_text("".join(x + "\n" for x in lines) + ".\n")
    expect(run([home.bin("qmail-newu")]))


def _ids(pid: int) -> tuple[int, int, tuple[int, ...]]:
    uid = gid = -1
    groups: list[int] = []
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
            elif line.startswith("Groups:"):
                groups = [int(x) for x in line.split()[1:]]
    return uid, gid, tuple(groups)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def test_daemons_run_under_their_qmail_ids(rsite: Site) -> None:
    d = Running(rsite, ["./Maildir/", "cat"], env={"PATH": "/usr/bin:/bin"})
    try:
        d.wait_for(b"status: local 0/10 remote 0/20")
        gid_q = grp.getgrnam("qmail").gr_gid
        gid_n = grp.getgrnam("nofiles").gr_gid
        uid = {u: pwd.getpwnam(u).pw_uid for u in ("qmails", "qmailq", "qmailr", "qmaill")}
        send = d.proc.pid
        assert _ids(send) == (uid["qmails"], gid_q, (gid_q,))
        kids = {}
        for child in _children(send):
            kids[_ids(child)] = child
        assert (0, gid_q, (gid_q,)) in kids  # qmail-lspawn stays root: it delivers as each user
        assert (uid["qmailr"], gid_q, (gid_q,)) in kids
        assert (uid["qmailq"], gid_q, (gid_q,)) in kids
        # The logger is qmail-start's child too, but qmail-start became qmail-send.
        assert (uid["qmaill"], gid_n, (gid_n,)) in kids
    finally:
        assert d.stop() == 0


def test_root_mode_delivery_and_bounce(rsite: Site, pqdir: Path) -> None:
    pw = pwd.getpwnam(TEST_USER)
    pq = _pq_home(pqdir, "pq")
    nope = _pq_home(pqdir, "nope", "|echo 'No thanks.'; exit 100\n")
    _assign(rsite.home, [f"=pq:{TEST_USER}:{pw.pw_uid}:{pw.pw_gid}:{pq}:::",
                         f"=nope:{TEST_USER}:{pw.pw_uid}:{pw.pw_gid}:{nope}:::"])
    # No qmail-queued of our own: qmail-start starts one (the bounce is queued
    # by qmail-send as qmails through it) and it ends with qmail-send.
    d = Running(rsite, env={"PATH": "/usr/bin:/bin"})
    try:
        d.wait_for(b"status: local 0/10 remote 0/20")
        qqueue(rsite.home, b"pq@" + FQDN.encode(), [b"pq@" + FQDN.encode(), b"nope@" + FQDN.encode()],
               b"Subject: root\n\nmode\n")
        d.wait_for(lambda ls: sum(x.startswith(b"end msg ") for x in ls) == 2)
    finally:
        assert d.stop() == 0

    def queued_serving() -> bool:
        import socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            try:
                c.connect(str(rsite.home.path / "run" / "qmail-queue.sock"))
            except OSError:
                return False
            return True

    for _ in range(100):
        if not queued_serving():
            break
        time.sleep(0.05)
    assert not queued_serving(), "qmail-queued outlived qmail-send"
    msgs = sorted((pq / "Maildir" / "new").iterdir())
    assert len(msgs) == 2
    for m in msgs:
        st = m.stat()
        assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid)
    texts = [m.read_bytes() for m in msgs]
    (bounce,) = [t for t in texts if t.startswith(b"Return-Path: <>\n")]
    assert re.search(rb"\nReceived: \(qmail \d+ invoked for bounce\); ", bounce)
    assert b"<nope@test.example.com>:\nNo thanks.\n\n--- Below this line is a copy of the message.\n" in bounce
    assert messages(rsite.home.queue) == {}
