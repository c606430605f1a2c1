"""qmail-popup and qmail-pop3d: as processes, and a real poplib client through popup -> checkpassword -> pop3d."""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, QHome, expect, run, world_dir
from pyqmail.pop3 import mailbox
from pyqmail.pop3.passwords import scrypt_hash
from pyqmail.pop3.protocol import LineReader, split_command
from pyqmail.pop3.qmail_pop3d import (ERR_DELETED, ERR_NOMAILDIR, ERR_NOSUCH, ERR_NOUNLINK, ERR_NOZERO,
                                      ERR_SCAN, ERR_SYNTAX, ERR_TOOBIG, ERR_UNIMPL, ROOT_REFUSED)
from pyqmail.pop3.qmail_popup import ERR_AUTHORIZ, ERR_BADAUTH, ERR_USAGE, ERR_WANTUSER

OK = b"+OK \r\n"
PASSWORD = "s3cret pass"


# ---------------------------------------------------------------- pure parts

def test_split_command() -> None:
    assert split_command(b"USER  joe\r") == (b"user", b"joe")
    assert split_command(b"retr 1 2") == (b"retr", b"1 2")
    assert split_command(b"LIST\0junk") == (b"list", b"")
    assert split_command(b"") == (b"", b"")
    assert split_command(b"\r\r") == (b"\r", b"")


def test_line_reader_bounds_long_lines_and_times_out() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"a" * 10000 + b"\nnext\r\n")
        reader = LineReader(r, timeout=0.05, limit=100)
        assert reader.readline() == b"a" * 100
        assert reader.readline() == b"next\r"
        with pytest.raises(Exception, match="timeout"):
            reader.readline()
    finally:
        os.close(r)
        os.close(w)


def test_order_follows_qmail_heap_ties() -> None:
    # Equal times: a binary heap, not a stable sort; the order is qmail's prioq's.
    entries = [(f"new/{i}", t) for i, t in enumerate([5, 3, 5, 3, 1, 5, 3])]
    names = mailbox.order(entries)
    assert [dict(entries)[n] for n in names] == [1, 3, 3, 3, 5, 5, 5]
    assert names[0] == "new/4"


def blast(data: bytes, limit: int = 0, piece: int = 3) -> bytes:
    b = mailbox.Blaster(limit)
    out = b"".join(b.feed(data[i:i + piece]) for i in range(0, len(data), piece))
    return out + b.end()


def test_blaster() -> None:
    msg = b"Subject: x\n\n.dot\nline\n..two\n"
    assert blast(msg) == b"Subject: x\r\n\r\n..dot\r\nline\r\n...two\r\n\r\n.\r\n"
    assert blast(msg, piece=1) == blast(msg, piece=100)
    assert blast(b"no newline at end") == b"no newline at end\r\n\r\n.\r\n"
    assert blast(b"") == b"\r\n.\r\n"
    # TOP n: the header, the blank line, n body lines.
    assert blast(msg, limit=1) == b"Subject: x\r\n\r\n\r\n.\r\n"
    assert blast(msg, limit=2) == b"Subject: x\r\n\r\n..dot\r\n\r\n.\r\n"


# ---------------------------------------------------------------- helpers

def account() -> tuple[int, int]:
    """The uid and gid checkpassword should switch to: pqtest's when root, else our own."""
    if IS_ROOT:
        pw = pwd.getpwnam(TEST_USER)
        return pw.pw_uid, pw.pw_gid
    return os.getuid(), os.getgid()


def make_maildir(base: Path, uid: int, gid: int) -> Path:
    md = base / "Maildir"
    for sub in ("", "tmp", "new", "cur"):
        (md / sub).mkdir(mode=0o700, exist_ok=True)
        os.chown(md / sub, uid, gid)
    os.chown(base, uid, gid)
    return md


def deliver(md: Path, name: str, text: bytes, age: int, uid: int, gid: int, sub: str = "new") -> Path:
    p = md / sub / name
    p.write_bytes(text)
    os.chown(p, uid, gid)
    t = time.time() - age
    os.utime(p, (t, t))
    return p


