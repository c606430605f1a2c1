"""qmail-spamc and qmail-clamdscan (issue 16.7): real spamd and clamd from Debian's packages, started here.

GTUBE refused at SMTP time with 554 through control/smtpfilters; a clean message passes with X-Spam
fields and is otherwise untouched; EICAR attached to a MIME message refused by clamd (a signature
database of one .ndb line written here, nothing downloaded); spamd stopped: 451 and nothing queued,
then the same message taken once spamd is back; fail-open marks instead of refusing.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CI, QHome, run, world_dir
from queuefmt import files
from smtpdkit import queued
from test_qfilter import smtp_send
from test_smtpd import ACCEPTED

from pyqmail.filter import scan

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
SIGNATURE = "PyqmailTest.EICAR"
HEAD = (b"From: Alice <alice@b.example>\r\nTo: u@test.example.com\r\nSubject: lunch\r\n"
        b"Date: Sun, 06 Dec 2026 12:00:00 +0000\r\nMessage-ID: <lunch.1@b.example>\r\n")
CLEAN = HEAD + b"\r\nShall we meet at noon by the fountain?\r\n"
SPAM = HEAD + b"\r\n" + GTUBE + b"\r\n"
START_LIMIT = 120.0  # seconds a daemon may take to start on a loaded 2-core machine


def program(name: str) -> str:
    """Return the path of a daemon's program; fail in CI, skip elsewhere, when its package is missing."""
    found = shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found is None:
        if CI:
            pytest.fail(f"{name} is missing: .ci/run installs spamd, spamc, clamav-daemon and clamdscan")
        pytest.skip(f"{name} is not installed")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(ready: object, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until ready() is true while proc runs; fail with its log otherwise."""
    assert callable(ready)
    deadline = time.monotonic() + START_LIMIT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"daemon did not start (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)  # polling a daemon we do not control: no clock to inject


def connectable(address: tuple[str, int] | str) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.connect(address)
        except OSError:
            return False
    return True


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Spamd:
    """A spamd on a loopback port with its own home, no network tests, no user configs."""

    def __init__(self, base: Path) -> None:
        self.binary = program("spamd")
        self.base = base
        self.home = base / "spamd-home"
        self.home.mkdir(exist_ok=True)
        self.home.chmod(0o777)  # spamd drops from root to nobody
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.base / "spamd.log"
        args = [self.binary, "--local", "--listen", self.address, "--allowed-ips=127.0.0.1",
                "--nouser-config", "--helper-home-dir", str(self.home), "--syslog=stderr",
                "--max-children=2", "--min-children=1", "--min-spare=1", "--max-spare=1"]
        if os.geteuid() == 0:
            args += ["--username", "nobody"]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_until(lambda: connectable(("127.0.0.1", self.port)), self.proc, log)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


class Clamd:
    """A clamd on a unix socket whose database is one .ndb line matching EICAR."""

    def __init__(self, base: Path) -> None:
        binary = program("clamd")
        program("clamdscan")
        db = base / "clamdb"
        db.mkdir()
        (db / "pyqmail.ndb").write_text(f"{SIGNATURE}:0:*:{EICAR.hex()}\n")
        self.socket = str(base / "clamd.sock")
        conf = base / "clamd.conf"
        conf.write_text(f"LocalSocket {self.socket}\nLocalSocketMode 666\nDatabaseDirectory {db}\n"
                        f"Foreground yes\nLogFile {base / 'clamd.log'}\nPidFile {base / 'clamd.pid'}\n")
        self.conf = conf
        log = base / "clamd.out"
        with log.open("ab") as out:
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        wait_until(lambda: connectable(self.socket), self.proc, log)


@pytest.fixture(scope="module")
def spamd() -> Iterator[Spamd]:
    base = world_dir()
    d = Spamd(base)
    d.start()
    yield d
    d.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def clamd() -> Iterator[Clamd]:
    base = world_dir()
    d = Clamd(base)
    yield d
    stop(d.proc)
    shutil.rmtree(base, ignore_errors=True)


def with_spamc(qhome: QHome, address: str, threshold: str | None = "5") -> None:
    qhome.control("smtpfilters", f"{qhome.bin('qmail-spamc')}\n")
    qhome.control("spamd", address + "\n")
    qhome.control("spamthreshold", None if threshold is None else threshold + "\n")


def nothing_queued(qhome: QHome) -> None:
    assert files(qhome.queue)["todo"] == [] and files(qhome.queue)["mess"] == []


SPAM_REPLY = re.compile(rb"554 This message looks like spam \(score 100\d(\.\d)?, threshold 5\) \(#5\.7\.1\)\r\n")


def test_gtube_refused_at_smtp_time(spamd: Spamd, qhome: QHome) -> None:
    """GTUBE through qmail-smtpd with qmail-spamc in control/smtpfilters: 554 naming the score, nothing queued."""
    with_spamc(qhome, spamd.address)
    reply = smtp_send(qhome, {}, SPAM + b"")
    assert SPAM_REPLY.fullmatch(reply), reply
    nothing_queued(qhome)


def test_clean_message_passes_with_x_spam_fields(spamd: Spamd, qhome: QHome) -> None:
    """A clean message is queued with spamd's X-Spam-* fields on top and every other byte as sent."""
    with_spamc(qhome, spamd.address)
    reply = smtp_send(qhome, {}, CLEAN)
    assert ACCEPTED.match(reply), reply
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"a@b.example", [b"u@test.example.com"])
    lines = mess.split(b"\n")
    assert lines[0].startswith(b"Received: (qmail ")
    top = mess[len(lines[0]) + 1:mess.index(b"\nReceived: from ") + 1]
    assert top.startswith(b"X-Spam-Checker-Version: SpamAssassin ")
    assert re.search(rb"\nX-Spam-Status: No, score=-?\d+\.\d required=5\.0 tests=", top), top
    assert b"X-Spam-Flag" not in top
    assert all(line.startswith((b"X-Spam-", b"\t")) for line in top.splitlines()), top
    assert mess.endswith(CLEAN.replace(b"\r\n", b"\n"))


