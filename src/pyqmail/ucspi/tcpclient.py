"""tcpclient(1): connect to a TCP server and run a program on the connection, as ucspi-tcp 0.88's.

``tcpclient [ -46hHrRdDqQv ] [ -i localip ] [ -p localport ] [ -T timeoutconn ]
[ -l localname ] [ -t timeoutinfo ] [ -I interface ] host port program [ arg ... ]``

The program runs with descriptor 6 reading from the network and 7 writing
to it, and the tcp-environ(5) variables of the connection (PROTO,
TCPLOCALIP, TCPLOCALPORT, TCPLOCALHOST, TCPREMOTEIP, TCPREMOTEPORT,
TCPREMOTEHOST, TCPREMOTEINFO). host is ``0`` (this machine), an address or a
name; each of its addresses is tried in turn, each for at most timeoutconn
seconds (default 60). Errors: ``tcpclient: unable to connect to IP port N:
REASON`` after the last address, ``tcpclient: fatal: ...``, exit 111; usage
100.

IPv6 as ucspi-tcp-ipv6's tcpclient: host may be an IPv6 address, a name's
IPv6 addresses are tried before its IPv4 ones (-4: IPv4 only), an IPv6
connection has PROTO=TCP6, -6 writes an IPv4 connection in the mapped form
with PROTO=TCP6, -I names the interface (the scope of a link-local address;
an unknown name is ignored). That tcpclient sets no TCP6* variables; nor do we.
"""

from __future__ import annotations

import errno
import os
import select
import socket

from pyqmail import spawn
from pyqmail.entry import program
from pyqmail.sgetopt import Getopt
from pyqmail.ucspi import ident, netinfo, pathexec
from pyqmail.ucspi.rules import scan_ulong
from pyqmail.ucspi.strerr import EXIT_TEMP, EXIT_USAGE, Die, arg, describe

FATAL = b"tcpclient: fatal: "
USAGE = (b"tcpclient: usage: tcpclient [ -hHrRdDqQv ] [ -i localip ] [ -p localport ] [ -T timeoutconn ]"
         b" [ -l localname ] [ -t timeoutinfo ] host port program")
OPTIONS = "46hHrRdDqQvi:p:T:l:t:I:"
FD_READ, FD_WRITE = 6, 7


class Config:
    """tcpclient's options."""

    __slots__ = ("verbosity", "remotehost", "remoteinfo", "delay", "localip", "localport", "timeoutconn",
                 "localname", "timeoutinfo", "v4only", "v6env", "interface", "argv")

    def __init__(self) -> None:
        self.verbosity = 1
        self.remotehost = True
        self.remoteinfo = True
        self.delay = True
        self.localip: str | None = None
        self.localport = 0
        self.timeoutconn = 60
        self.localname: bytes | None = None
        self.timeoutinfo = 26
        self.v4only = False
        self.v6env = False
        self.interface: str | None = None
        self.argv: list[str] = []


def parse_args(argv: list[str]) -> tuple[Config, str, str]:
    """Return the options, host and port; raise Die (usage)."""
    cfg = Config()
    g = Getopt(argv, OPTIONS)
    for opt, val in g:
        v = val or ""
        if opt in "hH":
            cfg.remotehost = opt == "h"
        elif opt in "rR":
            cfg.remoteinfo = opt == "r"
        elif opt in "dD":
            cfg.delay = opt == "d"
        elif opt == "q":
            cfg.verbosity = 0
        elif opt == "Q":
            cfg.verbosity = 1
        elif opt == "v":
            cfg.verbosity = 2
        elif opt == "i":
            cfg.localip = v
        elif opt == "p":
            cfg.localport = scan_ulong(arg(v))[0] & 0xFFFF
        elif opt == "T":
            cfg.timeoutconn = scan_ulong(arg(v))[0]
        elif opt == "t":
            cfg.timeoutinfo = scan_ulong(arg(v))[0]
        elif opt == "l":
            cfg.localname = arg(v)
        elif opt == "4":
            cfg.v4only, cfg.v6env = True, False
        elif opt == "6":
            cfg.v6env, cfg.v4only = True, False
        elif opt == "I":
            cfg.interface = v
        else:
            raise Die(EXIT_USAGE, USAGE)
    rest = g.operands()
    if len(rest) < 3:
        raise Die(EXIT_USAGE, USAGE)
    cfg.argv = rest[2:]
    return cfg, rest[0], rest[1]


def port_number(port: str) -> int:
    """Return the port a number or an /etc/services name stands for; raise Die."""
    value, n = scan_ulong(arg(port))
    if n and n == len(arg(port)):
        return value & 0xFFFF
    try:
        return socket.getservbyname(port, "tcp")
    except (OSError, UnicodeError):
        raise Die(EXIT_TEMP, FATAL + b"unable to figure out port number for " + arg(port)) from None