@pytest.fixture
def user_home(qhome: QHome) -> Path:
    """A home with a Maildir for the virtual user 'pop@example.org' (password PASSWORD)."""
    uid, gid = account()
    base = world_dir() / "vhome"
    base.mkdir()
    make_maildir(base, uid, gid)
    db = qhome.path / "users" / "poppasswd"
    db.write_text(f"# virtual users\npop@example.org:{scrypt_hash(PASSWORD.encode(), ln=4)}:{uid}:{gid}:{base}\n")
    yield base
    shutil.rmtree(base.parent, ignore_errors=True)


def env_for(qhome: QHome) -> dict[str, str]:
    return {"PATH": f"{qhome.path / 'bin'}:/usr/bin:/bin", "QMAILHOME": str(qhome.path),
            "PYQMAIL_AUTH_DELAY": "0"}


def pop3d(qhome: QHome, md: Path, script: bytes, *args: str) -> tuple[int, bytes, bytes]:
    """Run qmail-pop3d on md (as pqtest when root) with script as input."""
    res = run([qhome.bin("qmail-pop3d"), *(args or (str(md),))], input=script, env=env_for(qhome),
              cwd=md.parent, user=TEST_USER if IS_ROOT else None)
    return res.returncode, res.stdout, res.stderr


# ---------------------------------------------------------------- qmail-popup

def test_popup_greeting_and_authorization_state(qhome: QHome) -> None:
    res = expect(run([qhome.bin("qmail-popup"), "pop.example.com", "/bin/false"],
                     input=b"NOOP\r\nSTAT\r\nPASS x\r\nUSER\r\nAPOP joe\r\nuser joe\r\nquit\r\nnoop\r\n",
                     env=env_for(qhome)), 1)
    m = re.match(rb"\+OK <(\d+)\.(\d+)@pop\.example\.com>\r\n", res.stdout)
    assert m, res.explain()
    assert abs(int(m.group(2)) - time.time()) < 100
    rest = res.stdout[m.end():]
    assert rest == OK + ERR_AUTHORIZ + ERR_WANTUSER + ERR_SYNTAX + ERR_SYNTAX + OK + OK


def test_popup_usage(qhome: QHome) -> None:
    res = expect(run([qhome.bin("qmail-popup"), "host"], env=env_for(qhome)), 1)
    assert res.stdout == ERR_USAGE == b"-ERR usage: popup hostname subprogram\r\n"


def test_popup_hands_name_password_stamp_on_fd3(qhome: QHome, tmp_path: Path) -> None:
    out = tmp_path / "fd3"
    script = tmp_path / "check"
    script.write_text(f"#!/bin/sh\ncat <&3 > {out}\necho '+OK child' \nexit 0\n")
    script.chmod(0o755)
    res = expect(run([qhome.bin("qmail-popup"), "h.example", str(script)],
                     input=b"USER joe\r\nPASS pass word\r\n", env=env_for(qhome)), 1)
    stamp = re.match(rb"\+OK (<[^>]+>)\r\n", res.stdout).group(1)  # type: ignore[union-attr]
    assert out.read_bytes() == b"joe\0pass word\0" + stamp + b"\0"
    assert res.stdout.endswith(OK + b"+OK child\n")
    res = expect(run([qhome.bin("qmail-popup"), "h.example", str(script)],
                     input=b"APOP joe c4c9334bac560ecc979e58001b3e22fb\r\n", env=env_for(qhome)), 1)
    assert out.read_bytes().startswith(b"joe\0c4c9334bac560ecc979e58001b3e22fb\0<")


def test_popup_refused_and_crashed_child(qhome: QHome) -> None:
    res = expect(run([qhome.bin("qmail-popup"), "h", "/bin/false"], input=b"USER a\r\nPASS b\r\nNOOP\r\n",
                     env=env_for(qhome)), 1)
    assert res.stdout.endswith(OK + ERR_BADAUTH)
    res = expect(run([qhome.bin("qmail-popup"), "h", "/bin/sh", "-c", "kill -9 $$"],
                     input=b"USER a\r\nPASS b\r\n", env=env_for(qhome)), 1)
    assert res.stdout.endswith(OK + b"-ERR aack, child crashed\r\n")
    res = expect(run([qhome.bin("qmail-popup"), "h", "/nonexistent/prog"], input=b"USER a\r\nPASS b\r\n",
                     env=env_for(qhome)), 1)
    assert res.stdout.endswith(OK + ERR_BADAUTH)


