"""qmail-popup: read a POP username and password, then run subprogram (qmail-popup(8)).

Usage: qmail-popup hostname subprogram [args...]. The greeting carries the APOP
timestamp <pid.time@hostname>. USER then PASS, or APOP, hand the name, the
password (or digest) and the timestamp, each NUL-terminated, to subprogram on
descriptor 3; qmail-popup waits for it and exits 1, after "-ERR aack, child
crashed" or "-ERR authorization failed" if it did not exit 0. One attempt per
connection, as in qmail.

Beyond qmail 1.03 (issue 13): CAPA (RFC 2449) lists TOP, UIDL, USER and, while
TLS is not on and control/servercert.pem is readable, STLS (RFC 2595), which
starts TLS on the connection (pop3.tls has the certificate files, qmail-smtpd's).
$POP3S set: TLS from the first byte (port 995). $FORCETLS set: USER, PASS and
APOP are refused until TLS is on. After a login over TLS, subprogram gets a
socket pair's end as descriptors 0 and 1 and qmail-popup relays the session
(pop3.tls.relay). $PYQMAIL_POP3_TIMEOUT replaces the 20-minute timeout (a test seam).
"""

from __future__ import annotations

import os
import time

from pyqmail import net
from pyqmail.entry import program
from pyqmail.pop3.protocol import MAX_LINE, OK, READ_SIZE, connect, err, readline, split_command

EXIT = 1  # qmail-popup's die(): every way out is exit 1
FD_IN = 0
FD_OUT = 1
FD_AUTH = 3

ERR_USAGE = err("usage: popup hostname subprogram")
ERR_PIPE = err("unable to open pipe")
ERR_WRITE = err("unable to write pipe")
ERR_FORK = err("unable to fork")
ERR_CRASHED = err("aack, child crashed")
ERR_BADAUTH = err("authorization failed")
ERR_SYNTAX = err("syntax error")
ERR_WANTUSER = err("USER first")
ERR_AUTHORIZ = err("authorization first")
# RFC 2595 section 4's example texts; RFC 2449 section 5's CAPA reply.
STLS_OK = b"+OK Begin TLS negotiation\r\n"
ERR_TLS_ACTIVE = err("Command not permitted when TLS active")
ERR_NEED_TLS = err("TLS required, say STLS first")
CAPA_HEAD = b"+OK Capability list follows\r\n"


def err_no_tls(why: str) -> bytes:
    """The reply to STLS when the certificate cannot be used."""
    return err("TLS not available: " + why[:200])


def capabilities(tls_on: bool, cert_readable: bool, force_tls: bool) -> bytes:
    """Return the CAPA reply: what this session offers now (RFC 2449; STLS of RFC 2595).

    TOP and UIDL are qmail-pop3d's (listed here as RFC 2449 section 5 allows, for the
    TRANSACTION state); USER only when a password may be given now; STLS only before TLS
    and with a certificate to offer. No PIPELINING: qmail-popup hands the connection to
    qmail-pop3d after PASS, and a command sent before PASS's answer would be lost.
    """
    lines = [b"TOP", b"UIDL"]
    if tls_on or not force_tls:
        lines.append(b"USER")
    if not tls_on and cert_readable:
        lines.append(b"STLS")
    return CAPA_HEAD + b"".join(x + b"\r\n" for x in lines) + b".\r\n"


def greeting(pid: int, now: int, hostname: bytes) -> tuple[bytes, bytes]:
    """Return (greeting line, APOP timestamp) for a session of pid started at now."""
    stamp = b"<%d.%d@" % (pid, now) + hostname + b">"
    return b"+OK " + stamp + b"\r\n", stamp


