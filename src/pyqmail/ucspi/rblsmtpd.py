"""rblsmtpd(1): block mail from RBL-listed clients, as ucspi-tcp 0.88's.

``rblsmtpd [ -bBcC ] [ -t timeout ] [ -r base ] [ -a base ] smtpd [ arg ... ]``

$RBLSMTPD decides first: empty means not blocked, ``-text`` blocks with a
553, any other text blocks with a 451. Otherwise each -r and -a source is
asked in order (during option parsing, as in ucspi-tcp, so -b and -c affect
only the sources after them) until one lists (TXT) or anti-lists (A) the
reversed $TCPREMOTEIP. A blocked client gets rblsmtpd's own limited SMTP
dialogue, which refuses every attempt to send, for at most timeout seconds;
anyone else gets smtpd, which rblsmtpd becomes.
"""

from __future__ import annotations

import os

from pyqmail import sig, spawn
from pyqmail.entry import program
from pyqmail.sgetopt import Getopt
from pyqmail.ucspi import dnsq, pathexec
# The RBL decision and the reversed name are shared with qmail-smtpd's control/dnsbllist check.
from pyqmail.ucspi.rbl import ACCEPTED_CLIENT, BOUNCE, REFUSE, UNDECIDED, Decision, reverse  # noqa: F401 (re-exported)
from pyqmail.ucspi.rules import scan_ulong
from pyqmail.ucspi.strerr import EXIT_TEMP, EXIT_USAGE, Die, arg, describe, warn

FATAL = b"rblsmtpd: fatal: "
USAGE = b"rblsmtpd: usage: rblsmtpd [ -b ] [ -R ] [ -t timeout ] [ -r base ] [ -a base ] smtpd [ arg ... ]"
OPTIONS = "bBcCt:r:a:"
DEFAULT_TIMEOUT = 60

GREETING = b"220 rblsmtpd.local\r\n"
ACCEPT = b"250 rblsmtpd.local\r\n"
QUIT = b"221 rblsmtpd.local\r\n"
ACCEPTED = frozenset((b"helo", b"ehlo", b"mail", b"rset", b"noop"))
MAX_COMMAND = 64  # only the verb matters; the rest of a long line is not kept
_READ = 64  # ucspi-tcp reads the client 64 bytes at a time
MAX_ALARM = 0x7FFFFFFF


def preload() -> None:
    """Import the DNS library now: tcpserver calls this once, in its parent, for all its children."""
    dnsq.preload()


def answer(line: bytes, refusal: bytes) -> tuple[bytes, bool]:
    """Return (reply, quit) for one client line (CR and LF removed) of the limited dialogue."""
    verb = line.split(b" ", 1)[0].lower()
    if verb == b"quit":
        return QUIT, True
    if verb in ACCEPTED:
        return ACCEPT, False
    return refusal, False


def _write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


def dialogue(refusal: bytes) -> None:
    """Hold the limited SMTP dialogue on descriptors 0 and 1 until QUIT or end of input."""
    _write(GREETING)
    line = bytearray()
    while True:
        chunk = os.read(0, _READ)
        if not chunk:
            return  # a command cut short by the end of input is not answered
        for c in chunk:
            if c != 0x0A:
                if len(line) < MAX_COMMAND:
                    line.append(0x0A if c == 0 else c)  # as ucspi-tcp's commands(): NUL reads as LF
                continue
            if line[-1:] == b"\r":
                del line[-1]
            reply, stop = answer(bytes(line), refusal)
            _write(reply)
            if stop:
                return
            line.clear()


def _drop(signum: int, frame: object) -> None:
    os._exit(0)  # the timeout ends the dialogue, whatever the client is doing


def block(ip: bytes, d: Decision, timeout: int) -> int:
    """Log and refuse a blocked client; return the exit code."""
    message = d.message()
    warn(b"rblsmtpd: " + ip + b" pid %d: " % os.getpid() + message)
    refusal = message + b"\r\n"
    try:
        if not timeout:
            _write(refusal)
        else:
            sig.signal(sig.SIGALRM, _drop)
            sig.alarm(min(timeout, MAX_ALARM))
            dialogue(refusal)
    except BrokenPipeError:
        # C rblsmtpd leaves SIGPIPE alone: writing to a client that has gone kills it.
        sig.signal(sig.SIGPIPE, sig.SIG_DFL)
        os.kill(os.getpid(), sig.SIGPIPE)
    except OSError:
        pass  # a failed read ends commands() and the dialogue
    return 0


@program("rblsmtpd", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Refuse a blocked client, or become the SMTP server argv names."""
    env_ip = os.environ.get("TCPREMOTEIP")
    ip = b"" if env_ip is None else arg(env_ip)
    env_rbl = os.environ.get("RBLSMTPD")
    d = Decision(ip, None if env_rbl is None else arg(env_rbl))
    timeout = DEFAULT_TIMEOUT
    g = Getopt(argv, OPTIONS)
    for opt, val in g:
        v = val or ""
        if opt in "bB":
            d.bounce_listed = opt == "b"
        elif opt in "cC":
            d.fail_closed = opt == "c"
        elif opt == "t":
            timeout = scan_ulong(arg(v))[0]
        elif opt == "r":
            d.rbl(arg(v), dnsq.txt)
        elif opt == "a":
            d.antirbl(arg(v), dnsq.ip4)
        else:
            return Die(EXIT_USAGE, USAGE).report()
    rest = g.operands()
    if not rest:
        return Die(EXIT_USAGE, USAGE).report()
    if d.blocked:
        return block(ip, d, timeout)
    try:
        spawn.become(pathexec.target(rest[0], os.environ.get("PATH")), rest)
    except OSError as e:
        return Die(EXIT_TEMP, FATAL + b"unable to run " + arg(rest[0]) + b": " + describe(e)).report()