def test_popup_hostile_input(qhome: QHome) -> None:
    big = b"X" * (1 << 20)
    res = expect(run([qhome.bin("qmail-popup"), "h", "/bin/false"],
                     input=big + b"\r\nUSER " + big + b"\r\nNOOP\r\n\0\r\n", env=env_for(qhome)), 1)
    assert res.stdout.split(b"\r\n", 1)[1] == ERR_AUTHORIZ + OK + OK + ERR_AUTHORIZ
    # End of input without a newline: no reply, exit 1.
    res = expect(run([qhome.bin("qmail-popup"), "h", "/bin/false"], input=b"NOOP", env=env_for(qhome)), 1)
    assert res.stdout.count(b"\r\n") == 1


# ---------------------------------------------------------------- qmail-pop3d

@pytest.fixture
def md(qhome: QHome) -> Path:
    uid, gid = account()
    base = world_dir() / "home"
    base.mkdir()
    m = make_maildir(base, uid, gid)
    deliver(m, "1000.1.host", b"Subject: one\n\nbody 1\n.dotted\n", 300, uid, gid)
    deliver(m, "900.2.host:2,S", b"Subject: two\n\nsecond\n", 400, uid, gid, sub="cur")
    deliver(m, "1100.3.host", b"Subject: three\n\nthird\nlast line", 200, uid, gid)
    deliver(m, ".hidden", b"x", 500, uid, gid)
    yield m
    shutil.rmtree(base.parent, ignore_errors=True)


def test_pop3d_session(qhome: QHome, md: Path) -> None:
    code, out, err = pop3d(qhome, md, b"STAT\r\nLIST\r\nUIDL\r\nLIST 2\r\nUIDL 1\r\nRETR 2\r\nTOP 1 0\r\n"
                           b"LAST\r\nDELE 1\r\nLAST\r\nSTAT\r\nLIST\r\nRETR 1\r\nRSET\r\nSTAT\r\nDELE 3\r\nQUIT\r\n")
    assert code == 0, err
    expected = [
        OK,
        b"+OK 3 81\r\n",
        OK + b"1 21\r\n2 29\r\n3 31\r\n.\r\n",
        OK + b"1 900.2.host\r\n2 1000.1.host\r\n3 1100.3.host\r\n.\r\n",
        b"+OK 2 29\r\n",
        b"+OK 1 900.2.host\r\n",
        OK + b"Subject: one\r\n\r\nbody 1\r\n..dotted\r\n\r\n.\r\n",
        OK + b"Subject: two\r\n\r\n\r\n.\r\n",
        b"+OK 0\r\n",
        OK,
        b"+OK 1\r\n",
        b"+OK 3 60\r\n",
        OK + b"2 29\r\n3 31\r\n.\r\n",
        ERR_DELETED,
        OK,
        b"+OK 3 81\r\n",
        OK,
        OK,
    ]
    assert out == b"".join(expected)
    assert sorted(os.listdir(md / "new")) == [".hidden"]
    assert sorted(os.listdir(md / "cur")) == ["1000.1.host:2,", "900.2.host:2,S"]


def test_pop3d_errors(qhome: QHome, md: Path) -> None:
    code, out, _ = pop3d(qhome, md, b"RETR\r\nRETR x\r\nRETR 0\r\nRETR 4\r\nDELE 99999999999999999999999\r\n"
                         b"CAPA\r\nAUTH\r\nUSER x\r\nLIST 0\r\n" + b"Z" * (1 << 20) + b"\r\n")
    assert code == 0
    assert out == OK + ERR_SYNTAX * 2 + ERR_NOZERO + ERR_TOOBIG * 2 + ERR_UNIMPL * 3 + ERR_NOZERO + ERR_UNIMPL
    assert ERR_UNIMPL == b"-ERR unimplemented\r\n"
    assert sorted(os.listdir(md / "new")) == [".hidden", "1000.1.host", "1100.3.host"]


def test_pop3d_no_maildir(qhome: QHome, md: Path) -> None:
    code, out, _ = pop3d(qhome, md, b"", str(md.parent / "nothere"))
    assert (code, out) == (0, ERR_NOMAILDIR)
    assert ERR_NOMAILDIR == b"-ERR this user has no $HOME/Maildir\r\n"


