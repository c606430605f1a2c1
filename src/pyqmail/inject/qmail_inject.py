"""qmail-inject(8): preprocess a message's header and queue the message.

usage: qmail-inject [ -nNaAhH ] [ -fsender ] [ recip ... ]

Reads a message on descriptor 0, rewrites its header as qmail-header(5)
says (header.Header), and hands it to qmail-queue (or, with -n, prints it).
Exits 0, 100 for a usage or severe syntax error, 111 for a temporary error.

SMTPUTF8 (RFC 6531/6532): with $SMTPUTF8MAIL set, or an argument address that is
UTF-8 beyond ASCII, UTF-8 words in the header are atoms and UTF-8 local parts stay
unquoted; the message is queued flagged SMTPUTF8 ($SMTPUTF8MAIL to qmail-queue) then,
or whenever an envelope address is not ASCII.

This program runs once per message sent through sendmail, so its import path
is kept to what every run needs: no typing, re, enum or email at start-up,
and the queue client is imported only when the message is queued.
"""

from __future__ import annotations

import os
import time

from pyqmail import control
from pyqmail import home as _home
from pyqmail import rfc822, smtputf8
from pyqmail.entry import program
from pyqmail.inject import header as hdr
from pyqmail.sgetopt import Getopt

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from pyqmail.inject.served import Job, SpoolQQ
    from pyqmail.queue.qq import QQ

EXIT_OK = 0
EXIT_PERM = 100
EXIT_TEMP = 111

FATAL = b"qmail-inject: fatal: "
MSG_NOMEM = b"out of memory\n"
MSG_READ = b"read error\n"
MSG_QQT = b"unable to run qmail-queue\n"
MSG_CHDIR = b"internal bug\n"
MSG_PARSE_LINE = b"unable to parse this line:\n"
MSG_PARSE_ADDR = b"unable to parse address: "
MSG_INVALID = b"invalid header field: "

OPTIONS = "aAhHnNf:"
# qmail-inject(8)'s QMAILINJECT letters and the header.Settings flag each sets.
QMAILINJECT_LETTERS = {ord("c"): "name_comment", ord("s"): "delete_sender", ord("f"): "delete_from",
                       ord("i"): "delete_messid", ord("r"): "hack_recip", ord("m"): "hack_mess"}
RECIP_DEFAULT, RECIP_ARGS, RECIP_HEADER, RECIP_AH = 1, 2, 3, 4

FD_IN = 0
FD_OUT = 1
FD_ERR = 2
READ_SIZE = 65536
OUT_SIZE = 65536


# The request a qmail-queued worker serves (pyqmail.inject.served), None in qmail-inject's own
# process: then the message id names the caller's pid, descriptor 0 is read only while the
# caller is there, and the message goes to the worker's spool instead of a qmail-queue.
_served: Job | None = None


def serving(job: Job | None) -> None:
    """Run the following inject() calls for job (None: in this process, as always)."""
    global _served
    _served = job


class Fatal(Exception):
    """qmail-inject gives up: args are (exit code, the text after 'qmail-inject: fatal: ')."""


def _die_read(e: OSError) -> Fatal:
    import errno

    if e.errno == errno.ENOMEM:
        return Fatal(EXIT_TEMP, MSG_NOMEM)
    return Fatal(EXIT_TEMP, MSG_READ)


class Input:
    """Descriptor 0 read in bounded chunks, as lines or as raw remaining bytes."""

    def __init__(self, fd: int = FD_IN) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.eof = False
        self.wait = None if _served is None else _served.wait

    def _fill(self) -> bool:
        if self.eof:
            return False
        if self.wait is not None:
            self.wait(self.fd)
        try:
            chunk = os.read(self.fd, READ_SIZE)
        except OSError as e:
            raise _die_read(e) from None
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def line(self) -> bytes | None:
        """Return the next line with its newline (added if the input ends without one), or None at the end."""
        scanned = 0
        while True:
            nl = self.buf.find(b"\n", scanned)
            if nl >= 0:
                out = bytes(self.buf[:nl + 1])
                del self.buf[:nl + 1]
                return out
            scanned = len(self.buf)
            if not self._fill():
                if not self.buf:
                    return None
                out = bytes(self.buf) + b"\n"
                self.buf.clear()
                return out

    def chunk(self) -> bytes | None:
        """Return the bytes buffered or else the next chunk read as they are, or None at the end."""
        if self.buf or self._fill():
            out = bytes(self.buf)
            self.buf.clear()
            return out
        return None