def _authenticate(childargs: list[str], user: bytes, password: bytes, stamp: bytes, conn: net.Conn) -> bytes:
    """Run childargs with user, password and stamp on descriptor 3; return the final reply.

    In plain text the child gets descriptors 0 and 1; over TLS, a socket pair's
    end, relayed to the client until it closes.
    """
    from pyqmail import auth

    conn.flush()
    pair = None
    fds = {0: FD_IN, 1: FD_OUT, 2: 2}
    if conn.tls is not None:
        import socket

        try:
            pair = socket.socketpair()
        except OSError:
            return ERR_PIPE
        fds[0] = fds[1] = pair[1].fileno()
    try:
        try:
            # The record (two lines of at most MAX_LINE bytes each) fits in a pipe's buffer:
            # auth.start writes it before the child starts.
            pid = auth.start(childargs, user, password, stamp, fds)
        except auth.Trouble as e:
            if e.what == "pipe":
                return ERR_PIPE
            if e.what == "write":
                return ERR_WRITE
            # As exec failing in qmail's child: the child exits 1, read as a refusal.
            os.write(2, f"qmail-popup: unable to run {childargs[0]}: {e.why}\n".encode("utf-8", "replace"))
            return ERR_BADAUTH
        finally:
            if pair is not None:
                pair[1].close()
        if pair is not None:
            from pyqmail.pop3 import tls

            try:
                tls.relay(conn, pair[0], conn.pending())
            except net.NetError:
                pass  # safe: the client is gone; closing our end below ends the child's session
            pair[0].close()
        code = auth.finish(pid)
    finally:
        if pair is not None:
            pair[0].close()
    if code < 0:
        return ERR_CRASHED
    if code != 0:
        return ERR_BADAUTH
    return b""


def _start_tls(conn: net.Conn, reply: bytes) -> bytes | None:
    """Send reply (if any) and shake hands; return None, or the reply if the certificate is unusable.

    Raises net.NetError (after logging why) if the handshake fails: the connection is then unusable.
    """
    from pyqmail.pop3 import tls

    try:
        ctx = tls.context()
    except tls.Unusable as e:
        _log(f"TLS not available: {e}")
        return err_no_tls(str(e))
    conn.put(reply)
    conn.read_size = READ_SIZE  # from now on what is read ahead is dropped (STLS) or relayed, never lost
    try:
        conn.starttls(ctx)
    except net.TlsFailed as e:
        _log(f"TLS handshake failed: {e.reason}")
        raise
    return None


def _log(text: str) -> None:
    try:
        os.write(2, f"qmail-popup: {text}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass  # safe: only the log line is lost


@program("qmail-popup", crash=EXIT)
def main(argv: list[str]) -> int:
    """Greet, read USER/PASS or APOP, run subprogram once; always exit 1."""
    conn = connect(FD_IN, FD_OUT)
    try:
        if len(argv) < 3:
            conn.put(ERR_USAGE)
            conn.flush()
            return EXIT
        _session(argv, conn)
        conn.flush()
        conn.close_tls()
    except net.NetError:
        pass  # the client is gone, timed out, or TLS failed: qmail-popup's die()
    return EXIT


def _session(argv: list[str], conn: net.Conn) -> None:
    from pyqmail.pop3 import tls

    env = os.environb
    force_tls = b"FORCETLS" in env
    if b"POP3S" in env:
        if _start_tls(conn, b"") is not None:
            return  # no certificate: nothing can be said in TLS
    hostname = os.fsencode(argv[1])
    childargs = argv[2:]
    line, stamp = greeting(os.getpid(), int(time.time()), hostname)
    conn.put(line)
    username: bytes | None = None
    while True:
        verb, arg = split_command(readline(conn, MAX_LINE))
        if verb in (b"user", b"pass", b"apop") and force_tls and conn.tls is None:
            conn.put(ERR_NEED_TLS)
        elif verb == b"user":
            if not arg:
                conn.put(ERR_SYNTAX)
                continue
            conn.put(OK)
            username = arg
        elif verb == b"pass":
            if username is None:
                conn.put(ERR_WANTUSER)
            elif not arg:
                conn.put(ERR_SYNTAX)
            else:
                conn.put(_authenticate(childargs, username, arg, stamp, conn))
                return
        elif verb == b"apop":
            name, space, digest = arg.partition(b" ")
            if not space:
                conn.put(ERR_SYNTAX)
                continue
            conn.put(_authenticate(childargs, name, digest, stamp, conn))
            return
        elif verb == b"quit":
            conn.put(OK)
            return
        elif verb == b"noop":
            conn.put(OK)
        elif verb == b"capa":
            conn.put(capabilities(conn.tls is not None, conn.tls is None and tls.available(), force_tls))
        elif verb == b"stls":
            if conn.tls is not None:
                conn.put(ERR_TLS_ACTIVE)
                continue
            refused = _start_tls(conn, STLS_OK)
            if refused is not None:
                conn.put(refused)
                continue
            # RFC 2595 section 4: nothing learnt before TLS counts (a USER possibly injected
            # in plain text); starttls dropped whatever was read past the STLS line.
            username = None
        else:
            conn.put(ERR_AUTHORIZ)
