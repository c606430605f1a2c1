"""IMAP through Dovecot over our Maildirs: Dovecot's checkpassword passdb and userdb run our checkpassword.

Mail is delivered by our qmail-local; Dovecot (Debian dovecot-core, dovecot-imapd), started by the
test on a loopback port with its own dovecot.conf, serves it to Python's imaplib. The Dovecot
extensions of checkpassword (ORIG_UID, AUTHORIZED, EXTRA, descriptor 4) are also tested on their
own, with Dovecot's checkpassword-reply and with a shell script in its place.
"""

from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from conftest import CI, IS_ROOT, TEST_USER, QHome, Result, expect, run, world_dir

DOVECOT = "/usr/sbin/dovecot"
REPLY = "/usr/lib/dovecot/checkpassword-reply"
VUSER = "imap@example.org"
VPASS = "v1rtual pass"
SYSPASS = b"Imap-sys 1"
SENDER = b"sender@remote.example"
HOST = b"test.example.com"
START_TIMEOUT = 30.0


def need_dovecot() -> str:
    """Return dovecot's path; skip without it, but fail in CI (.ci/run installs it)."""
    path = shutil.which("dovecot") or (DOVECOT if os.access(DOVECOT, os.X_OK) else None)
    if path is None or not os.access(REPLY, os.X_OK):
        if CI:
            pytest.fail("dovecot missing: .ci/run should have installed dovecot-core and dovecot-imapd")
        pytest.skip("dovecot not installed (Debian packages dovecot-core, dovecot-imapd)")
    if not IS_ROOT:
        # Dovecot's auth process must run checkpassword as root to read poppasswd and /etc/shadow.
        if CI:
            pytest.fail("CI runs the tests as root")
        pytest.skip("Dovecot with checkpassword needs root")
    return path


def message(tag: str) -> bytes:
    return (b"From: Sender <sender@remote.example>\nTo: someone\nSubject: imap " + tag.encode() +
            b"\nMessage-ID: <" + tag.encode() + b"@remote.example>\n\nfirst line\n.dot line\n"
            b"From the body\n\nlast line, no newline")


def deliver(qhome: QHome, user: str, homedir: str, local: bytes, text: bytes) -> None:
    """Deliver text into homedir/Maildir/ with qmail-local, run as user."""
    pw = pwd.getpwnam(user)
    argv = [os.fsencode(qhome.bin("qmail-local")), b"--", user.encode(), os.fsencode(homedir), local, b"", b"",
            HOST, SENDER, b"./Maildir/"]
    with tempfile.TemporaryFile() as f:  # qmail-local wants a seekable message
        f.write(text)
        f.seek(0)
        p = subprocess.run(argv, stdin=f, capture_output=True, env={"PATH": "/usr/bin:/bin"}, timeout=60,
                           user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    res = Result([os.fsdecode(a) for a in argv], p.returncode, p.stdout, p.stderr)
    assert res.returncode == 0 and res.stdout.startswith(b"did 1+0+0"), res.explain()


def stored(maildir: Path, tag: str) -> Path:
    """Return the file in maildir's new/ or cur/ holding the message tagged tag."""
    found = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir()
             if f"<{tag}@remote.example>".encode() in p.read_bytes()]
    assert len(found) == 1, found
    return found[0]