def test_pop3d_unscannable(qhome: QHome, md: Path) -> None:
    if IS_ROOT:
        shutil.rmtree(md / "cur")  # root reads any mode; a missing cur/ is as unscannable
    else:
        (md / "cur").chmod(0)
    try:
        code, out, _ = pop3d(qhome, md, b"STAT\r\n")
    finally:
        if (md / "cur").exists():
            (md / "cur").chmod(0o700)
    assert (code, out) == (0, ERR_SCAN)


def test_pop3d_refuses_root(qhome: QHome, md: Path) -> None:
    if not IS_ROOT:
        pytest.skip("needs root")
    res = expect(run([qhome.bin("qmail-pop3d"), str(md)], env=env_for(qhome)), 1)
    assert (res.stdout, res.stderr) == (b"", ROOT_REFUSED)


def test_pop3d_message_gone_or_unreadable(qhome: QHome, md: Path) -> None:
    uid, gid = account()
    # A message removed by another client during the session, one unreadable by the user.
    proc = subprocess.Popen([qhome.bin("qmail-pop3d"), str(md)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=env_for(qhome), user=uid if IS_ROOT else None,
                            group=gid if IS_ROOT else None, extra_groups=[] if IS_ROOT else None)
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.stdout.readline() == OK
    (md / "new" / "1000.1.host").unlink()
    proc.stdin.write(b"RETR 2\r\nDELE 2\r\nQUIT\r\n")
    proc.stdin.close()
    out = proc.stdout.read()
    proc.stdout.close()
    assert proc.wait() == 0
    assert out == ERR_NOSUCH + OK + ERR_NOUNLINK + OK
    assert sorted(os.listdir(md / "cur")) == ["1100.3.host:2,", "900.2.host:2,S"]


def test_pop3d_unreadable_message(qhome: QHome, md: Path) -> None:
    p = md / "cur" / "900.2.host:2,S"
    if IS_ROOT:
        os.chown(p, 0, 0)
    p.chmod(0)
    code, out, _ = pop3d(qhome, md, b"RETR 1\r\nRETR 2\r\nQUIT\r\n")
    assert code == 0
    assert out.startswith(OK + ERR_NOSUCH + OK + b"Subject: one")
    assert p.exists() and len(os.listdir(md / "cur")) == 3


def test_pop3d_skips_current_second_and_cleans_tmp(qhome: QHome, md: Path) -> None:
    uid, gid = account()
    deliver(md, "fresh", b"new\n", -5, uid, gid)  # mtime in the future: not listed
    old = md / "tmp" / "stale"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 200000, time.time() - 200000))
    young = md / "tmp" / "young"
    young.write_bytes(b"x")
    code, out, _ = pop3d(qhome, md, b"STAT\r\n")
    assert out == OK + b"+OK 3 81\r\n"
    assert os.listdir(md / "tmp") == ["young"]


# ---------------------------------------------------------------- the whole chain with poplib