class Output:
    """Where the message goes: standard output (-n, errors ignored as qmail does) or qmail-queue."""

    def __init__(self) -> None:
        self.qq: QQ | SpoolQQ | None = None
        self.buf = bytearray()

    def start_queue(self, utf8: bool = False) -> None:
        """Start qmail-queue (utf8: for a message flagged SMTPUTF8); raise Fatal if no pipe or process can be made."""
        if _served is not None:
            from pyqmail.inject.served import SpoolQQ

            self.qq = SpoolQQ(_served, utf8)
            return
        from pyqmail.queue.qq import QQ

        try:
            self.qq = QQ(env={**os.environ, smtputf8.ENV: "1"}) if utf8 else QQ()
        except OSError:
            raise Fatal(EXIT_TEMP, MSG_QQT) from None

    def put(self, data: bytes) -> None:
        if self.qq is not None:
            self.qq.write(data)
            return
        self.buf += data
        if len(self.buf) >= OUT_SIZE:
            self.flush()

    def flush(self) -> None:
        """Write what standard output holds; a failed write is ignored, as qmail-inject does."""
        data = memoryview(bytes(self.buf))
        self.buf.clear()
        try:
            while data:
                data = data[os.write(FD_OUT, data):]
        except OSError:
            pass  # safe: qmail-inject ignores a failed write to standard output; the exit code is the message's


def _env(name: bytes) -> bytes | None:
    return os.environb.get(name)


def settings_from_env(starttime: int, pid: int) -> hdr.Settings:
    """Return the header settings that QMAILINJECT and the user variables give."""
    s = hdr.Settings()
    for letter in _env(b"QMAILINJECT") or b"":
        flag = QMAILINJECT_LETTERS.get(letter)
        if flag is not None:
            setattr(s, flag, True)
    s.mailhost = _first(b"QMAILHOST", b"MAILHOST")
    s.mailrhost = _first(b"QMAILSHOST")
    if s.mailrhost is None:
        s.mailrhost = s.mailhost
    user = _first(b"QMAILUSER", b"MAILUSER", b"USER", b"LOGNAME")
    s.mailuser = b"anonymous" if user is None else user
    ruser = _first(b"QMAILSUSER")
    s.mailruser = s.mailuser if ruser is None else ruser
    s.fullname = _first(b"QMAILNAME", b"MAILNAME", b"NAME")
    s.starttime = starttime
    s.pid = pid
    return s


def _first(*names: bytes) -> bytes | None:
    for name in names:
        value = os.environb.get(name)
        if value is not None:
            return value
    return None


