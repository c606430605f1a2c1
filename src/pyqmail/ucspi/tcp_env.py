"""tcp-env(1): set up the tcp-environ(5) variables for a connection on descriptor 0, then run a program.

``tcp-env [ -rR ] [ -t timeout ] program [ arg ... ]``, as qmail 1.03's. If
$PROTO is already TCP the environment is taken as set up and left alone.
Otherwise the addresses come from descriptor 0, the host names from the
resolver (``softdnserror`` when it fails temporarily, as qmail's dns_ptr
says), and $TCPREMOTEINFO from the remote ident server unless -R (timeout:
each step of the exchange, default 30 seconds). Every failure, including one
to run the program, exits 111 silently, as qmail's does.
"""

from __future__ import annotations

import os
import socket

from pyqmail import spawn
from pyqmail.entry import program
from pyqmail.sgetopt import Getopt
from pyqmail.ucspi import ident, netinfo, pathexec
from pyqmail.ucspi.rules import scan_ulong
from pyqmail.ucspi.strerr import EXIT_TEMP, arg

DEFAULT_TIMEOUT = 30
SOFT = "softdnserror"


def host_name(ip: str) -> str | None:
    """Return ip's name for the environment: lowercased, SOFT on a temporary failure, None if none."""
    try:
        return netinfo.ptr(ip)
    except netinfo.SoftError:
        return SOFT


def environment(env: dict[str, str], remoteinfo: bool, timeout: int) -> None:
    """Set env's tcp-environ(5) variables from the socket on descriptor 0; raise OSError."""
    sock = socket.socket(fileno=os.dup(0))
    with sock:
        env["PROTO"] = "TCP"
        local = sock.getsockname()
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise OSError("not a TCP connection")
        local_ip = netinfo.ip_text(str(local[0]))
        env["TCPLOCALPORT"] = str(local[1])
        env["TCPLOCALIP"] = local_ip

        def put(name: str, value: str | None) -> None:
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value

        put("TCPLOCALHOST", host_name(local_ip))
        remote = sock.getpeername()
        remote_ip = netinfo.ip_text(str(remote[0]))
        env["TCPREMOTEPORT"] = str(remote[1])
        env["TCPREMOTEIP"] = remote_ip
        put("TCPREMOTEHOST", host_name(remote_ip))
        env.pop("TCPREMOTEINFO", None)
        if remoteinfo:
            info = ident.remoteinfo((remote_ip, remote[1]), (local_ip, local[1]), timeout,
                                    limit=ident.QMAIL_LIMIT, overall=False)
            if info is not None:
                env["TCPREMOTEINFO"] = os.fsdecode(info.split(b"\0", 1)[0])


@program("tcp-env", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Run argv's program with the connection on descriptor 0 described in the environment."""
    remoteinfo = True
    timeout = DEFAULT_TIMEOUT
    g = Getopt(argv, "rRt:")
    for opt, val in g:
        if opt in "rR":
            remoteinfo = opt == "r"
        elif opt == "t":
            timeout = scan_ulong(arg(val or ""))[0]
        # qmail's tcp-env complains about other options and goes on.
    rest = g.operands()
    if not rest:
        return EXIT_TEMP
    env = dict(os.environ)
    if env.get("PROTO") != "TCP":
        try:
            environment(env, remoteinfo, timeout)
        except OSError:
            return EXIT_TEMP
    try:
        spawn.become(pathexec.target(rest[0], os.environ.get("PATH")), rest, env=env,
                     fds={**pathexec.inherited_fds(), 0: 0, 1: 1, 2: 2})
    except OSError:
        return EXIT_TEMP
