"""qmail-popup's TLS: the server context from qmail-smtpd's control files, and the relay to qmail-pop3d.

Control files, read at each STLS (or at the start of a POP3S session), as
qmail-smtpd reads them: control/servercert.pem (certificate, chain and key in
one file), control/tlsserverciphers (overridden by $TLSCIPHERS; they govern TLS
1.2 and older), control/dh2048.pem when present. POP3 asks for no client
certificate.

A TLS session lives in this process's memory (OpenSSL's keys and sequence
numbers): it cannot be handed to checkpassword and qmail-pop3d as descriptors
0 and 1. So after a login over TLS, qmail-popup stays the TLS end and gives
checkpassword (and the qmail-pop3d it runs) one end of a UNIX socket pair as
descriptors 0 and 1; `relay` carries the bytes between the two until
qmail-pop3d's end closes. The descriptor interface qmail-popup -> checkpassword
-> qmail-pop3d is unchanged.

Only `context` imports ssl (the plain path never loads OpenSSL); `available`
only opens the certificate file.
"""

from __future__ import annotations

import os
import select

from pyqmail import control, net

TYPE_CHECKING = False  # typing costs milliseconds per connection; mypy sees the imports
if TYPE_CHECKING:
    import socket
    import ssl

SERVERCERT = "servercert.pem"
DHPARAMS = "dh2048.pem"
CIPHERS = "tlsserverciphers"
RELAY_CHUNK = 65536


class Unusable(Exception):
    """The server certificate (or the cipher list) cannot be used; str() says why."""


def available() -> bool:
    """Return whether control/servercert.pem can be opened for reading."""
    try:
        fd = os.open(control.path(SERVERCERT), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    os.close(fd)
    return True


def _why(e: BaseException) -> str:
    return net.reason(e).split(" (_ssl.c", 1)[0]


def context() -> ssl.SSLContext:
    """Return the server context; raise Unusable when servercert.pem or tlsserverciphers cannot be used."""
    import ssl

    x = os.environ.get("TLSCIPHERS")
    if x is not None:
        cipher_list = x or None
    else:
        try:
            lines = control.read_lines(CIPHERS)
        except control.ControlError as e:
            raise Unusable(str(e)) from None
        cipher_list = ":".join(lines) if lines else None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(control.path(SERVERCERT))
    except OSError as e:  # ssl.SSLError included
        raise Unusable("missing certificate: " + _why(e)) from None
    ctx.num_tickets = 0  # no resumption: no later process could use a ticket this one issued
    if cipher_list:
        try:
            ctx.set_ciphers(cipher_list)
        except ssl.SSLError:
            pass  # safe: as qmail-smtpd (and the qmail-tls patch), a bad list leaves OpenSSL's defaults
    try:
        ctx.load_dh_params(control.path(DHPARAMS))
    except (OSError, ValueError):
        pass  # safe: absent or unusable, OpenSSL's built-in groups are used
    return ctx


def describe(conn: net.Conn) -> str:
    """Return 'VERSION CIPHER' of conn's TLS session."""
    assert conn.tls is not None
    c = conn.tls.cipher()
    return f"{conn.tls.version() or 'TLS'} {c[0] if c else 'unknown'}"


def relay(conn: net.Conn, sock: socket.socket, first: bytes = b"") -> None:
    """Carry bytes between the client on conn and sock (first goes to sock first) until sock's peer closes.

    The client's end of input shuts sock's writing side (qmail-pop3d then
    sees the end of its input); a client that cannot be written to, or
    silence on both sides for conn's timeout, ends the relay. Memory stays
    bounded: nothing more is read from the client while sock has not taken
    what was read before.
    """
    fd = sock.fileno()
    os.set_blocking(fd, False)
    to_child = bytearray(first)
    client_open = True
    shut = False
    while True:
        client_ready = client_open and not to_child and conn.buffered()
        if not client_ready:
            p = select.poll()
            p.register(fd, select.POLLIN | (select.POLLOUT if to_child else 0))
            if client_open and not to_child:
                p.register(conn.fd_in, select.POLLIN)
            events = p.poll(conn.ms)
            if not events:
                return  # idle for the whole timeout on both sides
            for what, ev in events:
                if what == fd:
                    if ev & select.POLLOUT and to_child:
                        try:
                            n = os.write(fd, to_child)
                        except BlockingIOError:
                            n = 0
                        except OSError:
                            to_child.clear()  # qmail-pop3d is gone: its end of sock tells us next
                            client_open = False
                            n = 0
                        del to_child[:n]
                    if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                        try:
                            data = os.read(fd, RELAY_CHUNK)
                        except BlockingIOError:
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            return
                        conn.put(data)
                        conn.flush()  # NetError: the client is gone; the caller closes sock
                else:
                    client_ready = True
        if client_ready:
            try:
                to_child += conn.read()
            except net.NetError:
                client_open = False
            else:
                try:  # most often the socket pair takes it at once: no poll round for it
                    del to_child[:os.write(fd, to_child)]
                except BlockingIOError:
                    pass  # poll says when
                except OSError:
                    to_child.clear()  # qmail-pop3d is gone: its end of sock tells us next
                    client_open = False
        if not client_open and not to_child and not shut:
            shut = True
            try:
                sock.shutdown(1)  # SHUT_WR: qmail-pop3d reads the end of its input
            except OSError:
                pass  # safe: qmail-pop3d is gone already; its end of sock tells us next
