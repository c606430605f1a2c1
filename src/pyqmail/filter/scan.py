"""The scanners' core: qmail-spamc and qmail-clamdscan, SpamAssassin and ClamAV as qmail-qfilter filters (the simscan role).

Both are filters for control/smtpfilters (or a qmail-qfilter command line):
the message on descriptor 0, what they write on 1 becomes the message
(nothing written: it passes on unchanged), descriptor 6 takes a D or Z text
for qmail-smtpd when they refuse it with exit 82 (31 or 71 when 6 is closed).
They speak the daemons' own protocols on a socket, so no process starts per
message:

- qmail-spamc: spamd's SPAMC/1.5 `HEADERS` request (what spamc sends). The
  X-Spam-* fields spamd answers with are put on top of the message, which is
  otherwise passed on byte for byte (a DKIM signature stays valid; spamd's
  report_safe wrapping is not used). A score at or over control/spamthreshold
  (a decimal number; missing: never refuse, only mark) is refused with
  `554 This message looks like spam (score S, threshold T) (#5.7.1)`.
  Messages longer than control/spammaxsize bytes (default 512000, spamc's
  -s) pass unscanned, as spamc passes them. spamd: control/spamd or $SPAMD,
  `HOST:PORT` or the absolute path of a unix socket (default
  127.0.0.1:783); $SPAMUSER is sent as spamc's -u.
- qmail-clamdscan: clamd's `zINSTREAM` (4-byte big-endian length, then that
  many bytes, a zero length ends it). A virus is refused with
  `554 This message contains a virus (NAME) (#5.7.1)`. clamd: control/clamd
  or $CLAMD, a socket path or `HOST:PORT` (default Debian's
  /var/run/clamav/clamd.ctl).

A scanner that cannot be reached, times out (control/scantimeout or
$SCANTIMEOUT seconds, default 300) or answers with an error is a temporary
refusal, `451 ... scanner unavailable (#4.3.0)`: never a silent pass. Unless
the admin chooses fail-open: control/scanfailopen holding 1 (or $SCANFAILOPEN
set to 1; set to 0 it overrides the file), and the message then passes with
`X-Scan-Skipped: NAME unavailable: REASON` on top.
"""

from __future__ import annotations

import os
import socket
import struct

from pyqmail import durable

FD_MESSAGE = 0
FD_OUT = 1
FD_ERRSTR = 6
CHUNK = 65536

EXIT_PERM = 31
EXIT_TEMP = 71
EXIT_BUG = 81
EXIT_CUSTOM = 82

SPAMD_DEFAULT = "127.0.0.1:783"
CLAMD_DEFAULT = "/var/run/clamav/clamd.ctl"
SPAM_MAX_DEFAULT = 512000
TIMEOUT_DEFAULT = 300
REPLY_MAX = 65536  # bytes of a daemon's answer read before it counts as broken

SPAM_TEXT = "DThis message looks like spam (score {score}, threshold {threshold}) (#5.7.1)"
VIRUS_TEXT = "DThis message contains a virus ({name}) (#5.7.1)"
DOWN_TEXT = "Z{what} scanner unavailable, try again later (#4.3.0)"


class Unavailable(Exception):
    """The scanner could not be asked, or its answer makes no sense; the text says why."""