class Dovecot:
    """A Dovecot instance of the test's own: configuration, runtime and log in one directory."""

    def __init__(self, binary: str, qhome: QHome, userdb: str = "checkpassword") -> None:
        self.binary = binary
        self.userdb = userdb
        self.dir = world_dir()
        self.log = self.dir / "dovecot.log"
        self.conf = self.dir / "dovecot.conf"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.checkpassword = qhome.bin("checkpassword")

    def write_conf(self, port: int) -> None:
        cp = self.checkpassword
        if self.userdb == "checkpassword":
            userdb = f"userdb {{\n  driver = checkpassword\n  args = {cp}\n}}\n"
        else:
            # prefetch: the userdb fields (home, userdb_uid, userdb_gid) of the passdb's run
            userdb = "userdb {\n  driver = prefetch\n}\n"
        self.conf.write_text(
            f"base_dir = {self.dir}/run\n"
            f"state_dir = {self.dir}/state\n"
            f"log_path = {self.log}\n"
            "protocols = imap\n"
            "listen = 127.0.0.1\n"
            "ssl = no\n"
            "disable_plaintext_auth = no\n"
            "auth_mechanisms = plain login\n"
            "auth_failure_delay = 0\n"
            "auth_verbose = yes\n"
            # Our checkpassword's own refusal delay: the test wants no waiting.
            "import_environment = PYQMAIL_AUTH_DELAY=0\n"
            "mail_location = maildir:~/Maildir\n"
            "service imap-login {\n"
            "  inet_listener imap {\n"
            "    address = 127.0.0.1\n"
            f"    port = {port}\n"
            "  }\n"
            "  inet_listener imaps {\n"
            "    port = 0\n"
            "  }\n"
            "}\n"
            "service auth {\n"
            "  user = root\n"
            "}\n"
            "passdb {\n"
            "  driver = checkpassword\n"
            f"  args = {cp}\n"
            "}\n"
            + userdb)

    def start(self) -> None:
        """Start dovecot -F on a free loopback port; return once it accepts connections."""
        for _ in range(3):  # a free port may be taken before Dovecot binds it
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            self.write_conf(port)
            out = open(self.dir / "dovecot.out", "ab")
            try:
                self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"})
            finally:
                out.close()
            if self._wait_ready(port):
                self.port = port
                return
            self.stop()
        pytest.fail(f"dovecot did not start:\n{self.diagnostics()}")

    def _wait_ready(self, port: int) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    return s.recv(64).startswith(b"* OK")
            except OSError:
                time.sleep(0.05)  # a readiness poll, not a timing assumption
        return False

    def stop(self) -> None:
        """Stop the master (it stops its children) and wait for it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)

    def diagnostics(self) -> str:
        texts = []
        for name in ("dovecot.out", "dovecot.log"):
            p = self.dir / name
            if p.exists():
                texts.append(f"--- {name}\n" + p.read_text(errors="replace")[-6000:])
        return "\n".join(texts)

    def client(self) -> imaplib.IMAP4:
        return imaplib.IMAP4("127.0.0.1", self.port, timeout=60)


@pytest.fixture(params=["checkpassword"])
def dovecot(qhome: QHome, request: pytest.FixtureRequest) -> Iterator[Dovecot]:
    """A running Dovecot authenticating through qhome's checkpassword; always stopped after."""
    d = Dovecot(need_dovecot(), qhome, userdb=request.param)
    try:
        d.start()
        yield d
    finally:
        d.stop()
        shutil.rmtree(d.dir, ignore_errors=True)


