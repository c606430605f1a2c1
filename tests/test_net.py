"""pyqmail.net: the shared transport, over real socket pairs and pipes, plain and TLS."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from tlskit import Cert, make_ca, make_leaf

from pyqmail import net

SHORT = 0.3  # seconds: the timeouts under test (a real wait: the peer really stalls)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Cert, Cert]:
    d = tmp_path_factory.mktemp("netcerts")
    ca = make_ca(d, "netca")
    return ca, make_leaf(d, "server", ca, ["mx.example.com"])


def server_ctx(leaf: Cert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.both)
    return ctx


def client_ctx(ca: Cert) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca.cert)
    return ctx


@pytest.fixture
def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_lines_replies_and_flush_before_read(pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    c = net.Conn(mine.fileno(), mine.fileno(), 5)
    c.put(b"220 hi\r\n")
    peer.setblocking(False)  # nothing is sent before a read or a flush
    with pytest.raises(BlockingIOError):
        peer.recv(100)
    peer.setblocking(True)
    peer.sendall(b"ONE\r\nTWO\r\nTHR")
    assert c.line(100) == b"ONE\r"
    assert peer.recv(100) == b"220 hi\r\n"
    assert c.line(100) == b"TWO\r"
    peer.sendall(b"EE\n")
    assert c.line(100) == b"THREE"
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(net.Gone):
        c.line(100)


def test_overlong_line_is_cut_and_memory_bounded(pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    c = net.Conn(mine.fileno(), mine.fileno(), 5)
    big = b"x" * (5 * 1024 * 1024)

    def send() -> None:
        peer.sendall(big + b"\nNEXT\n")

    t = threading.Thread(target=send)
    t.start()
    got = c.line(1000)
    assert got == b"x" * 1000
    assert len(c.buf) < 2 * net.READ_SIZE  # never the whole line
    assert c.line(1000) == b"NEXT"
    t.join()


def test_read_timeout_and_write_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    c = net.Conn(mine.fileno(), mine.fileno(), SHORT)
    start = time.monotonic()
    with pytest.raises(net.Timeout) as e:
        c.read()
    assert e.value.reading
    assert SHORT - 0.05 <= time.monotonic() - start < SHORT + 2
    mine.setblocking(False)  # a full socket buffer: writes would block forever
    c.put(b"y" * (8 * 1024 * 1024))
    with pytest.raises(net.Timeout) as e:
        c.flush()
    assert not e.value.reading


def test_deadline_bounds_the_whole_session(pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    c = net.Conn(mine.fileno(), mine.fileno(), None, deadline=time.monotonic() + SHORT)
    peer.sendall(b"ab")
    assert c.byte() == ord("a")
    assert c.chunk(10) == b"b"
    with pytest.raises(net.Timeout):
        c.byte()


def test_out_max_sends_when_full(pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    c = net.Conn(mine.fileno(), mine.fileno(), 5, out_max=4)
    c.put(b"ab")
    c.put(b"cd")
    assert peer.recv(10) == b"abcd"


def test_write_to_closed_peer_is_gone(pair: tuple[socket.socket, socket.socket]) -> None:
    mine, peer = pair
    peer.close()
    c = net.Conn(mine.fileno(), mine.fileno(), 5)
    c.put(b"x" * 100000)
    with pytest.raises(net.Gone):
        c.flush()


def _tls_client(sock: socket.socket, ctx: ssl.SSLContext, script: list[bytes], got: list[bytes]) -> None:
    """Say STARTTLS-like plain text, then shake hands and echo the script."""
    with ctx.wrap_socket(sock, server_hostname="mx.example.com") as t:
        for line in script:
            t.sendall(line)
            got.append(t.recv(1000))


def test_starttls_on_a_socket_drops_what_was_read_ahead(pair: tuple[socket.socket, socket.socket],
                                                         certs: tuple[Cert, Cert]) -> None:
    ca, leaf = certs
    mine, peer = pair
    c = net.Conn(mine.fileno(), mine.fileno(), 10)
    peer.sendall(b"STARTTLS\r\nRSET\r\n")  # RSET pipelined in plain text: must never be seen
    assert c.line(100) == b"STARTTLS\r"
    c.put(b"220 ready for tls\r\n")
    got: list[bytes] = []

    def client() -> None:
        assert peer.recv(100) == b"220 ready for tls\r\n"
        _tls_client(peer, client_ctx(ca), [b"EHLO a\r\n", b"QUIT\r\n"], got)

    t = threading.Thread(target=client)
    t.start()
    c.starttls(server_ctx(leaf))
    assert c.tls is not None and c.tls.version() in ("TLSv1.2", "TLSv1.3")
    assert c.line(100) == b"EHLO a\r"  # not the plain-text RSET
    c.put(b"250 ok\r\n")
    assert c.line(100) == b"QUIT\r"
    c.put(b"221 bye\r\n")
    c.flush()
    t.join()
    assert got == [b"250 ok\r\n", b"221 bye\r\n"]


def test_starttls_over_two_pipes(certs: tuple[Cert, Cert]) -> None:
    """Descriptors 0 and 1 that are not one socket (MemoryBIO): a relay thread joins them to a socket."""
    ca, leaf = certs
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    mine, peer = socket.socketpair()

    def to_socket() -> None:
        while data := os.read(out_r, 65536):
            mine.sendall(data)

    def from_socket() -> None:
        while data := mine.recv(65536):
            os.write(in_w, data)
        os.close(in_w)

    threads = [threading.Thread(target=to_socket), threading.Thread(target=from_socket)]
    for t in threads:
        t.start()
    c = net.Conn(in_r, out_w, 10)
    got: list[bytes] = []
    client = threading.Thread(target=_tls_client, args=(peer, client_ctx(ca), [b"HELLO\r\n"], got))
    client.start()
    c.starttls(server_ctx(leaf))
    assert c.line(100) == b"HELLO\r"
    c.put(b"hi\r\n")
    c.flush()
    client.join()
    assert got == [b"hi\r\n"]
    os.close(out_w)
    peer.close()
    for t in threads:
        t.join()
    for fd in (in_r, out_r):
        os.close(fd)
    mine.close()


def test_garbage_instead_of_client_hello(pair: tuple[socket.socket, socket.socket], certs: tuple[Cert, Cert]) -> None:
    mine, peer = pair
    c = net.Conn(mine.fileno(), mine.fileno(), 10)
    peer.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"\0" * 100)
    with pytest.raises(net.TlsFailed) as e:
        c.starttls(server_ctx(certs[1]))
    assert e.value.error is not None
    assert c.tls is None
    c.put(b"454 TLS connection failed\r\n")  # still plain text: a reply can be written
    c.flush()


def test_stalled_handshake_times_out(pair: tuple[socket.socket, socket.socket], certs: tuple[Cert, Cert]) -> None:
    mine, peer = pair
    c = net.Conn(mine.fileno(), mine.fileno(), SHORT)
    peer.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
    start = time.monotonic()
    with pytest.raises(net.TlsFailed) as e:
        c.starttls(server_ctx(certs[1]))
    assert str(e.value) == "timed out"
    assert time.monotonic() - start < SHORT + 2


def test_client_side_and_verification_failure(pair: tuple[socket.socket, socket.socket],
                                              certs: tuple[Cert, Cert], tmp_path: Path) -> None:
    """qmail-remote's seam: a client Conn; a CA that does not match is an SSLCertVerificationError."""
    ca, leaf = certs
    other = make_ca(tmp_path, "otherca")
    mine, peer = pair
    srv = server_ctx(leaf)

    def server() -> None:
        try:
            with srv.wrap_socket(peer, server_side=True) as t:
                t.sendall(t.recv(100).upper())
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=server)
    t.start()
    c = net.Conn(mine.fileno(), mine.fileno(), 10)
    with pytest.raises(net.TlsFailed) as e:
        c.starttls(client_ctx(other), server_side=False, server_hostname="mx.example.com")
    assert isinstance(e.value.error, ssl.SSLCertVerificationError)
    t.join()