def test_no_threshold_marks_spam_and_passes_it(spamd: Spamd, qhome: QHome) -> None:
    """Without control/spamthreshold qmail-spamc only marks: GTUBE is queued with X-Spam-Flag: YES."""
    with_spamc(qhome, spamd.address, threshold=None)
    assert ACCEPTED.match(smtp_send(qhome, {}, SPAM))
    ((mess, _, _),) = queued(qhome.queue)
    assert b"\nX-Spam-Flag: YES\n" in mess and b"GTUBE" in mess.split(b"\nReceived: from ")[0], mess


def mime_with(attachment: bytes) -> bytes:
    encoded = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    return (HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            b"--b1\r\nContent-Type: text/plain\r\n\r\nThe file you asked for.\r\n"
            b"--b1\r\nContent-Type: application/octet-stream; name=\"file.com\"\r\n"
            b"Content-Disposition: attachment; filename=\"file.com\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + encoded + b"--b1--\r\n")


def test_eicar_attachment_refused_by_clamd(clamd: Clamd, qhome: QHome) -> None:
    """EICAR base64-attached in a MIME message: 554 naming clamd's signature; the same with a clean file passes."""
    qhome.control("smtpfilters", f"{qhome.bin('qmail-clamdscan')}\n")
    qhome.control("clamd", clamd.socket + "\n")
    reply = smtp_send(qhome, {}, mime_with(EICAR))
    assert reply == f"554 This message contains a virus ({SIGNATURE}.UNOFFICIAL) (#5.7.1)\r\n".encode()
    nothing_queued(qhome)
    clean = mime_with(b"just some harmless bytes\n")
    assert ACCEPTED.match(smtp_send(qhome, {}, clean))
    ((mess, _, _),) = queued(qhome.queue)
    assert mess.endswith(clean.replace(b"\r\n", b"\n"))  # unchanged: clamdscan writes nothing


def test_clamdscan_agrees(clamd: Clamd, tmp_path: Path) -> None:
    """Debian's clamdscan --stream on the same file names the same signature: the database is what we think."""
    f = tmp_path / "eicar.com"
    f.write_bytes(EICAR)
    res = run([program("clamdscan"), "-c", str(clamd.conf), "--stream", "--no-summary", str(f)])
    assert res.returncode == 1 and f"{SIGNATURE}.UNOFFICIAL FOUND".encode() in res.stdout, res.explain()


def test_both_scanners_in_one_chain(spamd: Spamd, clamd: Clamd, qhome: QHome) -> None:
    """spamc then clamdscan: a clean message gets X-Spam fields; a virus is refused even below the spam threshold."""
    with_spamc(qhome, spamd.address)
    qhome.control("smtpfilters", f"{qhome.bin('qmail-spamc')}\n{qhome.bin('qmail-clamdscan')}\n")
    qhome.control("clamd", clamd.socket + "\n")
    reply = smtp_send(qhome, {}, mime_with(EICAR))
    assert reply == f"554 This message contains a virus ({SIGNATURE}.UNOFFICIAL) (#5.7.1)\r\n".encode()
    nothing_queued(qhome)
    assert ACCEPTED.match(smtp_send(qhome, {}, CLEAN))
    ((mess, _, _),) = queued(qhome.queue)
    assert b"\nX-Spam-Status: No" in mess


def test_spamd_stopped_is_451_and_nothing_is_lost(qhome: QHome) -> None:
    """spamd up: queued; stopped: 451 and nothing queued (not passed unscanned); back: the retry is queued."""
    base = world_dir()
    d = Spamd(base)
    try:
        d.start()
        with_spamc(qhome, d.address)
        assert ACCEPTED.match(smtp_send(qhome, {}, CLEAN))
        assert len(queued(qhome.queue)) == 1
        d.stop()
        retry = CLEAN.replace(b"lunch.1@", b"lunch.2@")
        reply = smtp_send(qhome, {}, retry)
        assert reply == b"451 spam scanner unavailable, try again later (#4.3.0)\r\n"
        assert len(queued(qhome.queue)) == 1
        d.start()
        assert ACCEPTED.match(smtp_send(qhome, {}, retry))
        got = queued(qhome.queue)
        # queued() lists the queue by name, not by time: the retry is one of the two
        assert len(got) == 2 and any(m.endswith(retry.replace(b"\r\n", b"\n")) for m, _, _ in got), got
        assert b"\nX-Spam-Status: " in got[1][0]
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_clamd_down_is_451(qhome: QHome, tmp_path: Path) -> None:
    """No clamd at the socket: 451, nothing queued."""
    qhome.control("smtpfilters", f"{qhome.bin('qmail-clamdscan')}\n")
    qhome.control("clamd", str(tmp_path / "no-such.sock") + "\n")
    assert smtp_send(qhome, {}, CLEAN) == b"451 virus scanner unavailable, try again later (#4.3.0)\r\n"
    nothing_queued(qhome)


@pytest.mark.parametrize("where", ["control", "env"])
def test_fail_open_marks_and_passes(qhome: QHome, where: str) -> None:
    """control/scanfailopen 1 (or $SCANFAILOPEN=1): a down scanner lets mail through, marked X-Scan-Skipped."""
    with_spamc(qhome, f"127.0.0.1:{free_port()}")
    env = {}
    if where == "control":
        qhome.control("scanfailopen", "1\n")
    else:
        env = {"SCANFAILOPEN": "1"}
    assert ACCEPTED.match(smtp_send(qhome, env, CLEAN))
    ((mess, _, _),) = queued(qhome.queue)
    assert re.search(rb"\nX-Scan-Skipped: spam unavailable: cannot connect to 127\.0\.0\.1:\d+: .*\nReceived: from ",
                     mess), mess
    assert mess.endswith(CLEAN.replace(b"\r\n", b"\n"))
    if where == "control":  # $SCANFAILOPEN=0 overrides the file
        reply = smtp_send(qhome, {"SCANFAILOPEN": "0"}, CLEAN)
        assert reply.startswith(b"451 spam scanner unavailable")


class FakeSpamd:
    """A one-answer server: reads the request, answers answer (exact bytes), closes."""

    def __init__(self, answer: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.answer = answer
        self.request = b""
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            while chunk := conn.recv(65536):
                self.request += chunk
            conn.sendall(self.answer)
        self.sock.close()


def spamc(address: str, message: bytes, qhome: QHome, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """Run qmail-spamc as a filter by hand: (exit code, what it wrote on 1, what it wrote on 6)."""
    r6, w6 = os.pipe()
    try:
        p = subprocess.run([qhome.bin("qmail-spamc")], input=message, capture_output=True, pass_fds=(w6, 6),
                           env={"SPAMD": address, **(env or {})}, timeout=60,
                           preexec_fn=lambda: (os.dup2(w6, 6), None)[1])
        os.close(w6)
        w6 = -1
        text = os.read(r6, 4096)
    finally:
        if w6 != -1:
            os.close(w6)
        os.close(r6)
    return p.returncode, p.stdout, text


@pytest.mark.parametrize("score,code", [("4.9", 0), ("5.0", 82), ("7.5", 82)])
def test_threshold_is_at_or_over(qhome: QHome, score: str, code: int) -> None:
    """spamd's score at or over control/spamthreshold refuses; spamd's own verdict does not decide."""
    qhome.control("spamthreshold", "5\n")
    fields = f"X-Spam-Status: No, score={score}\r\n".encode()
    fake = FakeSpamd(b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: False ; %s / 9.0\r\n\r\n%s"
                     % (len(fields), score.encode(), fields))
    rc, out, text = spamc(fake.address, b"Subject: x\n\nhi\n", qhome, {"SPAMUSER": "filter"})
    fake.thread.join(10)
    assert fake.request == b"HEADERS SPAMC/1.5\r\nContent-length: 15\r\nUser: filter\r\n\r\nSubject: x\n\nhi\n"
    assert rc == code
    if code:
        assert (out, text) == (b"", f"DThis message looks like spam (score {float(score):g}, threshold 5) (#5.7.1)".encode())
    else:
        assert (out, text) == (f"X-Spam-Status: No, score={score}\nSubject: x\n\nhi\n".encode(), b"")


@pytest.mark.parametrize("answer", [b"", b"garbage\r\n\r\n", b"SPAMD/1.1 76 Bad header line\r\n\r\n",
                                    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 0\r\n\r\n"])
def test_broken_spamd_answer_is_temporary(qhome: QHome, answer: bytes) -> None:
    """An answer that is not spamd's, an error status, or one without a Spam line: Z text, exit 82."""
    fake = FakeSpamd(answer)
    rc, out, text = spamc(fake.address, b"Subject: x\n\nhi\n", qhome)
    fake.thread.join(10)
    assert (rc, out, text) == (82, b"", b"Zspam scanner unavailable, try again later (#4.3.0)")


def test_too_long_passes_unscanned(qhome: QHome) -> None:
    """Over control/spammaxsize the message passes unchanged and spamd is not asked (spamc's -s)."""
    qhome.control("spammaxsize", "10\n")
    rc, out, text = spamc(f"127.0.0.1:{free_port()}", b"Subject: x\n\nhello there\n", qhome)
    assert (rc, out, text) == (0, b"", b"")


def test_parse_clamd() -> None:
    assert scan.parse_clamd(b"stream: OK\0") is None
    assert scan.parse_clamd(b"stream: Win.Test.EICAR_HDB-1 FOUND\0") == "Win.Test.EICAR_HDB-1"
    assert scan.parse_clamd(b"stream: a(b)\r\nc FOUND\0") == "a_b___c"
    for bad in (b"", b"INSTREAM size limit exceeded. ERROR\0", b"stream: lstat() failed ERROR\0"):
        with pytest.raises(scan.Unavailable):
            scan.parse_clamd(bad)
