"""tcp-env as qmail 1.03's: the tcp-environ(5) variables from the connection on descriptor 0,
$PROTO=TCP taken as set up, silent exit 111 on every failure."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from conftest import IS_ROOT, run
from pyqmail.ucspi import netinfo
from ucspikit import IdentServer, Served, ours

SHOW = 'env | grep -E "^(TCP|PROTO)" | sort'


def server_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TCP") and k != "PROTO"}


def via_tcpserver(tcp_env_args: str, source: str | None = None) -> tuple[bytes, int, int]:
    """Run tcp-env (with PROTO removed first) for a connection; return (its output, server port, client port)."""
    script = f"unset PROTO TCPLOCALHOST TCPREMOTEHOST; TCPREMOTEINFO=stale exec {ours('tcp-env')} {tcp_env_args} sh -c '{SHOW}'"
    with Served([ours("tcpserver"), "-1", "-HR", "-l", "x", "127.0.0.1", "0", "sh", "-c", script],
                env=server_env()) as srv:
        out, cport = srv.connect(source=source)
        return out, srv.port, cport


def test_sets_the_environment() -> None:
    out, port, cport = via_tcpserver("-R")
    name = netinfo.ptr("127.0.0.1")
    host = f"TCPLOCALHOST={name}\n" if name else ""
    rhost = f"TCPREMOTEHOST={name}\n" if name else ""
    assert out.decode() == (f"PROTO=TCP\n{host}TCPLOCALIP=127.0.0.1\nTCPLOCALPORT={port}\n{rhost}"
                            f"TCPREMOTEIP=127.0.0.1\nTCPREMOTEPORT={cport}\n")


def test_no_ident_server_leaves_remoteinfo_unset() -> None:
    out, _, _ = via_tcpserver("-t 2")
    assert b"TCPREMOTEINFO" not in out


def test_ident() -> None:
    if not IS_ROOT:
        pytest.skip("an ident server needs port 113 (root)")
    source = "127.0.113.2"
    try:
        server = IdentServer(b"0 , 0 : USERID : UNIX : Joe Smith\r\n", ip=source, port=113)
    except OSError:
        pytest.skip("port 113 busy")
    with server:
        out, port, cport = via_tcpserver("-r -t 5", source=source)
        assert server.requests == [f"{cport} , {port}\r\n".encode()]
    assert b"TCPREMOTEINFO=JoeSmith\n" in out


def test_proto_tcp_is_trusted() -> None:
    """With $PROTO=TCP nothing is looked up, and descriptor 0 need not be a socket."""
    env = dict(os.environ, PROTO="TCP", TCPREMOTEIP="1.2.3.4", TCPREMOTEINFO="kept")
    res = run([ours("tcp-env"), "sh", "-c", SHOW], env=env)
    assert res.returncode == 0
    assert b"TCPREMOTEIP=1.2.3.4\n" in res.stdout and b"TCPREMOTEINFO=kept\n" in res.stdout


@pytest.mark.parametrize("argv,env", [
    ([], {}),
    (["-R"], {}),
    (["-R", "true"], {"PROTO": "UDP"}),
    (["-R", "/nonexistent/program"], {"PROTO": "TCP"}),
    (["no-such-program-name"], {"PROTO": "TCP"}),
])
def test_failures_exit_111_silently(argv: list[str], env: dict[str, str]) -> None:
    res = run([ours("tcp-env"), *argv], env=dict(os.environ, **env))
    assert (res.returncode, res.stdout, res.stderr) == (111, b"", b"")


def test_unknown_option_complains_and_goes_on() -> None:
    res = run([ours("tcp-env"), "-x", "-R", "echo", "ran"], env=dict(os.environ, PROTO="TCP"))
    assert (res.returncode, res.stdout, res.stderr) == (0, b"ran\n", b"tcp-env: illegal option -- x\n")


def test_descriptors_and_socket_pair() -> None:
    """Descriptor 0 a socket that is not TCP (a UNIX socket pair): exit 111."""
    a, b = socket.socketpair()
    try:
        p = subprocess.run([ours("tcp-env"), "-R", "echo"], stdin=a.fileno(), capture_output=True,
                           env={k: v for k, v in os.environ.items() if k != "PROTO"}, timeout=30)
    finally:
        a.close()
        b.close()
    assert (p.returncode, p.stdout) == (111, b"")


def test_name_lowercased() -> None:
    name = netinfo.ptr("127.0.0.1")
    if name is not None:
        assert name == name.lower()
    assert re.fullmatch(r"[0-9.]+", netinfo.ip_text("::ffff:10.0.0.1")) is not None
