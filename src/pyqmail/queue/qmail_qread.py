"""qmail-qread: list outgoing messages and recipients (qmail-qread(8)).

Scans queue/info/0 .. info/(split-1) in directory order. A message has an
info file only once qmail-send has preprocessed it (INTERNALS.md), so
messages still in todo/ are not listed; qmail-qstat counts them. For each
message one line:

    22 Nov 2026 15:23:38 GMT  #messnum  size  <sender> [ bouncing]

(the time is info/N's modification time, the size that of mess/N), then one
line per recipient record of local/N and remote/N: "\\tlocal\\taddr" for a
recipient still to be tried (T), "  done\\tlocal\\taddr" for one done (D).
Bytes outside 32..126 in these lines print as '_'. Everything, warnings
included, goes to standard output, as in qmail. A message whose mess or info
file cannot be read gets "warning: trouble with #N: reason" instead.

Exit 0; 111 if the queue cannot be entered or listed, or a file cannot be
read ("fatal: out of memory": qmail's one word for a failed getln).
"""

from __future__ import annotations

import errno
import os

from pyqmail import errors
from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.outbuf import Output

FD_OUT = 1
EXIT_OK = 0
EXIT_FATAL = 111

TEXT_NOMEM = b"fatal: out of memory\n"
TEXT_CHDIR = b"fatal: unable to chdir"
TEXT_OPENDIR = b"fatal: unable to opendir "
TEXT_TROUBLE = b"warning: trouble with #"
LABEL_DONE = b"  done"
LABEL = {"local": b"\tlocal\t", "remote": b"\tremote\t"}
BOUNCING = b" bouncing"

# qmail-qread reads info/N through a 1024-byte buffer and then, without
# resetting that buffer, reads local/N and remote/N through it (the files
# reuse the closed descriptor's number). Bytes of info/N that followed its
# NUL in the same 1024-byte block are therefore read as the start of the
# first recipient file that opens. Kept, because tools compare listings.
INFO_BLOCK = 1024
_READ = 65536
_ULONG = 1 << 64
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
           b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")
_PRINTABLE = bytes(c if 32 <= c <= 126 else ord("_") for c in range(256))


class Fatal(Exception):
    """Stop listing: write the text (already formatted) and exit 111."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text)
        self.text = text


def printable(data: bytes | bytearray) -> bytes:
    """Return data with every byte outside 32..126 replaced by '_'."""
    return bytes(data).translate(_PRINTABLE)


def civil(t: int) -> tuple[int, int, int, int, int, int]:
    """Return (year, month 1-12, day, hour, minute, second) of UTC second t (no leap seconds)."""
    days, secs = divmod(t, 86400)
    # Days since 1970-01-01 to a proleptic Gregorian date, by 400-year eras.
    z = days + 719468
    era = z // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year, month, day, secs // 3600, secs // 60 % 60, secs % 60


def queue_date(t: int) -> bytes:
    """Return qmail-qread's date of second t: '22 Nov 2026 15:23:38'."""
    year, month, day, hour, minute, sec = civil(t)
    return b"%d %s %d %02d:%02d:%02d" % (day, _MONTHS[month - 1], year, hour, minute, sec)


def messnum(name: bytes) -> int | None:
    """Return the message number a directory entry names, or None if it is not all digits."""
    if not name or not name.isdigit():
        return None
    return int(name) % _ULONG  # qmail's scan_ulong wraps, it does not refuse


def trouble(num: int, e: OSError) -> bytes:
    """Return qmail-qread's warning about message num."""
    return TEXT_TROUBLE + b"%d: " % num + errors.describe(e).encode() + b"\n"


class _Sender:
    """The memory qmail-qread reads senders into, stale bytes included.

    The sender is printed up to its NUL. An info file without a NUL (truncated
    or empty) leaves the end of an earlier, longer sender in that memory, and
    qmail prints it; this models that memory so that the listing is the same.
    """

    def __init__(self) -> None:
        self._mem = bytearray()

    def load(self, line: bytes) -> bytes:
        """Store line (info/N up to and including its first NUL); return the sender to print."""
        if len(line) > len(self._mem):
            self._mem.extend(bytes(len(line) - len(self._mem)))
        self._mem[:len(line)] = line
        end = self._mem.find(b"\0", 1)
        return bytes(self._mem[1:end if end != -1 else len(self._mem)])