def addresses(host: str, cfg: Config) -> list[str]:
    """Return the addresses to try for host, IPv6 first (-4: IPv4 only); raise Die if it has none."""
    if host in ("", "0"):
        return ["127.0.0.1"]
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.split("%", 1)[0])
        except OSError:
            continue
        if family == socket.AF_INET6 and cfg.v4only:
            break
        return [host]
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET if cfg.v4only else socket.AF_UNSPEC,
                                   socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:
            raise Die(EXIT_TEMP, FATAL + b"temporarily unable to figure out IP address for "
                      + arg(host) + b": temporary failure") from e
        raise Die(EXIT_TEMP, FATAL + b"no IP address for " + arg(host)) from e
    except (OSError, UnicodeError) as e:
        raise Die(EXIT_TEMP, FATAL + b"no IP address for " + arg(host)) from e
    v6 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET6]
    v4 = [str(i[4][0]) for i in infos if i[0] == socket.AF_INET]
    out = list(dict.fromkeys(v6 + v4))
    if not out:
        raise Die(EXIT_TEMP, FATAL + b"no IP address for " + arg(host))
    return out


def attempt(ip: str, port: int, cfg: Config) -> tuple[socket.socket | None, int]:
    """Connect to ip within timeoutconn seconds; return (socket, 0) or (None, errno); raise Die for a bind failure."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    scope = 0
    if family == socket.AF_INET6 and cfg.interface:
        try:
            scope = socket.if_nametoindex(cfg.interface)
        except OSError:
            scope = 0  # as the patch: an unknown interface is no scope
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if cfg.localip is not None or cfg.localport:
            local = cfg.localip or ("::" if family == socket.AF_INET6 else "0.0.0.0")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((local, cfg.localport))
            except OSError as e:
                raise Die(EXIT_TEMP, FATAL + b"unable to bind socket: " + describe(e)) from e
        sock.setblocking(False)
        where = (ip.split("%", 1)[0], port, 0, scope) if family == socket.AF_INET6 else (ip, port)
        err = sock.connect_ex(where)
        if err == errno.EINPROGRESS:
            _, writable, _ = select.select([], [sock], [], cfg.timeoutconn)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if writable else errno.ETIMEDOUT
        if err:
            sock.close()
            return None, err
        sock.setblocking(True)
        return sock, 0
    except BaseException:
        sock.close()
        raise


def connect(cfg: Config, host: str, port: int) -> socket.socket:
    """Return a connection to one of host's addresses; raise Die after the last failure."""
    ips = addresses(host, cfg)
    for i, ip in enumerate(ips):
        sock, err = attempt(ip, port, cfg)
        if sock is not None:
            return sock
        text = (b"tcpclient: unable to connect to " + ip.encode() + b" port %d: " % port
                + describe(OSError(err, os.strerror(err))))
        if i + 1 == len(ips):
            raise Die(EXIT_TEMP, text if cfg.verbosity else None)
        if cfg.verbosity:
            os.write(2, text + b"\n")
    raise Die(EXIT_TEMP, None)  # not reached: addresses() never returns []


def environment(sock: socket.socket, cfg: Config) -> None:
    """Set the tcp-environ(5) variables of the connection in os.environ."""
    local = sock.getsockname()
    remote = sock.getpeername()
    v6 = cfg.v6env or sock.family == socket.AF_INET6
    local_ip = netinfo.ip_text(str(local[0]), cfg.v6env)
    remote_ip = netinfo.ip_text(str(remote[0]), cfg.v6env)
    env = os.environb
    env[b"PROTO"] = b"TCP6" if v6 else b"TCP"
    env[b"TCPLOCALIP"] = local_ip.encode()
    env[b"TCPLOCALPORT"] = b"%d" % local[1]
    env[b"TCPREMOTEIP"] = remote_ip.encode()
    env[b"TCPREMOTEPORT"] = b"%d" % remote[1]
    localhost = cfg.localname
    if localhost is None:
        localhost = netinfo.ptr_env(local_ip)
    _put(b"TCPLOCALHOST", localhost)
    _put(b"TCPREMOTEHOST", netinfo.ptr_env(remote_ip) if cfg.remotehost else None)
    info = None
    if cfg.remoteinfo:
        info = ident.remoteinfo((netinfo.ip_text(str(remote[0])), remote[1]),
                                (netinfo.ip_text(str(local[0])), local[1]), cfg.timeoutinfo)
        info = None if info is None else info.split(b"\0", 1)[0]
    _put(b"TCPREMOTEINFO", info)


def _put(name: bytes, value: bytes | None) -> None:
    if value is None:
        os.environb.pop(name, None)
    else:
        os.environb[name] = value


@program("tcpclient", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Connect and become the program with the connection on descriptors 6 and 7; return only on failure."""
    try:
        cfg, host, port_text = parse_args(argv)
        port = port_number(port_text)
        sock = connect(cfg, host, port)
    except Die as d:
        return d.report()
    if cfg.verbosity >= 2:
        os.write(2, b"tcpclient: connected to " + netinfo.ip_text(str(sock.getpeername()[0]), cfg.v6env).encode()
                 + b" port %d\n" % port)
    if not cfg.delay:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # as socket_tcpnodelay's: not checked
    environment(sock, cfg)
    name = cfg.argv[0]
    fd = sock.detach()
    try:
        target = pathexec.target(name, os.environ.get("PATH"))
        spawn.become(target, cfg.argv, fds={0: 0, 1: 1, 2: 2, FD_READ: fd, FD_WRITE: fd})
    except OSError as e:
        return Die(EXIT_TEMP, FATAL + b"unable to run " + arg(name) + b": " + describe(e)).report()