def test_client_side_round_trip_and_close_notify(pair: tuple[socket.socket, socket.socket],
                                                 certs: tuple[Cert, Cert]) -> None:
    ca, leaf = certs
    mine, peer = pair
    srv = server_ctx(leaf)
    seen: list[bytes] = []

    def server() -> None:
        with srv.wrap_socket(peer, server_side=True) as t:
            t.sendall(t.recv(100).upper())
            seen.append(t.recv(100))  # b"" after close_notify

    t = threading.Thread(target=server)
    t.start()
    c = net.Conn(mine.fileno(), mine.fileno(), 10)
    c.starttls(client_ctx(ca), server_side=False, server_hostname="mx.example.com")
    c.put(b"ehlo\r\n")
    assert c.line(100) == b"EHLO\r"
    c.close_tls()
    t.join()
    assert seen == [b""]


def test_plain_connection_does_not_import_ssl() -> None:
    code = ("import sys, socket\nfrom pyqmail import net\na, b = socket.socketpair()\n"
            "c = net.Conn(a.fileno(), a.fileno(), 5)\nb.sendall(b'x\\n')\nc.line(10)\nc.put(b'y')\nc.flush()\n"
            "print('ssl' in sys.modules, '_ssl' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=60)
    assert p.stdout == b"False False\n", p.stderr