class Refuse(Exception):
    """Refuse the message with this D or Z text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


# Settings.

def _setting(env_name: str, control_name: str, default: str) -> str:
    from pyqmail import control

    value = os.environ.get(env_name)
    if value:
        return value
    line = control.read_line(control_name)
    return line.strip() if line and line.strip() else default


def fail_open() -> bool:
    """Return True if the admin chose to pass mail when a scanner is unavailable."""
    return _setting("SCANFAILOPEN", "scanfailopen", "0") == "1"


def timeout() -> float:
    """Return the seconds one scan may take."""
    try:
        seconds = float(_setting("SCANTIMEOUT", "scantimeout", str(TIMEOUT_DEFAULT)))
    except ValueError:
        return float(TIMEOUT_DEFAULT)
    return seconds if seconds > 0 else float(TIMEOUT_DEFAULT)


def spam_threshold() -> float | None:
    """Return control/spamthreshold as a number, None when missing (never refuse)."""
    from pyqmail import control

    line = control.read_line("spamthreshold")
    if line is None or not line.strip():
        return None
    try:
        return float(line.strip())
    except ValueError:
        raise Unavailable(f"control/spamthreshold is not a number: {line.strip()!r}") from None


def connect(address: str, seconds: float) -> socket.socket:
    """Return a socket connected to address (`HOST:PORT` or a path); raise Unavailable."""
    try:
        if address.startswith("/"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(seconds)
            try:
                s.connect(address)
            except BaseException:
                s.close()
                raise
            return s
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise Unavailable(f"bad address {address!r}")
        return socket.create_connection((host.strip("[]"), int(port)), timeout=seconds)
    except OSError as e:
        raise Unavailable(f"cannot connect to {address}: {e.strerror or e}") from None


def _recv_all(sock: socket.socket, limit: int) -> bytes:
    buf = bytearray()
    try:
        while len(buf) <= limit:
            chunk = sock.recv(CHUNK)
            if not chunk:
                return bytes(buf)
            buf += chunk
    except OSError as e:
        raise Unavailable(f"reading the answer: {e.strerror or e}") from None
    raise Unavailable("answer too long")


# spamd.

def spamd_request(message: bytes, user: str | None) -> bytes:
    """Return spamc's HEADERS request for message."""
    head = b"HEADERS SPAMC/1.5\r\nContent-length: %d\r\n" % len(message)
    if user:
        head += b"User: " + user.encode("utf-8", "replace") + b"\r\n"
    return head + b"\r\n" + message


def parse_spamd(answer: bytes) -> tuple[float, float, bytes]:
    """Return (score, spamd's threshold, the X-Spam-* fields) of spamd's answer; raise Unavailable."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        raise Unavailable("spamd's answer has no end of header")
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith(b"SPAMD/"):
        raise Unavailable(f"not spamd's answer: {lines[0][:80]!r}")
    if status[1] != b"0":
        raise Unavailable(f"spamd says {lines[0][:80].decode('latin-1')}")
    score = required = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"spam":
            # Spam: True ; 1003.3 / 5.0
            try:
                _verdict, numbers = value.split(b";", 1)
                s, r = numbers.split(b"/", 1)
                score, required = float(s), float(r)
            except ValueError:
                raise Unavailable(f"bad Spam line from spamd: {line[:80]!r}") from None
    if score is None or required is None:
        raise Unavailable("spamd's answer has no Spam line")
    return score, required, x_spam_fields(body)


def x_spam_fields(header: bytes) -> bytes:
    """Return the X-Spam-* fields (with their continuation lines) of header, LF line ends."""
    out = []
    keep = False
    for line in header.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if keep:
                out.append(line + b"\n")
            continue
        keep = line.lower().startswith(b"x-spam-")
        if keep:
            out.append(line + b"\n")
    return b"".join(out)


def spam_check(message: bytes, seconds: float) -> bytes:
    """Return the X-Spam-* fields for message; raise Refuse at or over the threshold, Unavailable."""
    threshold = spam_threshold()
    sock = connect(_setting("SPAMD", "spamd", SPAMD_DEFAULT), seconds)
    try:
        try:
            sock.sendall(spamd_request(message, os.environ.get("SPAMUSER")))
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            raise Unavailable(f"sending to spamd: {e.strerror or e}") from None
        answer = _recv_all(sock, REPLY_MAX + len(message))
    finally:
        sock.close()
    score, _required, fields = parse_spamd(answer)
    if threshold is not None and score >= threshold:
        raise Refuse(SPAM_TEXT.format(score=f"{score:g}", threshold=f"{threshold:g}"))
    return fields


# clamd.

def clamd_check(seconds: float) -> None:
    """Stream descriptor 0 to clamd; raise Refuse naming a virus, Unavailable."""
    sock = connect(_setting("CLAMD", "clamd", CLAMD_DEFAULT), seconds)
    try:
        try:
            sock.sendall(b"zINSTREAM\0")
            while True:
                chunk = _read(FD_MESSAGE, CHUNK)
                if not chunk:
                    break
                sock.sendall(struct.pack(">I", len(chunk)) + chunk)
            sock.sendall(struct.pack(">I", 0))
        except OSError as e:
            # clamd closes early when the stream passes its StreamMaxLength: its answer says so
            if not isinstance(e, (BrokenPipeError, ConnectionResetError)):
                raise Unavailable(f"sending to clamd: {e.strerror or e}") from None
        answer = _recv_all(sock, REPLY_MAX)
    finally:
        sock.close()
    verdict = parse_clamd(answer)
    if verdict is not None:
        raise Refuse(VIRUS_TEXT.format(name=verdict))


def parse_clamd(answer: bytes) -> str | None:
    """Return the virus clamd names in its INSTREAM answer, None for a clean stream; raise Unavailable."""
    text = answer.split(b"\0", 1)[0].decode("utf-8", "replace").strip()
    if text.endswith(" FOUND"):
        _, _, name = text[:-len(" FOUND")].partition(": ")
        # the name goes into an SMTP reply: printable ASCII only, bounded
        name = "".join(c if " " < c < "\x7f" and c not in "()" else "_" for c in name)[:100]
        return name or "unnamed"
    if text.endswith(": OK"):
        return None
    raise Unavailable(f"clamd says {text[:200]!r}" if text else "clamd closed without an answer")


# Descriptors.

def _read(fd: int, size: int) -> bytes:
    while True:
        try:
            return os.read(fd, size)
        except InterruptedError:
            continue
        except OSError as e:
            raise Unavailable(f"unable to read the message: {e.strerror}") from None


def _read_upto(fd: int, limit: int) -> bytes:
    """Return fd's bytes up to limit + 1 of them (more than limit: too long to scan)."""
    buf = bytearray()
    while len(buf) <= limit:
        chunk = _read(fd, min(CHUNK, limit + 1 - len(buf)))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def _rewind() -> bool:
    try:
        os.lseek(FD_MESSAGE, 0, os.SEEK_SET)
        return True
    except OSError:
        return False


