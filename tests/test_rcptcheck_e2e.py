"""Recipient validation at RCPT (issue 15.2) through the real chain, as `qmail up` runs it.

For each routing case of the book's chapters 3 and 5 (users/assign simple and
wildcard, extensions and -default, virtualdomains with prefixes, the alias
user's .qmail files, a user without .qmail, a nonexistent user), the RCPT
answer is compared with what delivery does: the accepted recipients are sent
(smtplib and swaks) and must all be delivered, and the refused ones, queued
behind qmail-smtpd's back with qmail-queue, must all bounce with "no mailbox".
A .qmail made after start is seen by the next connection; a dictionary attack
of 200 random recipients in one session is refused, dropped at brtlimit, and
leaves nothing queued and nothing bounced. Root mode (qmail-smtpd as qmaild
asking qmail-rcptcheckd) and single-user mode (qmail-smtpd looking itself).
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import smtplib
import socket
import string
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import CI, IS_ROOT, TEST_USER, VENV_BIN, need_root_setup, world_dir
from test_up import _free_port, _kill_group, _port_open, _read_until_ready, _wait_for

from pyqmail.smtpd import rcptcheck as smtpd_rcptcheck

FQDN = "test.example.com"
VIRT = "virt.example"
SUBVIRT = "x.sub.virt.example"
ENV = {"PATH": "/usr/bin:/bin"}

# (recipient, accepted at RCPT?) for each routing case.
CASES = [
    (f"joe@{FQDN}", True),  # users/assign simple (=joe), its ~/.qmail
    (f"joe-x@{FQDN}", False),  # a simple assignment has no extensions; no alias file either
    (f"list-info@{FQDN}", True),  # users/assign wildcard (+list-), ~list/.qmail-info
    (f"list-nope@{FQDN}", False),  # the wildcard's user has no .qmail-nope nor -default
    (f"fred@{FQDN}", True),  # =fred without ~/.qmail: the default delivery
    (f"fred-foo@{FQDN}", True),  # +fred-: ~fred/.qmail-foo
    (f"Fred-Bar-Baz@{FQDN}", True),  # ~fred/.qmail-bar-default (case folded)
    (f"fred-zzz@{FQDN}", False),  # an extension nobody handles
    (f"nodot@{FQDN}", True),  # a user without any .qmail file
    (f"alice@{VIRT}", True),  # virtualdomains virt.example:vu -> vu-alice -> ~vu/.qmail-alice
    (f"bob@{VIRT}", False),  # vu-bob: no ~vu/.qmail-bob, no -default
    (f"carol@{SUBVIRT}", True),  # .sub.virt.example:vu-sub -> vu-sub-carol -> ~vu/.qmail-sub-default
    (f"sales@{FQDN}", True),  # the alias user's .qmail-sales
    (f"postmaster@{FQDN}", True),  # qmail init's alias files
    (f"nosuch@{FQDN}", False),  # nonexistent user: the alias user has no file for it
]


class Setup:
    """A home with the routing cases, and where each accepted recipient's mail lands."""

    def __init__(self, home: Path, users_dir: Path, owner: pwd.struct_passwd, alias_uid: int, alias_gid: int) -> None:
        self.home = home
        self.users = users_dir
        self.owner = owner
        self.alias_ids = (alias_uid, alias_gid)
        self.extra: list[Path] = []  # more Maildirs mail may reach (single-user: postmaster forwards to the user)

    def mkdir(self, path: Path, ids: tuple[int, int], mode: int = 0o755) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, *ids)
        path.chmod(mode)
        return path

    def maildir(self, top: Path, ids: tuple[int, int]) -> Path:
        self.mkdir(top, ids, 0o700)
        for sub in ("tmp", "new", "cur"):
            self.mkdir(top / sub, ids, 0o700)
        return top

    def write(self, path: Path, text: str, ids: tuple[int, int]) -> None:
        path.write_text(text)
        os.chown(path, *ids)
        path.chmod(0o644)

    def build(self) -> None:
        ids = (self.owner.pw_uid, self.owner.pw_gid)
        h = self.home
        (h / "control" / "rcpthosts").write_text(f"{FQDN}\n{VIRT}\n.sub.{VIRT}\n")
        (h / "control" / "virtualdomains").write_text(f"{VIRT}:vu\n.sub.{VIRT}:vu-sub\n")
        (h / "control" / "brtlimit").write_text("10\n")
        name, uid, gid = self.owner.pw_name, self.owner.pw_uid, self.owner.pw_gid
        u = self.users
        self.mkdir(u, ids)
        assign = (f"=joe:{name}:{uid}:{gid}:{u}/joe:::\n"
                  f"+list-:{name}:{uid}:{gid}:{u}/list:-::\n"
                  f"=fred:{name}:{uid}:{gid}:{u}/fred:::\n"
                  f"+fred-:{name}:{uid}:{gid}:{u}/fred:-::\n"
                  f"=nodot:{name}:{uid}:{gid}:{u}/nodot:::\n"
                  f"+vu-:{name}:{uid}:{gid}:{u}/vu:-::\n.\n")
        (h / "users" / "assign").write_text(assign)
        r = subprocess.run([h / "bin" / "qmail-newu"], capture_output=True, env=ENV, timeout=60)
        assert r.returncode == 0, r
        for d in ("joe", "list", "fred", "nodot", "vu"):
            self.mkdir(u / d, ids)
            self.maildir(u / d / "Maildir", ids)
        self.write(u / "joe" / ".qmail", "./Maildir/\n", ids)
        self.write(u / "list" / ".qmail-info", "./Maildir/\n", ids)
        self.write(u / "fred" / ".qmail-foo", "./Maildir/\n", ids)
        self.write(u / "fred" / ".qmail-bar-default", "./Maildir/\n", ids)
        self.write(u / "vu" / ".qmail-alice", "./Maildir/\n", ids)
        self.write(u / "vu" / ".qmail-sub-default", "./Maildir/\n", ids)
        alias = h / "alias"
        self.maildir(alias / "Maildir", self.alias_ids)
        self.write(alias / ".qmail-sales", "./Maildir/\n", self.alias_ids)

    def delivered(self) -> str:
        """All messages delivered so far, in every Maildir of the setup."""
        out = []
        for top in [self.users / d / "Maildir" for d in ("joe", "list", "fred", "nodot", "vu")] + [
                self.home / "alias" / "Maildir"] + self.extra:
            for f in (top / "new").iterdir():
                out.append(f.read_text("latin-1"))
        return "\n".join(out)