def fetch_and_compare(d: Dovecot, user: str, password: str, path: Path, tag: str) -> None:
    """Log in as user, SELECT INBOX, find the message by its Message-ID and compare bytes with path."""
    on_disk = path.read_bytes()
    imap = d.client()
    try:
        typ, data = imap.login(user, password)
        assert typ == "OK", data
        typ, data = imap.select("INBOX")
        assert typ == "OK", data
        typ, data = imap.search(None, "HEADER", "Message-ID", f"<{tag}@remote.example>")
        assert typ == "OK" and len(data[0].split()) == 1, (data, d.diagnostics())
        num = data[0].split()[0].decode()
        typ, data = imap.fetch(num, "(RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK", data
        item = data[0]
        assert isinstance(item, tuple), data
        head, body = item
        # IMAP sends lines ending in CRLF; the Maildir holds qmail-local's LF lines.
        assert body == on_disk.replace(b"\n", b"\r\n"), (body, on_disk)
        assert b"RFC822.SIZE %d " % len(body) in head, head
        imap.close()
    finally:
        imap.logout()


def refused(d: Dovecot, user: str, password: str) -> None:
    imap = d.client()
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login(user, password)
    finally:
        imap.logout()


@pytest.mark.parametrize("dovecot", ["prefetch"], indirect=True)
def test_prefetch_userdb(qhome: QHome, dovecot: Dovecot) -> None:
    """The lighter setup: checkpassword as passdb only, its userdb fields prefetched."""
    expect(run([qhome.bin("qmail"), "user", "add", "--home", str(qhome.path), "--uid", TEST_USER, VUSER],
               input=VPASS.encode() + b"\n"))
    vhome = qhome.path / "pop" / VUSER
    tag = f"prefetch-{uuid.uuid4()}"
    deliver(qhome, TEST_USER, str(vhome), b"imap", message(tag))
    fetch_and_compare(dovecot, VUSER, VPASS, stored(vhome / "Maildir", tag), tag)
    assert "driver = prefetch" in dovecot.conf.read_text()


def test_virtual_user_reads_qmail_local_delivery(qhome: QHome, dovecot: Dovecot) -> None:
    expect(run([qhome.bin("qmail"), "user", "add", "--home", str(qhome.path), "--uid", TEST_USER, VUSER],
               input=VPASS.encode() + b"\n"))
    vhome = qhome.path / "pop" / VUSER
    tag = f"virtual-{uuid.uuid4()}"
    text = message(tag)
    deliver(qhome, TEST_USER, str(vhome), b"imap", text)
    path = stored(vhome / "Maildir", tag)
    # qmail-local's two lines, then the message byte for byte.
    assert path.read_bytes() == (b"Return-Path: <" + SENDER + b">\nDelivered-To: imap@" + HOST + b"\n" + text)
    fetch_and_compare(dovecot, VUSER, VPASS, stored(vhome / "Maildir", tag), tag)
    # The same Maildir, now with Dovecot's files in it, through qmail-pop3d: RETR, then DELE.
    path = stored(vhome / "Maildir", tag)
    on_disk = path.read_bytes()
    past = time.time() - 100  # qmail-pop3d skips a message modified this second
    os.utime(path, (past, past))
    lines = on_disk.split(b"\n")
    if not lines[-1]:
        lines.pop()
    blasted = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    res = expect(run([qhome.bin("qmail-pop3d"), "Maildir"], input=b"STAT\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n",
                     env={"PATH": "/usr/bin:/bin"}, cwd=vhome, user=TEST_USER))
    assert res.stdout == (b"+OK \r\n+OK 1 %d\r\n+OK \r\n" % len(on_disk) + blasted + b"\r\n.\r\n"
                          b"+OK \r\n+OK \r\n"), res.explain()
    assert [list((vhome / "Maildir" / sub).iterdir()) for sub in ("new", "cur")] == [[], []]
    # Dovecot sees the message gone.
    imap = dovecot.client()
    try:
        imap.login(VUSER, VPASS)
        assert imap.select("INBOX") == ("OK", [b"0"])
    finally:
        imap.logout()
    # One refusal per Dovecot: its anvil delays an address's next attempt by 2 s, then 4, 8...
    # (an unknown user is the same exit 1, tested below without Dovecot).
    refused(dovecot, VUSER, VPASS + "x")
    # Dovecot ran the user's session as the account poppasswd names.
    uid = pwd.getpwnam(TEST_USER).pw_uid
    assert all(p.stat().st_uid == uid for p in (vhome / "Maildir").iterdir())
    log = dovecot.log.read_text(errors="replace")
    assert f"Login: user=<{VUSER}>" in log, log


@pytest.fixture
def system_password() -> Iterator[bytes]:
    """Give pqtest the password SYSPASS (root only), restoring /etc/shadow after."""
    need_dovecot()  # skips (or fails in CI) before /etc/shadow is touched
    if shutil.which("chpasswd") is None:
        if CI:
            pytest.fail("chpasswd missing: .ci/run installs passwd")
        pytest.skip("needs chpasswd")
    st = os.stat("/etc/shadow")
    saved = Path("/etc/shadow").read_bytes()
    try:
        subprocess.run(["chpasswd"], input=TEST_USER.encode() + b":" + SYSPASS + b"\n", check=True, timeout=60)
        yield SYSPASS
    finally:
        tmp = Path("/etc/shadow.pyqmail-imap-test")
        tmp.write_bytes(saved)
        os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, st.st_mode & 0o7777)
        os.replace(tmp, "/etc/shadow")