class Server:
    """A test accept loop on 127.0.0.1: each connection runs the given argv on the socket."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.argv, self.env = argv, env
        self.stderr: list[bytes] = []
        self.codes: list[int] = []
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                p = subprocess.run(self.argv, stdin=conn, stdout=conn, stderr=subprocess.PIPE, env=self.env,
                                   timeout=60)
            self.stderr.append(p.stderr)
            self.codes.append(p.returncode)

    def close(self) -> None:
        # shutdown wakes the accept() blocked in the thread; close alone does not.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()


def test_poplib_fetches_deletes_relists(qhome: QHome, user_home: Path) -> None:
    uid, gid = account()
    md = user_home / "Maildir"
    texts = [b"From: a@b\nSubject: m%d\n\nhello %d\n.\n..x\n" % (i, i) for i in range(3)]
    for i, t in enumerate(texts):
        deliver(md, f"{1000 + i}.{i}.host", t, 100 - i, uid, gid)
    argv = [str(qhome.bin("qmail-popup")), "pop.example.org", str(qhome.bin("checkpassword")),
            str(qhome.bin("qmail-pop3d")), "Maildir"]
    srv = Server(argv, env_for(qhome))
    try:
        c = poplib.POP3("127.0.0.1", srv.port, timeout=30)
        assert re.fullmatch(rb"\+OK <\d+\.\d+@pop\.example\.org>", c.getwelcome())
        c.user("pop@example.org")
        c.pass_(PASSWORD)
        assert c.stat() == (3, sum(len(t) for t in texts))
        resp, lines, _ = c.retr(2)
        assert lines == [b"From: a@b", b"Subject: m1", b"", b"hello 1", b".", b"..x", b""]
        assert c.uidl()[1] == [b"1 1000.0.host", b"2 1001.1.host", b"3 1002.2.host"]
        c.dele(1)
        c.quit()

        c = poplib.POP3("127.0.0.1", srv.port, timeout=30)
        c.user("pop@example.org")
        c.pass_(PASSWORD)
        assert c.list()[1] == [b"1 %d" % len(texts[1]), b"2 %d" % len(texts[2])]
        with pytest.raises(poplib.error_proto, match="not that many messages"):
            c.retr(3)
        c.quit()

        c = poplib.POP3("127.0.0.1", srv.port, timeout=30)
        c.user("pop@example.org")
        with pytest.raises(poplib.error_proto, match="authorization failed"):
            c.pass_("wrong")
        c.close()
    finally:
        srv.close()
    assert sorted(os.listdir(md / "cur")) == ["1001.1.host:2,", "1002.2.host:2,"]
    assert srv.codes == [1, 1, 1]
    assert b"login refused for pop@example.org" in srv.stderr[-1]


def test_poplib_through_pyqmail_tcpserver(qhome: QHome, user_home: Path) -> None:
    uid, gid = account()
    md = user_home / "Maildir"
    deliver(md, "1.1.host", b"Subject: via tcpserver\n\nhi\n", 50, uid, gid)
    proc = subprocess.Popen([qhome.bin("tcpserver"), "-1", "-H", "-R", "-l0", "127.0.0.1", "0",
                             qhome.bin("qmail-popup"), "pop.example.org", qhome.bin("checkpassword"),
                             qhome.bin("qmail-pop3d"), "Maildir"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env_for(qhome))
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        c = poplib.POP3("127.0.0.1", port, timeout=30)
        c.user("pop@example.org")
        c.pass_(PASSWORD)
        assert c.retr(1)[1] == [b"Subject: via tcpserver", b"", b"hi", b""]
        c.dele(1)
        assert c.quit() == b"+OK "
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert os.listdir(md / "new") == [] and os.listdir(md / "cur") == []


def test_poplib_reads_what_qmail_local_delivered(qhome: QHome, user_home: Path, tmp_path: Path) -> None:
    uid, gid = account()
    msg = tmp_path / "msg"
    msg.write_bytes(b"Subject: delivered\n\n.leading dot\nbody\n")
    with open(msg, "rb") as f:
        p = subprocess.run([qhome.bin("qmail-local"), "--", TEST_USER, str(user_home), "pop", "", "",
                            "example.org", "sender@remote.example", "./Maildir/"],
                           stdin=f, capture_output=True, env=env_for(qhome), timeout=60,
                           user=uid if IS_ROOT else None, group=gid if IS_ROOT else None,
                           extra_groups=[] if IS_ROOT else None)
    assert (p.returncode, p.stdout) == (0, b"did 1+0+0\n"), p.stderr
    (name,) = os.listdir(user_home / "Maildir" / "new")
    # qmail-pop3d leaves out mail of the current second; age it instead of sleeping.
    t = time.time() - 10
    os.utime(user_home / "Maildir" / "new" / name, (t, t))
    srv = Server([str(qhome.bin("qmail-popup")), "pop.example.org", str(qhome.bin("checkpassword")),
                  str(qhome.bin("qmail-pop3d")), "Maildir"], env_for(qhome))
    try:
        c = poplib.POP3("127.0.0.1", srv.port, timeout=30)
        c.user("pop@example.org")
        c.pass_(PASSWORD)
        lines = c.retr(1)[1]
        assert lines == [b"Return-Path: <sender@remote.example>", b"Delivered-To: pop@example.org",
                         b"Subject: delivered", b"", b".leading dot", b"body", b""]
        assert c.uidl(1).split() == [b"+OK", b"1", name.encode()]
        c.quit()
    finally:
        srv.close()
    assert os.listdir(user_home / "Maildir" / "cur") == [name + ":2,"]