def _pass_with(top: bytes, held: bytes, rest: bool) -> None:
    """Write top, held and (if rest) what remains on descriptor 0 to descriptor 1."""
    durable.write_all(FD_OUT, top + held)
    while rest:
        chunk = _read(FD_MESSAGE, CHUNK)
        if not chunk:
            return
        durable.write_all(FD_OUT, chunk)


def _refuse(text: str) -> int:
    """Write text to descriptor 6 and return 82; 31/71 when descriptor 6 is closed."""
    data = text.encode("utf-8", "replace")
    try:
        durable.write_all(FD_ERRSTR, data)
        return EXIT_CUSTOM
    except OSError:
        return EXIT_PERM if data[:1] == b"D" else EXIT_TEMP


def _unavailable(what: str, prog: str, reason: str) -> int:
    """Log reason; pass the message marked (fail-open) or refuse it for now."""
    os.write(2, f"{prog}: {what} unavailable: {reason}\n".encode("utf-8", "replace"))
    if not fail_open():
        return _refuse(DOWN_TEXT.format(what=what))
    line = f"X-Scan-Skipped: {what} unavailable: {reason}".replace("\n", " ")[:900] + "\n"
    if _rewind():
        _pass_with(line.encode("utf-8", "replace"), b"", True)
        return 0
    return _refuse(DOWN_TEXT.format(what=what))  # cannot read the message again: not silently


def spamc(argv: list[str]) -> int:
    """Ask spamd about the message on descriptor 0; mark it on 1, or refuse it."""
    from pyqmail import control

    limit = control.read_int("spammaxsize", SPAM_MAX_DEFAULT)
    try:
        message = _read_upto(FD_MESSAGE, limit)
        if len(message) > limit:
            return 0  # too long to scan: passes on unchanged, as spamc's -s
        fields = spam_check(message, timeout())
    except Refuse as r:
        return _refuse(r.text)
    except Unavailable as u:
        return _unavailable("spam", "qmail-spamc", str(u))
    _pass_with(fields, message, False)
    return 0


def clamdscan(argv: list[str]) -> int:
    """Stream the message on descriptor 0 to clamd; refuse it if clamd finds a virus."""
    try:
        clamd_check(timeout())
    except Refuse as r:
        return _refuse(r.text)
    except Unavailable as u:
        return _unavailable("virus", "qmail-clamdscan", str(u))
    return 0  # nothing written: the message passes on unchanged