def read_mft(path: bytes) -> frozenset[bytes] | None:
    """Return the lowercased addresses of QMAILMFTFILE, None if it does not exist."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _die_read(e) from None
    boxes: set[bytes] = set()
    for line in data.split(b"\n"):
        line = line.rstrip(b" \t")
        if line and line[:1] != b"#":
            # qmail keeps each line as a C string: a NUL splits it.
            boxes.update(part.lower() for part in line.split(b"\0"))
    return frozenset(boxes)


def _control(name: str, env: bytes, me: str | None) -> bytes:
    """control/name, else control/me (read once by the caller, as qmail's control_init), else name."""
    try:
        value = control.read_line(name)
    except control.ControlError:
        raise Fatal(EXIT_TEMP, MSG_READ) from None
    if value is None:
        value = me if me is not None else name
    override = _env(env)
    if override is not None:
        return override
    return (value or "").encode(control.ENCODING)


def get_controls(s: hdr.Settings) -> hdr.Rewriter:
    """Read QMAILMFTFILE, then the control files with their environment overrides."""
    mft = _env(b"QMAILMFTFILE")
    if mft is not None:
        s.mft = read_mft(mft)
    try:
        os.chdir(_home.home())
    except OSError:
        raise Fatal(EXIT_TEMP, MSG_CHDIR) from None
    try:
        me = control.me()
    except control.ControlError:
        raise Fatal(EXIT_TEMP, MSG_READ) from None
    defaultdomain = _control("defaultdomain", b"QMAILDEFAULTDOMAIN", me)
    try:
        dd = hdr.parse_fixed(b"." + defaultdomain)
        defaulthost = _control("defaulthost", b"QMAILDEFAULTHOST", me)
        dh = hdr.parse_fixed(b"@" + defaulthost)
        plusdomain = _control("plusdomain", b"QMAILPLUSDOMAIN", me)
        pd = hdr.parse_fixed(b"." + plusdomain)
    except hdr.ParseError as e:
        raise Fatal(EXIT_PERM, MSG_PARSE_LINE + e.args[0]) from None
    s.idhost = _control("idhost", b"QMAILIDHOST", me)
    return hdr.Rewriter(dh, dd, pd)


def envelope_address(rw: hdr.Rewriter, arg: bytes, utf8: bool = False) -> bytes | None:
    """Return arg (a -f sender or recipient argument) rewritten, or None if it cannot be parsed."""
    toks = rfc822.tokenize(rfc822.quote2(arg, utf8), utf8)
    if toks is None:
        return None
    rw.generic(toks)
    return rfc822.unquote(toks)


def read_header(inp: Input, h: hdr.Header) -> bytes | None:
    """Feed the header fields of the input to h; return the body's first bytes (None: no body).

    A field runs on over lines starting with a space or tab; a line starting
    "From " becomes an MBOX-Line field; the header ends at a blank line, at
    the end of the input, or at a line that is not a field (a blank line is
    then put in before it).
    """
    field: bytes | None = None
    while True:
        line = inp.line()
        if line is None:
            if field is not None:
                h.field(field)
            return None
        if field is not None:
            if line[:1] == b" " or line[:1] == b"\t":
                field += line
                continue
            h.field(field)
            field = None
        if line == b"\n":
            return line
        if line[:5] == b"From ":
            field = b"MBOX-Line: " + line
        elif hdr.field_valid(line):
            field = line
        else:
            return b"\n" + line


def inject(argv: list[str]) -> int:
    """Run qmail-inject; raise Fatal to give up."""
    starttime = int(time.time())
    s = settings_from_env(starttime, os.getpid() if _served is None else _served.pid)
    rw = get_controls(s)

    strategy = RECIP_DEFAULT
    queue = True
    sender: bytes | None = None
    # SMTPUTF8 (RFC 6531/6532): asked for with $SMTPUTF8MAIL, or implied by an argument address
    # with UTF-8 beyond ASCII; then UTF-8 words are atoms and UTF-8 local parts stay unquoted.
    utf8 = smtputf8.flagged(os.environb.get(smtputf8.ENV_B)) or any(
        not a.isascii() and rfc822.utf8_word(a) for a in (os.fsencode(x) for x in argv[1:]))
    opts = Getopt(argv, OPTIONS)
    while True:
        opt = opts.next()
        if opt is None:
            break
        if opt == "a":
            strategy = RECIP_ARGS
        elif opt == "A":
            strategy = RECIP_DEFAULT
        elif opt == "h":
            strategy = RECIP_HEADER
        elif opt == "H":
            strategy = RECIP_AH
        elif opt == "n":
            queue = False
        elif opt == "N":
            queue = True
        elif opt == "f":
            arg = os.fsencode(opts.optarg or "")
            sender = envelope_address(rw, arg, utf8)
            if sender is None:
                raise Fatal(EXIT_PERM, MSG_PARSE_LINE + rfc822.quote2(arg))
        else:
            return EXIT_PERM
    args = [os.fsencode(a) for a in argv[opts.optind:]]
    if strategy == RECIP_DEFAULT:
        strategy = RECIP_ARGS if args else RECIP_HEADER
    recips: list[bytes] = []
    if strategy != RECIP_HEADER:
        for arg in args:
            box = envelope_address(rw, arg, utf8)
            if box is None:
                raise Fatal(EXIT_PERM, MSG_PARSE_ADDR + arg + b"\n")
            recips.append(box)
    header_recips = strategy != RECIP_ARGS

    h = hdr.Header(rw, s, sender)
    h.utf8 = utf8
    inp = Input()
    out = Output()
    try:
        body = read_header(inp, h)
        head = h.finish(show_return_path=not queue)
    except hdr.ParseError as e:
        raise Fatal(EXIT_PERM, MSG_PARSE_LINE + e.args[0]) from None
    except hdr.InvalidField as e:
        raise Fatal(EXIT_PERM, MSG_INVALID + e.args[0]) from None
    if queue:
        # The message is flagged SMTPUTF8 when asked for or when an envelope address is not ASCII.
        envelope = [h.sender or b"", *recips, *(h.recipients() if header_recips else [])]
        out.start_queue(utf8 or any(not a.isascii() for a in envelope))
    out.put(head)
    if body is not None:
        out.put(body)
        last = b"\n"
        while True:
            chunk = inp.chunk()
            if chunk is None:
                break
            out.put(chunk)
            last = chunk[-1:]
        if last != b"\n":
            out.put(b"\n")  # the last line of the body gets its newline
    if not queue:
        out.flush()
        return EXIT_OK
    if header_recips:
        recips += h.recipients()
    assert out.qq is not None
    report = out.qq.close(hdr.c_string(h.sender or b""), [hdr.c_string(r) for r in recips])
    if report:
        code = EXIT_PERM if report[:1] == b"D" else EXIT_TEMP
        raise Fatal(code, report[1:] + b"\n")
    return EXIT_OK


@program("qmail-inject", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Run qmail-inject with argv; return its exit code."""
    try:
        return inject(argv)
    except Fatal as e:
        code, text = e.args
    except MemoryError:
        code, text = EXIT_TEMP, MSG_NOMEM
    try:
        os.write(FD_ERR, FATAL + text)
    except OSError:
        pass  # safe: stderr gone; the exit code carries the failure
    return int(code)