def _rcpt_answers(port: int, recipients: list[str]) -> dict[str, int]:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.ehlo("client.example")
        s.mail("sender@elsewhere.example")
        return {r: s.rcpt(r)[0] for r in recipients}


def _send_swaks(port: int, to: list[str], subject: str) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        if CI:
            pytest.fail("swaks missing: .ci/run installs it")
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
            assert s.sendmail("sender@elsewhere.example", to, f"Subject: {subject}\r\n\r\nhi\r\n") == {}
        return
    r = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(port), "--to", ",".join(to),
                        "--from", "sender@elsewhere.example", "--header", f"Subject: {subject}"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r


def _queue_behind(home: Path, recipients: list[str], subject: str, user: str | None) -> None:
    """Queue a message with qmail-inject -f, past qmail-smtpd's check, to see what delivery does."""
    kw: dict[str, object] = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    r = subprocess.run([home / "bin" / "qmail-inject", "-fbounce-me@elsewhere.example", *recipients],
                       input=f"Subject: {subject}\n\nhi\n".encode(), capture_output=True, env=ENV,
                       timeout=60, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, r


def _smtpd_log(home: Path) -> str:
    return "\n".join((home / "log" / n / "current").read_text("latin-1")[-3000:]
                     for n in ("smtpd", "rcptcheckd") if (home / "log" / n / "current").exists())


def _log(home: Path) -> str:
    return (home / "log" / "send" / "current").read_text("latin-1")


def _queued(home: Path) -> set[str]:
    """Every message in the queue (mess/), by name."""
    return {f.name for d in (home / "queue" / "mess").iterdir() for f in d.iterdir()}


def _mess(home: Path, name: str) -> bytes:
    """The message queued as name (b"" if it has left the queue meanwhile)."""
    for d in (home / "queue" / "mess").iterdir():
        try:
            return (d / name).read_bytes()
        except FileNotFoundError:
            continue
    return b""


def _queue_empty(home: Path) -> bool:
    # todo/ is split like mess/ (big-todo) or flat (qmail 1.03's layout): no file in it either way.
    return not any(p.is_file() for p in (home / "queue" / "todo").rglob("*")) and all(
        not any(d.iterdir()) for d in (home / "queue" / "info").iterdir())


def _run_case(home: Path, setup: Setup, port: int, inject_user: str | None, clients_as: dict[str, object]) -> None:
    recipients = [r for r, _ in CASES]
    answers = _rcpt_answers(port, recipients)
    for r, ok in CASES:
        assert answers[r] == (250 if ok else 550), (r, answers, _smtpd_log(home))
    accepted = [r for r, ok in CASES if ok]
    refused = [r for r, ok in CASES if not ok]

    # The accepted ones: sent over SMTP (swaks), every one delivered, nothing bounces.
    tag = f"accepted-{uuid.uuid4()}"
    _send_swaks(port, accepted, tag)
    assert _wait_for(lambda: setup.delivered().count(tag) == len(accepted), 90), _log(home)
    assert _wait_for(lambda: _queue_empty(home), 60), _log(home)
    log = _log(home)
    assert "failure:" not in log and "bounce" not in log, log

    # The refused ones, queued behind qmail-smtpd's back: every one bounces with "no mailbox".
    tag = f"refused-{uuid.uuid4()}"
    _queue_behind(home, refused, tag, inject_user)
    assert _wait_for(lambda: _log(home).count("failure: Sorry,_no_mailbox_here_by_that_name") == len(refused),
                     90), _log(home)
    assert tag not in setup.delivered()

    # A .qmail made after start decides the next connection.
    assert _rcpt_answers(port, [f"fred-new@{FQDN}"])[f"fred-new@{FQDN}"] == 550
    ids = (setup.owner.pw_uid, setup.owner.pw_gid)
    setup.write(setup.users / "fred" / ".qmail-new", "./Maildir/\n", ids)
    assert _rcpt_answers(port, [f"fred-new@{FQDN}"])[f"fred-new@{FQDN}"] == 250
    (setup.users / "fred" / ".qmail-new").unlink()
    assert _rcpt_answers(port, [f"fred-new@{FQDN}"])[f"fred-new@{FQDN}"] == 550

    # Remote recipients are never checked: not in rcpthosts is qmail's 553, nothing else.
    assert _rcpt_answers(port, ["someone@remote.example"])["someone@remote.example"] == 553

    # A dictionary attack: 200 random recipients in one session.
    queued_before = _queued(home)
    rng = random.Random(1527)
    guesses = ["".join(rng.choice(string.ascii_lowercase) for _ in range(10)) + f"@{FQDN}" for _ in range(200)]
    codes = []
    with socket.create_connection(("127.0.0.1", port), timeout=60) as c:
        f = c.makefile("rb")
        assert f.readline().startswith(b"220 ")
        c.sendall(b"HELO harvester.example\r\n")
        assert f.readline().startswith(b"250 ")
        c.sendall(b"MAIL FROM:<spammer@elsewhere.example>\r\n")
        assert f.readline().startswith(b"250 ")
        for g in guesses:
            try:
                c.sendall(b"RCPT TO:<" + g.encode() + b">\r\n")
            except OSError:
                break
            line = f.readline()
            if not line:
                break
            codes.append((int(line[:3]), line[4:].rstrip()))
            if line.startswith(b"421"):
                break
        # The connection is gone: nothing more comes, DATA cannot follow.
        try:
            assert f.read() == b""
        except ConnectionResetError:
            pass
        f.close()
    # brtlimit 10: nine refusals, then 421 and the end of the connection.
    assert [c for c, _ in codes] == [550] * 9 + [421], codes
    assert codes[-1][1].startswith(b"too many invalid addresses"), codes
    # Nothing queued, nothing bounced: qmail-send never saw the attack's sender, and no message
    # that arrived meanwhile came through the harvester's session. (The refused ones' bounces to
    # elsewhere.example may still be on their way: a double bounce can replace one meanwhile.)
    assert "spammer@elsewhere.example" not in _log(home)
    assert not [n for n in _queued(home) - queued_before if b"harvester.example" in _mess(home, n)]


def _start_up(home: Path, port: int, user_kw: dict[str, object]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([VENV_BIN / "qmail", "up", "--home", home, "--smtp-port", str(port), "--pop3-port", "0",
                             "--qmtp-port", "0", "--submission-port", "0", "--smtps-port", "0", "--pop3s-port", "0"],
                            env=ENV, cwd=home.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **user_kw)  # type: ignore[call-overload]


def test_rcptcheck_root_mode_matches_delivery() -> None:
    """Root mode: qmail-smtpd as qmaild asks qmail-rcptcheckd, which looks as each user."""
    need_root_setup()
    base = world_dir()
    home = base / "qmail"
    r = subprocess.run([VENV_BIN / "qmail", "init", "--home", home, FQDN], capture_output=True, env=ENV, timeout=120)
    assert r.returncode == 0, r
    owner = pwd.getpwnam(TEST_USER)
    alias = pwd.getpwnam("alias")
    setup = Setup(home, base / "users", owner, alias.pw_uid, alias.pw_gid)
    setup.build()
    port = _free_port()
    up = _start_up(home, port, {})
    try:
        text = _read_until_ready(up)
        assert "rcptcheckd" in text and "RCPTCHECK_LOCAL=1" in text, text
        assert _wait_for(lambda: _port_open(port))
        assert _wait_for(lambda: (home / "run" / "qmail-rcptcheck.sock").exists())
        _run_case(home, setup, port, None, {})
    finally:
        _kill_group(up, home)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="makes homes for the test user: needs root to act as pqtest")
def test_rcptcheck_single_user_mode_matches_delivery() -> None:
    """Single-user mode (as pqtest): qmail-smtpd looks at the homes itself; no qmail-rcptcheckd."""
    owner = pwd.getpwnam(TEST_USER)
    base = world_dir()
    os.chown(base, owner.pw_uid, owner.pw_gid)
    home = base / "qmail"
    kw = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
    r = subprocess.run([VENV_BIN / "qmail", "init", "--single-user", "--home", home, FQDN], capture_output=True,
                       env=ENV, timeout=120, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, r
    setup = Setup(home, base / "users", owner, owner.pw_uid, owner.pw_gid)
    setup.build()
    setup.extra.append(Path(owner.pw_dir) / "Maildir")  # alias/.qmail-postmaster: &pqtest
    for p in (home / "control" / "rcpthosts", home / "control" / "virtualdomains", home / "control" / "brtlimit",
              home / "users" / "assign", home / "users" / "cdb"):
        os.chown(p, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    up = _start_up(home, port, kw)
    try:
        text = _read_until_ready(up)
        assert "rcptcheckd" not in text and "RCPTCHECK_LOCAL=1" in text, text
        assert _wait_for(lambda: _port_open(port))
        _run_case(home, setup, port, TEST_USER, kw)
    finally:
        _kill_group(up, home)
        shutil.rmtree(base, ignore_errors=True)


def test_validrcptto_lookup_order() -> None:
    """validrcptto.cdb: address, -address, @domain, -@domain, as the patch."""
    import io

    from pyqmail import cdb

    buf = io.BytesIO()
    w = cdb.Writer(buf)
    for k in (b"joe@a.example", b"-bad@b.example", b"@b.example", b"-@c.example", b"ok@c.example"):
        w.add(k, b"")
    w.finish()
    r = cdb.Reader(buf.getvalue())
    look = smtpd_rcptcheck.vrt_lookup
    assert look(r, b"Joe@A.example") is True
    assert look(r, b"other@a.example") is None
    assert look(r, b"any@b.example") is True
    assert look(r, b"bad@b.example") is False
    assert look(r, b"x@c.example") is False
    assert look(r, b"ok@c.example") is True
