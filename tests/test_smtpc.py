"""qmail-smtpc: qmail-queue's interface, qmail-remote to a smarthost, qmail-queue's exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, QHome, expect, run
from remotekit import SmtpServer, dead_port

LAUNCHER = "import sys; from pyqmail.remote.qmail_smtpc import main; sys.exit(main(sys.argv))"
MESSAGE = b"Subject: smarthost\n\n.dot\nbody\n"
RECEIVED = rb"Received: \(qmail \d+ invoked by uid %d\); \d+ [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000\r\n" % os.getuid()


def program(home: QHome) -> list[str]:
    """The program: its stub once installed, else the module under this home."""
    stub = home.bin("qmail-smtpc")
    return [str(stub)] if stub.exists() else [sys.executable, "-c", LAUNCHER]


def envelope(sender: bytes, *recips: bytes) -> bytes:
    return b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recips) + b"\0"


def smtpc(home: QHome, env_bytes: bytes, message: bytes = MESSAGE, **env: str) -> subprocess.CompletedProcess[bytes]:
    r, w = os.pipe()
    os.write(w, env_bytes)
    os.close(w)
    try:
        return subprocess.run(program(home), input=message, stdout=r, stderr=subprocess.PIPE, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "QMAILHOME": str(home.path),
                                   "PYTHONPATH": str(ROOT / "src"), "DNSCACHEIP": "127.0.0.1:9", **env})
    finally:
        os.close(r)


def catch_all(home: QHome, port: int) -> None:
    home.control("smtproutes", f":[127.0.0.1]:{port}\n")


def test_every_recipient_accepted(qhome: QHome) -> None:
    with SmtpServer() as srv:
        catch_all(qhome, srv.port)
        p = smtpc(qhome, envelope(b"s@here.example", b"a@far.example", b"b@other.example"))
    assert (p.returncode, p.stderr) == (0, b"")
    (s,) = srv.sessions
    assert s.commands[0].startswith(b"EHLO ") and s.commands[1].startswith(b"HELO ")  # qmail-remote's EHLO, refused
    assert s.commands[2:] == [b"MAIL FROM:<s@here.example>", b"RCPT TO:<a@far.example>",
                              b"RCPT TO:<b@other.example>", b"DATA", b"QUIT"]
    assert re.fullmatch(RECEIVED + rb"Subject: smarthost\r\n\r\n\.\.dot\r\nbody\r\n", s.data), s.data


def test_smarthost_from_the_environment(qhome: QHome) -> None:
    with SmtpServer() as srv:
        # The book's $SMARTHOST names the host; qmail-remote's own routes still apply to it.
        qhome.control("smtproutes", f"relay.example:[127.0.0.1]:{srv.port}\n")
        p = smtpc(qhome, envelope(b"s@here.example", b"a@far.example"), SMARTHOST="relay.example")
    assert p.returncode == 0, p.stderr
    assert srv.sessions[0].commands[3] == b"RCPT TO:<a@far.example>"


@pytest.mark.parametrize("rcpt,code", [
    ([b"451 busy\r\n"], 71),                                   # deferred: temporary
    ([b"550 no\r\n"], 31),                                     # every recipient rejected: D
    ([b"250 ok\r\n", b"550 no\r\n"], 31),                      # one rejected for good
    ([b"451 busy\r\n", b"550 no\r\n"], 71),                    # a deferral wins: retry all
])
def test_recipient_replies(qhome: QHome, rcpt: list[bytes], code: int) -> None:
    with SmtpServer(replies={"RCPT": list(rcpt)}) as srv:
        catch_all(qhome, srv.port)
        p = smtpc(qhome, envelope(b"s@here.example", b"a@far.example", b"b@far.example"))
    assert (p.returncode, p.stderr) == (code, b"")


@pytest.mark.parametrize("replies,code", [
    ({"MAIL": b"451 later\r\n"}, 71),
    ({"MAIL": b"553 never\r\n"}, 31),
    ({".": b"554 refused\r\n"}, 31),
    ({".": b"452 full\r\n"}, 71),
])
def test_message_replies(qhome: QHome, replies: dict[str, bytes], code: int) -> None:
    with SmtpServer(replies=replies) as srv:  # type: ignore[arg-type]
        catch_all(qhome, srv.port)
        p = smtpc(qhome, envelope(b"s@here.example", b"a@far.example"))
    assert p.returncode == code, p.stderr


def test_no_connection_is_73(qhome: QHome) -> None:
    catch_all(qhome, dead_port())
    assert smtpc(qhome, envelope(b"s@x", b"a@far.example")).returncode == 73


def test_partial_final_line_is_permanent(qhome: QHome) -> None:
    with SmtpServer() as srv:
        catch_all(qhome, srv.port)
        assert smtpc(qhome, envelope(b"s@x", b"a@far.example"), message=b"no newline").returncode == 31


@pytest.mark.parametrize("routes", [None, "far.example:[127.0.0.1]:2525\n", ":\n", ":::25\n"])
def test_without_a_smarthost_is_55(qhome: QHome, routes: str | None) -> None:
    qhome.control("smtproutes", routes)
    assert smtpc(qhome, envelope(b"s@x", b"a@far.example")).returncode == 55


@pytest.mark.parametrize("env_bytes,code", [
    (b"", 54),                                   # no envelope at all
    (b"Fs@x\0Ta@far.example\0", 54),             # no final NUL
    (b"Ts@x\0\0", 91),                           # no F first
    (b"Fs@x\0Xa@far.example\0\0", 91),           # not a T line
    (b"F" + b"x" * 5000 + b"\0\0", 11),          # address too long
    (b"Fs@x\0T" + b"y" * 5000, 11),              # too long, and never ends
])
def test_hostile_envelopes(qhome: QHome, env_bytes: bytes, code: int) -> None:
    with SmtpServer() as srv:
        catch_all(qhome, srv.port)
        p = smtpc(qhome, env_bytes)
    assert (p.returncode, p.stderr) == (code, b"")
    assert srv.sessions == []


def test_no_recipients_is_taken_and_dropped(qhome: QHome) -> None:
    with SmtpServer() as srv:
        catch_all(qhome, srv.port)
        assert smtpc(qhome, b"Fs@x\0\0").returncode == 0
    assert srv.sessions == []


def test_qmail_remote_missing_is_81(qhome: QHome) -> None:
    catch_all(qhome, dead_port())
    qhome.bin("qmail-remote").unlink()
    assert smtpc(qhome, envelope(b"s@x", b"a@far.example")).returncode == 81


def test_as_qmailqueue_for_qmail_inject(qhome: QHome, tmp_path: Path) -> None:
    """The book's use: qmail-inject's queue is the smarthost."""
    wrapper = tmp_path / "qq"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in program(qhome)) + "\n")
    wrapper.chmod(0o755)
    with SmtpServer() as srv:
        catch_all(qhome, srv.port)
        res = run([qhome.bin("qmail-inject"), "-fme@here.example", "friend@far.example"],
                  input=b"Subject: via inject\n\nhi\n",
                  env={"PATH": "/usr/bin:/bin", "QMAILQUEUE": str(wrapper), "QMAILHOME": str(qhome.path),
                       "PYTHONPATH": str(ROOT / "src"), "DNSCACHEIP": "127.0.0.1:9"})
    expect(res)
    (s,) = srv.sessions
    assert s.commands[2:4] == [b"MAIL FROM:<me@here.example>", b"RCPT TO:<friend@far.example>"]
    assert b"\r\nSubject: via inject\r\n" in s.data and s.data.endswith(b"\r\n\r\nhi\r\n")


@pytest.mark.parametrize("size", [1001, 1002, 1003, 1004])
def test_address_limit_is_qmail_queues(qhome: QHome, size: int) -> None:
    """The longest address taken is the one qmail-queue takes."""
    env_bytes = envelope(b"s@x", b"a" * (size - len("@far.example")) + b"@far.example")
    r, w = os.pipe()
    os.write(w, env_bytes)
    os.close(w)
    try:
        queue = subprocess.run([qhome.bin("qmail-queue")], input=MESSAGE, stdout=r, stderr=subprocess.PIPE,
                               timeout=60, env={"PATH": "/usr/bin:/bin"})
    finally:
        os.close(r)
    catch_all(qhome, dead_port())
    mine = smtpc(qhome, env_bytes).returncode
    assert (queue.returncode == 11) == (mine == 11), (queue.returncode, mine)
    assert mine in (11, 73)
    assert (mine == 11) == (size > 1002)