@pytest.fixture
def user_maildir() -> Iterator[Path]:
    """pqtest's ~/Maildir, made if absent; afterwards removed if made here, else rid of what Dovecot added."""
    pw = pwd.getpwnam(TEST_USER)
    home = Path(pw.pw_dir)
    if not home.is_dir():
        if CI:
            pytest.fail(f"{TEST_USER} has no home directory: .ci/run makes it")
        pytest.skip(f"{TEST_USER} has no home directory")
    md = home / "Maildir"
    made = not md.exists()
    if made:
        for sub in ("", "tmp", "new", "cur"):
            (md / sub).mkdir(mode=0o700)
            os.chown(md / sub, pw.pw_uid, pw.pw_gid)
    before = set(os.listdir(md))
    try:
        yield md
    finally:
        if made:
            shutil.rmtree(md, ignore_errors=True)
        else:
            for name in set(os.listdir(md)) - before:
                if name.startswith("dovecot"):  # its uidlist and index files
                    Path(md / name).unlink(missing_ok=True)


def test_system_user_reads_qmail_local_delivery(qhome: QHome, system_password: bytes, user_maildir: Path,
                                                dovecot: Dovecot) -> None:
    pw = pwd.getpwnam(TEST_USER)
    tag = f"system-{uuid.uuid4()}"
    deliver(qhome, TEST_USER, pw.pw_dir, TEST_USER.encode(), message(tag))
    try:
        fetch_and_compare(dovecot, TEST_USER, system_password.decode(), stored(user_maildir, tag), tag)
        refused(dovecot, TEST_USER, "wrong")
    finally:
        for sub in ("new", "cur"):
            for p in (user_maildir / sub).iterdir():
                if f"<{tag}@remote.example>".encode() in p.read_bytes():
                    p.unlink()


# ------------------------------------------------- Dovecot's calling convention, without Dovecot