def read_info(fd: int) -> tuple[bytes, bytes]:
    """Read info/N: return (its first line up to and including the NUL, the bytes read past it).

    Raise Fatal if the file cannot be read.
    """
    data = bytearray()
    nul = -1
    while nul == -1:
        try:
            chunk = os.read(fd, _READ)
        except OSError:
            raise Fatal(TEXT_NOMEM) from None
        if not chunk:
            return bytes(data), b""
        nul = chunk.find(b"\0")
        if nul != -1:
            nul += len(data)
        data += chunk
    block_end = min(len(data), (nul // INFO_BLOCK + 1) * INFO_BLOCK)
    return bytes(data[:nul + 1]), bytes(data[nul + 1:block_end])


def list_recipients(out: Output, fd: int, label: bytes, carry: bytes) -> None:
    """Print the recipient records read from fd (after carry); raise Fatal on a read error."""
    pending = bytearray(carry)
    while True:
        start = 0
        while True:
            end = pending.find(b"\0", start)
            if end == -1:
                break
            kind = pending[start] if end > start else 0
            if kind == ord("D"):
                out.put(LABEL_DONE)
            if kind in (ord("D"), ord("T")):
                out.put(label + printable(pending[start + 1:end]) + b"\n")
            start = end + 1
        del pending[:start]
        try:
            chunk = os.read(fd, _READ)
        except OSError:
            raise Fatal(TEXT_NOMEM) from None
        if not chunk:
            return  # a last record without its NUL is not a record
        pending += chunk


def show(out: Output, num: int, split: int, sender: _Sender) -> None:
    """Print message num's lines (or a warning); raise Fatal on a read error."""
    sub = num % split
    try:
        size = os.stat(f"mess/{sub}/{num}").st_size
    except OSError as e:
        out.put(trouble(num, e))
        return
    try:
        os.stat(f"bounce/{num}")
        bouncing = True
    except OSError:
        bouncing = False
    try:
        fd = os.open(f"info/{sub}/{num}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        out.put(trouble(num, e))
        return
    try:
        line, carry = read_info(fd)
        try:
            qtime = os.fstat(fd).st_mtime_ns // 1_000_000_000
        except OSError as e:
            out.put(trouble(num, e))
            return
    finally:
        os.close(fd)
    stats = (queue_date(qtime) + b" GMT  #%d  %d  <" % (num, size) + sender.load(line) + b"> "
             + (BOUNCING if bouncing else b""))
    out.put(printable(stats) + b"\n")
    for channel in ("local", "remote"):
        try:
            fd = os.open(f"{channel}/{sub}/{num}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.ENOENT:
                out.put(trouble(num, e))
            continue
        try:
            list_recipients(out, fd, LABEL[channel], carry)
        finally:
            os.close(fd)
        carry = b""


def qread(out: Output) -> None:
    """List the queue on out; raise Fatal if it cannot be listed."""
    try:
        os.chdir(_home.home())
        os.chdir("queue")
    except OSError as e:
        raise Fatal(TEXT_CHDIR + b": " + errors.describe(e).encode() + b"\n") from None
    split = _home.install().split
    sender = _Sender()
    for sub in range(split):
        dirname = f"info/{sub}"
        try:
            entries = os.scandir(dirname.encode())
        except OSError as e:
            raise Fatal(TEXT_OPENDIR + dirname.encode() + b": " + errors.describe(e).encode() + b"\n") from None
        with entries:
            for entry in entries:
                num = messnum(entry.name)
                if num is not None:
                    show(out, num, split, sender)


@program("qmail-qread", crash=EXIT_FATAL)
def main(argv: list[str]) -> int:
    """Run qmail-qread; return its exit code."""
    out = Output(FD_OUT)
    try:
        qread(out)
    except Fatal as e:
        out.put(e.text)
        out.flush()
        return EXIT_FATAL
    out.flush()
    return EXIT_OK