def call(qhome: QHome, record: bytes, prog: list[str], env: dict[str, str]) -> tuple[Result, bytes]:
    """Run checkpassword prog as Dovecot does: record on descriptor 3, a pipe on 4; return what 4 got.

    The shell moves stdin to 3 and stdout to 4, then sends the program's stdout to stderr.
    """
    argv = ["/bin/sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>&2', "sh", str(qhome.bin("checkpassword")), *prog]
    p = subprocess.run(argv, input=record, capture_output=True, env=env, timeout=60)
    return Result(argv, p.returncode, b"", p.stderr), p.stdout


@pytest.fixture
def vuser(qhome: QHome) -> tuple[int, int, Path]:
    uid, gid = (pwd.getpwnam(TEST_USER).pw_uid, pwd.getpwnam(TEST_USER).pw_gid) if IS_ROOT else (os.getuid(), os.getgid())
    args = ["--uid", str(uid), "--gid", str(gid)]
    expect(run([qhome.bin("qmail"), "user", "add", "--home", str(qhome.path), *args, VUSER], input=VPASS.encode() + b"\n"))
    return uid, gid, qhome.path / "pop" / VUSER


def dovecot_env(**extra: str) -> dict[str, str]:
    env = {"PATH": "/usr/bin:/bin", "PYQMAIL_AUTH_DELAY": "0", "ORIG_UID": str(os.getuid()), "SERVICE": "imap",
           "TCPREMOTEIP": "127.0.0.1"}
    env.update(extra)
    return env


SHOW = ["/bin/sh", "-c", 'echo "$USER|$HOME|$userdb_uid|$userdb_gid|$EXTRA|${AUTHORIZED-unset}|$(id -u)|$PWD" >&4']


def test_dovecot_passdb_reports_identity_instead_of_taking_it(qhome: QHome, vuser: tuple[int, int, Path]) -> None:
    uid, gid, vhome = vuser
    res, reply = call(qhome, VUSER.encode() + b"\0" + VPASS.encode() + b"\0", SHOW, dovecot_env())
    expect(res)
    # No setuid (checkpassword-reply refuses a changed uid) and no chdir: Dovecot does both itself.
    assert reply == f"{VUSER}|{vhome}|{uid}|{gid}|userdb_uid userdb_gid|unset|{os.getuid()}|{os.getcwd()}\n".encode()
    # A wrapper's EXTRA is kept, ours appended.
    res, reply = call(qhome, VUSER.encode() + b"\0" + VPASS.encode() + b"\0", SHOW,
                      dovecot_env(EXTRA="userdb_quota_rule userdb_gid", userdb_quota_rule="*:storage=1M"))
    assert reply.split(b"|")[4] == b"userdb_quota_rule userdb_gid userdb_uid"
    # Refusals are the interface's: 1 after a bad password or an unknown user, nothing run.
    for record in (VUSER.encode() + b"\0wrong\0", b"nosuchuser-imap\0x\0"):
        res, reply = call(qhome, record, SHOW, dovecot_env())
        assert (res.returncode, reply) == (1, b""), res.explain()


def test_dovecot_userdb_lookup(qhome: QHome, vuser: tuple[int, int, Path]) -> None:
    uid, gid, vhome = vuser
    # AUTHORIZED=1: no password is checked; the lookup is acknowledged with AUTHORIZED=2.
    res, reply = call(qhome, VUSER.encode() + b"\0\0", SHOW, dovecot_env(AUTHORIZED="1"))
    expect(res)
    assert reply == f"{VUSER}|{vhome}|{uid}|{gid}|userdb_uid userdb_gid|2|{os.getuid()}|{os.getcwd()}\n".encode()
    # An unknown user is exit 3, without the refusal's delay or message.
    res, reply = call(qhome, b"nosuchuser-imap\0\0", SHOW, dovecot_env(AUTHORIZED="1"))
    assert (res.returncode, res.stderr, reply) == (3, b"", b""), res.explain()
    # Dovecot wanting the password itself: we keep only hashes, so it is refused.
    res, reply = call(qhome, VUSER.encode() + b"\0\0", SHOW,
                      dovecot_env(AUTHORIZED="1", CREDENTIALS_LOOKUP="1", SCHEME="CRAM-MD5"))
    assert (res.returncode, reply) == (1, b""), res.explain()
    # Without ORIG_UID, AUTHORIZED means nothing: the password is still checked.
    env = dovecot_env(AUTHORIZED="1")
    del env["ORIG_UID"]
    res, reply = call(qhome, VUSER.encode() + b"\0\0", SHOW, env)
    assert res.returncode == 1, res.explain()


def test_dovecot_checkpassword_reply(qhome: QHome, vuser: tuple[int, int, Path]) -> None:
    """Dovecot's own checkpassword-reply accepts what we hand it (exit 0 for passdb, 2 for userdb)."""
    if not os.access(REPLY, os.X_OK):
        if CI:
            pytest.fail("dovecot missing: .ci/run should have installed dovecot-core")
        pytest.skip("dovecot-core not installed")
    uid, gid, vhome = vuser
    want = f"user={VUSER}\tuserdb_home={vhome}\tuserdb_uid={uid}\tuserdb_gid={gid}\t".encode()
    res, reply = call(qhome, VUSER.encode() + b"\0" + VPASS.encode() + b"\0", [REPLY], dovecot_env())
    assert (res.returncode, reply) == (0, want), res.explain()
    res, reply = call(qhome, VUSER.encode() + b"\0\0", [REPLY], dovecot_env(AUTHORIZED="1"))
    assert (res.returncode, reply) == (2, want), res.explain()
