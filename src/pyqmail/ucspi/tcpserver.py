"""tcpserver(1): accept TCP connections and run a program for each, as ucspi-tcp 0.88's.

``tcpserver [ -1UXpPhHrRoOdDqQv46 ] [ -c limit ] [ -x rules.cdb ] [ -B banner ]
[ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ] [ -t timeout ]
[ -I interface ] host port program [ arg ... ]``

IPv6 as ucspi-tcp-ipv6 (Debian's package of the IPv6 patch): host may be an
IPv6 address; host ``0`` listens on ``::`` for both families unless -4 (or
the machine has no IPv6); -6 puts IPv4 clients in the IPv6 form
(``::ffff:1.2.3.4``, PROTO=TCP6); -I names the interface of a link-local
host (its scope; an unknown name is ignored, as the patch does). A TCP6
connection also gets TCP6LOCALIP, TCP6LOCALPORT, TCP6LOCALHOST, TCP6REMOTEIP,
TCP6REMOTEPORT, TCP6REMOTEHOST, TCP6REMOTEINFO (same values) and, for a
scoped local address, TCP6INTERFACE. An IPv4 connection's environment and
log lines stay 0.88's exactly (the patch adds TCP6* there too: see DESIGN).

The parent is a single-threaded poll loop: it accepts while fewer than
limit children run, forks one child per connection and reaps children when
SIGCHLD wakes it. The child learns about the connection (tcp-environ(5)
variables, -x rules), logs its decision and becomes the program with the
socket on descriptors 0 and 1, through `pyqmail.spawn.become`: pyqmail's own
programs run in the forked child without a new interpreter, and their modules
are imported once, in the parent, before the first connection.
"""

from __future__ import annotations

import _socket
import errno
import os
import posix
import select
import socket
import sys

from pyqmail import cdb, sig, spawn, workers
from pyqmail.entry import program
from pyqmail.sgetopt import Getopt
from pyqmail.ucspi import ident, netinfo, pathexec, rules
from pyqmail.ucspi.rules import scan_ulong
from pyqmail.ucspi.strerr import EXIT_TEMP, EXIT_USAGE, Die, arg, describe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from typing import TypeVar

    from pyqmail.ucspi.hub import Hub, Session

    Number = TypeVar("Number", int, float)

# The process environment os.environ and os.environb wrap: bytes to bytes.
_ENVIRON = posix.environ
_MAX_FD = os.sysconf("SC_OPEN_MAX")
sys_byteorder = sys.byteorder

FATAL = b"tcpserver: fatal: "
DROP = b"tcpserver: warning: dropping connection, "
USAGE = (b"tcpserver: usage: tcpserver [ -1UXpPhHrRoOdDqQv ] [ -c limit ] [ -x rules.cdb ]"
         b" [ -B banner ] [ -g gid ] [ -u uid ] [ -b backlog ] [ -l localname ]"
         b" [ -t timeout ] host port program")
OPTIONS = "46dDvqQhHrR1UXx:t:u:g:l:b:B:c:pPoOI:"
EXIT_DENY = 100
QUIET, ERRORS, VERBOSE = 0, 1, 2
SAFE_MAX = 100  # safecats: longer fields are cut and marked with "..."


class Config:
    """tcpserver's options (a plain class: see DESIGN, start-up cost)."""

    __slots__ = ("verbosity", "limit", "backlog", "rules", "allow_norules", "banner", "uid",
                 "gid", "localname", "timeout", "remotehost", "paranoid", "remoteinfo",
                 "killopts", "delay", "print_port", "v4only", "v6env", "interface", "argv")

    def __init__(self) -> None:
        self.verbosity = ERRORS
        self.limit = 40
        self.backlog = 20
        self.rules: bytes | None = None
        self.allow_norules = False
        self.banner = b""
        self.uid = 0
        self.gid = 0
        self.localname: bytes | None = None
        self.timeout = 26
        self.remotehost = True
        self.paranoid = False
        self.remoteinfo = True
        self.killopts = True
        self.delay = True
        self.print_port = False
        self.v4only = False
        self.v6env = False
        self.interface: str | None = None
        self.argv: list[str] = []


def warn(cfg: Config, text: bytes) -> None:
    """Write an error message unless -q."""
    if cfg.verbosity >= ERRORS:
        try:
            os.write(2, text + b"\n")
        except OSError:
            pass  # safe: stderr gone; only the message is lost


def status(cfg: Config, text: bytes) -> None:
    """Write a status message if -v."""
    if cfg.verbosity >= VERBOSE:
        try:
            os.write(2, text + b"\n")
        except OSError:
            pass  # safe: stderr gone; only the status line is lost


def safe(field: bytes) -> bytes:
    """Return a log field as safecats prints it: unprintables, % and : as ?, 100 bytes at most."""
    out = bytes(c if 33 <= c <= 126 and c not in (0x25, 0x3A) else 0x3F for c in field[:SAFE_MAX])
    return out + b"..." if len(field) >= SAFE_MAX else out


def safe_ip(ip: bytes) -> bytes:
    """Return an address field: IPv6 colons stay (as the IPv6 patch prints them)."""
    if b":" in ip:
        return b":".join(safe(part) for part in ip.split(b":"))
    return safe(ip)


def decision_line(deny: bool, pid: int, localhost: bytes | None, localip: bytes, localport: bytes,
                  remotehost: bytes | None, remoteip: bytes, remoteinfo: bytes | None,
                  remoteport: bytes) -> bytes:
    """Return the ``tcpserver: ok|deny PID local remote`` line of -v."""
    return b"".join([
        b"tcpserver: ", b"deny" if deny else b"ok", b" ", safe(b"%d" % pid), b" ",
        safe(localhost) if localhost is not None else b"", b":", safe_ip(localip), b":",
        safe(localport), b" ", safe(remotehost) if remotehost is not None else b"", b":",
        safe_ip(remoteip), b":", safe(remoteinfo) if remoteinfo is not None else b"", b":",
        safe(remoteport)])


def parse_args(argv: list[str]) -> tuple[Config, str, str]:
    """Return the options, host and port of argv; raise Die (usage) if they are wrong."""
    cfg = Config()
    g = Getopt(argv, OPTIONS)
    for opt, val in g:
        v = val or ""
        if opt == "b":
            cfg.backlog = scan_ulong(arg(v))[0]
        elif opt == "c":
            cfg.limit = scan_ulong(arg(v))[0]
        elif opt == "X":
            cfg.allow_norules = True
        elif opt == "x":
            cfg.rules = arg(v)
        elif opt == "B":
            cfg.banner = arg(v)
        elif opt in "dD":
            cfg.delay = opt == "d"
        elif opt == "v":
            cfg.verbosity = VERBOSE
        elif opt == "q":
            cfg.verbosity = QUIET
        elif opt == "Q":
            cfg.verbosity = ERRORS
        elif opt in "pP":
            cfg.paranoid = opt == "p"
        elif opt in "oO":
            cfg.killopts = opt == "O"
        elif opt in "hH":
            cfg.remotehost = opt == "h"
        elif opt in "rR":
            cfg.remoteinfo = opt == "r"
        elif opt == "t":
            cfg.timeout = scan_ulong(arg(v))[0]
        elif opt == "U":
            for name in ("UID", "GID"):
                value = os.environ.get(name)
                if value is not None:
                    n = scan_ulong(arg(value))[0]
                    if name == "UID":
                        cfg.uid = n
                    else:
                        cfg.gid = n
        elif opt == "u":
            cfg.uid = scan_ulong(arg(v))[0]
        elif opt == "g":
            cfg.gid = scan_ulong(arg(v))[0]
        elif opt == "1":
            cfg.print_port = True
        elif opt == "4":
            cfg.v4only, cfg.v6env = True, False
        elif opt == "6":
            cfg.v6env, cfg.v4only = True, False
        elif opt == "l":
            cfg.localname = arg(v)
        elif opt == "I":
            cfg.interface = v
        else:
            raise Die(EXIT_USAGE, USAGE)
    rest = g.operands()
    if len(rest) < 2:
        # After the options, -q silences even the usage message.
        raise Die(EXIT_USAGE, USAGE if cfg.verbosity else None)
    host, port = rest[0], rest[1]
    cfg.argv = rest[2:]
    return cfg, host, port


def port_number(port: str) -> int:
    """Return the port a number or an /etc/services name stands for; raise Die."""
    value, n = scan_ulong(arg(port))
    if n == len(arg(port)):
        return value & 0xFFFF  # C stores it in a uint16
    try:
        return socket.getservbyname(port, "tcp")
    except (OSError, UnicodeError):
        raise Die(EXIT_TEMP, FATAL + b"unable to figure out port number for " + arg(port)) from None


def _ip4_literal(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() and p.isascii() and int(p) < 256 for p in parts)


def _has_ipv6() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def scope_id(interface: str | None) -> int:
    """Return the index of interface (0 for none or an unknown name, as the patch's socket_bind6)."""
    if not interface:
        return 0
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        return 0


def local_address(host: str, cfg: Config) -> tuple[int, str]:
    """Return (family, address) to bind for host; raise Die if it has none."""
    if host in ("", "0"):
        # ucspi-tcp-ipv6: both families on "::" unless -4 or IPv6 is off.
        return (socket.AF_INET, "0.0.0.0") if cfg.v4only or not _has_ipv6() else (socket.AF_INET6, "::")
    if _ip4_literal(host):
        return socket.AF_INET, host
    if ":" in host:
        try:
            socket.inet_pton(socket.AF_INET6, host)
            return socket.AF_INET6, host
        except OSError:
            pass  # not an IPv6 literal: resolved as a name below
    family = socket.AF_UNSPEC if cfg.v6env else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno == socket.EAI_AGAIN:
            raise Die(EXIT_TEMP, FATAL + b"temporarily unable to figure out IP address for "
                      + arg(host) + b": temporary failure") from e
        raise Die(EXIT_TEMP, FATAL + b"no IP address for " + arg(host)) from e
    except (OSError, UnicodeError) as e:
        raise Die(EXIT_TEMP, FATAL + b"no IP address for " + arg(host)) from e
    if cfg.v6env:
        infos.sort(key=lambda i: i[0] != socket.AF_INET6)
    if not infos:
        raise Die(EXIT_TEMP, FATAL + b"no IP address for " + arg(host))
    return infos[0][0], str(infos[0][4][0])


def listen(host: str, port: int, cfg: Config) -> socket.socket:
    """Bind and listen as tcpserver does before dropping privileges; raise Die."""
    family, address = local_address(host, cfg)
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise Die(EXIT_TEMP, FATAL + b"unable to create socket: " + describe(e)) from e
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address == "::":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if family == socket.AF_INET6:
            s.bind((address, port, 0, scope_id(cfg.interface)))
        else:
            s.bind((address, port))
    except OSError as e:
        s.close()
        raise Die(EXIT_TEMP, FATAL + b"unable to bind: " + describe(e)) from e
    try:
        s.listen(min(cfg.backlog, 0x7FFFFFFF))
    except OSError as e:
        s.close()
        raise Die(EXIT_TEMP, FATAL + b"unable to listen: " + describe(e)) from e
    s.setblocking(False)  # the loop accepts only when select says so; a vanished client is EAGAIN
    return s


def set_ids(cfg: Config) -> None:
    """Switch group then user as ucspi-tcp's prot_gid/prot_uid do; raise Die.

    Not privs.drop: each id changes only when given (-g without -u keeps the
    uid), and each failure has its own message.
    """
    if cfg.gid:
        try:
            os.setgroups([cfg.gid])
            os.setgid(cfg.gid)
        except (OSError, OverflowError) as e:
            raise Die(EXIT_TEMP, FATAL + b"unable to set gid: "
                      + (describe(e) if isinstance(e, OSError) else b"invalid argument")) from e
    if cfg.uid:
        try:
            os.setuid(cfg.uid)
        except (OSError, OverflowError) as e:
            raise Die(EXIT_TEMP, FATAL + b"unable to set uid: "
                      + (describe(e) if isinstance(e, OSError) else b"invalid argument")) from e


def preload(argv: list[str]) -> None:
    """Import, in the parent, the modules of the pyqmail programs argv names, so no child pays for them.

    $QMAILQUEUE's program counts too (a filter such as qmail-dkim, which
    every message of every connection starts). A module that defines
    ``preload()`` (rblsmtpd: its DNS library) has it called too. A module
    that fails to import here is left to the child, which reports the
    failure as exec would.
    """
    # A module's warm-up may chdir (qmail-smtpd's sessions go to the home): children start in
    # tcpserver's own directory, where the run script put it and relative program names point.
    try:
        here = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        here = -1
    try:
        _preload(argv)
    finally:
        if here != -1:
            try:
                os.fchdir(here)
            except OSError:
                pass  # safe: not searchable by -u's user; as before, children start where preload left
            os.close(here)


def _preload(argv: list[str]) -> None:
    path = os.environ.get("PATH")
    for word in [*argv, os.environ.get("QMAILQUEUE", "")]:
        if not word:
            continue
        try:
            stub = spawn.read_stub(pathexec.target(word, path))
        except OSError:
            continue
        if stub is None:
            continue
        try:
            __import__("pyqmail.home")  # what spawn.become imports to run any stub
            mod = __import__(stub.module, fromlist=["main"])
            hook = getattr(mod, "preload", None)
            if callable(hook):
                hook()
        except Exception:  # noqa: BLE001 - the child imports again and reports
            continue


class Connection:
    """What the child knows of its connection, for the environment and the log."""

    __slots__ = ("localip", "localport", "localhost", "remoteip", "remoteport", "remotehost",
                 "remoteinfo", "proto")

    def __init__(self) -> None:
        self.localip = b""
        self.localport = b""
        self.localhost: bytes | None = None
        self.remoteip = b""
        self.remoteport = b""
        self.remotehost: bytes | None = None
        self.remoteinfo: bytes | None = None
        self.proto = b"TCP"


def setenv(name: bytes, value: bytes | None) -> None:
    """Set (or, for None, remove) a variable of this process's environment.

    What os.environ's item assignment does, without its Python-level codec
    calls: the forked child pays for every page of cold code it runs.
    """
    if value is None:
        if name in _ENVIRON:
            os.unsetenv(name)
            del _ENVIRON[name]
    else:
        os.putenv(name, value)
        _ENVIRON[name] = value


def learn(conn: _socket.socket, peer: tuple[str, int], cfg: Config,
          setenv: Callable[[bytes, bytes | None], None]) -> tuple[bool, Connection]:
    """Do tcpserver's per-connection work up to the decision; return (deny, what was learned).

    Raise Die (dropping the connection) on a banner, address or rules failure.
    """
    c = Connection()
    pid = os.getpid()
    remote_host = peer[0]
    v6 = cfg.v6env or (":" in netinfo.ip_text(remote_host))
    c.proto = b"TCP6" if v6 else b"TCP"
    c.remoteip = netinfo.ip_text(remote_host, cfg.v6env).encode()
    status(cfg, b"tcpserver: pid %d from %s" % (pid, c.remoteip))
    if cfg.killopts and not v6:  # an IPv4 connection (AF_INET, or mapped on a dual-stack socket)
        try:
            conn.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"")
        except OSError:
            pass  # socket_ipoptionskill's result is not checked either
    if not cfg.delay:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # as socket_tcpnodelay's
    if cfg.banner:
        try:
            conn.sendall(cfg.banner)
        except OSError as e:
            raise Die(EXIT_TEMP, DROP + b"unable to print banner: " + describe(e)) from e
    try:
        local = conn.getsockname()
    except OSError as e:
        raise Die(EXIT_TEMP, DROP + b"unable to get local address: " + describe(e)) from e
    local_ip = netinfo.ip_text(str(local[0]), cfg.v6env)
    c.localip = local_ip.encode()
    c.localport = b"%d" % local[1]
    c.remoteport = b"%d" % peer[1]
    c.localhost = cfg.localname if cfg.localname is not None else netinfo.ptr_env(local_ip)

    setenv(b"PROTO", c.proto)
    setenv(b"TCPLOCALIP", c.localip)
    setenv(b"TCPLOCALPORT", c.localport)
    setenv(b"TCPLOCALHOST", c.localhost)
    if cfg.remotehost:
        remote_ip = c.remoteip.decode()
        name = netinfo.ptr_env(remote_ip)
        if name is not None and (not cfg.paranoid or netinfo.paranoid_ok(remote_ip, os.fsdecode(name))):
            c.remotehost = name
    setenv(b"TCPREMOTEIP", c.remoteip)
    setenv(b"TCPREMOTEPORT", c.remoteport)
    setenv(b"TCPREMOTEHOST", c.remotehost)
    if cfg.remoteinfo:
        info = ident.remoteinfo((netinfo.ip_text(remote_host), peer[1]),
                                (netinfo.ip_text(str(local[0])), local[1]), cfg.timeout)
        # A C string: the environment and the log stop at a NUL.
        c.remoteinfo = None if info is None else info.split(b"\0", 1)[0]
    setenv(b"TCPREMOTEINFO", c.remoteinfo)
    if v6:
        set_tcp6(c, local, setenv)
    deny = False
    if cfg.rules is not None:
        deny = follow_rules(cfg, c, setenv)
    if cfg.verbosity >= VERBOSE:
        status(cfg, decision_line(deny, pid, c.localhost, c.localip, c.localport, c.remotehost,
                                  c.remoteip, c.remoteinfo, c.remoteport))
    return deny, c


def set_tcp6(c: Connection, local: tuple[object, ...],
             setenv: Callable[[bytes, bytes | None], None]) -> None:
    """Set ucspi-tcp-ipv6's TCP6* copies of a TCP6 connection's variables."""
    setenv(b"TCP6LOCALIP", c.localip)
    setenv(b"TCP6LOCALPORT", c.localport)
    setenv(b"TCP6LOCALHOST", c.localhost)
    setenv(b"TCP6REMOTEIP", c.remoteip)
    setenv(b"TCP6REMOTEPORT", c.remoteport)
    setenv(b"TCP6REMOTEHOST", c.remotehost)
    setenv(b"TCP6REMOTEINFO", c.remoteinfo)
    interface = None
    scope = local[3] if len(local) > 3 else 0
    if isinstance(scope, int) and scope:
        try:
            interface = socket.if_indextoname(scope).encode()
        except OSError:
            interface = None
    setenv(b"TCP6INTERFACE", interface)


def follow_rules(cfg: Config, c: Connection, setenv: Callable[[bytes, bytes | None], None]) -> bool:
    """Apply the -x rules to env; return True for deny; raise Die if they cannot be read."""
    assert cfg.rules is not None
    drop = DROP + b"unable to read " + cfg.rules + b": "
    try:
        reader = rules.open_cdb(cfg.rules)
    except OSError as e:
        if e.errno == errno.ENOENT and cfg.allow_norules:
            return False
        raise Die(EXIT_TEMP, drop + describe(e)) from e
    try:
        found = rules.find(reader, c.remoteip, c.remotehost, c.remoteinfo)
    except (OSError, cdb.CDBError) as e:
        raise Die(EXIT_TEMP, drop + describe(e)) from e
    finally:
        reader.close()
    if found is None:
        return False
    deny, variables = rules.decide(found[1])
    for name, value in variables:
        if name:  # an empty name cannot be passed through a Python environment
            setenv(name, value)
    return deny


def child(conn: _socket.socket, peer: tuple[str, int], cfg: Config) -> NoReturn:
    """Serve one connection in the forked child: decide, then become the program."""
    code = EXIT_TEMP
    try:
        # The child's own environment becomes the program's: no copy to build.
        deny, _ = learn(conn, peer, cfg, setenv)
        if deny:
            code = EXIT_DENY
        else:
            name = cfg.argv[0]
            try:
                path = _ENVIRON.get(b"PATH")
                target = pathexec.target(name, None if path is None else os.fsdecode(path))
                fd = conn.fileno()
                spawn.become(target, cfg.argv, fds={0: fd, 1: fd, 2: 2})
            except OSError as e:
                raise Die(EXIT_TEMP, DROP + b"unable to run " + arg(name) + b": " + describe(e)) from e
    except Die as d:
        if d.text is not None:
            warn(cfg, d.text)
        code = d.code
    except BaseException as e:  # noqa: BLE001 - the child must never return to the loop
        warn(cfg, DROP + b"internal error: " + type(e).__name__.encode() + b": " + str(e).encode("utf-8", "replace"))
    os._exit(code)


# --- reused workers (issue 17) ------------------------------------------------------------------

REUSE_ENV = "PYQMAIL_TCPSERVER_REUSE"  # connections one worker serves; 0 or 1: a child per connection
IDLE_ENV = "PYQMAIL_TCPSERVER_IDLE"  # seconds an idle worker is kept
REUSE_MAX = 100  # as Postfix's max_use: a worker's leftovers (heap, caches) are bounded in time
IDLE_MAX = 60.0
GROWTH_MAX = 32 << 20  # bytes of resident memory a worker may gain over its start before it retires
END = b"E"  # worker -> parent: the connection has ended; 4 bytes of wait status follow
RETIRE = b"R"  # the same, and the worker takes no more (its uses, a leftover descriptor, its memory)
PEER_MAX = 512
SESSIONS_ENV = "PYQMAIL_TCPSERVER_SESSIONS"  # connections one worker serves at once (1: one after another)
SPREAD_ENV = "PYQMAIL_TCPSERVER_SPREAD"  # workers each given a connection before any gets a second
SESSIONS_MAX = 32


def _setting(name: str, default: Number, least: Number) -> Number:
    """Return $name as a number of default's type, at least least; default if unset or malformed.

    The admin's (and the tests') seam for the workers' limits.
    """
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = type(default)(value)
    except ValueError:
        return default
    return max(number, least)


def _rss() -> int:
    """Return this process's resident memory in bytes (0 if /proc cannot say)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _encode_peer(peer: tuple[str, int]) -> bytes:
    return peer[0].encode() + b"\0" + b"%d" % peer[1]


def _decode_peer(data: bytes) -> tuple[str, int]:
    host, _, port = data.partition(b"\0")
    return host.decode(), int(port)


class Worker:
    """The parent's view of one worker: its pid, its end of the pair, how many connections it serves."""

    __slots__ = ("pid", "sock", "fd", "sessions", "retiring", "since")

    def __init__(self, pid: int, sock: _socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self.fd = sock.fileno()
        self.sessions = 1
        self.retiring = False
        self.since = 0.0


class Reuse:
    """One worker's life: serve the connection it was forked with, then each one the parent sends.

    Every connection finds what a new child would: descriptors 0 and 1 on the
    socket, 2 the log, no other but the pair to the parent (close-on-exec);
    tcpserver's own environment plus this connection's variables; the
    starting directory and umask; signals as a new process has them (spawn.call).
    After the program returns, its exit code goes to the parent as the wait
    status a child's exit would have given; a descriptor left open, memory
    grown past GROWTH_MAX or the last of its uses retire the worker.
    """

    def __init__(self, cfg: Config, sock: _socket.socket, uses: int, at_once: int = 1) -> None:
        self.cfg = cfg
        self.sock = sock
        self.uses = uses
        self.at_once = at_once
        self.served = 0
        self.retiring = False
        self.hub: Hub
        self.environ = dict(_ENVIRON)
        try:
            self.cwd: str | None = os.getcwd()
        except OSError:
            self.cwd = None  # removed (or unreachable): the first connection runs there; no second
        self.umask = os.umask(0o22)
        os.umask(self.umask)
        self.rss = 0
        self.null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    def run(self, conn: _socket.socket, peer: tuple[str, int]) -> NoReturn:
        import gc

        # The parent's objects stay where the fork left them: the collector no longer walks them.
        gc.freeze()
        self.rss = _rss()
        if self.at_once > 1:
            self.run_many(conn, peer)
        served = 0
        while True:
            wstat = self.serve(conn, peer) << 8
            served += 1
            try:
                conn, peer = self.between(conn, wstat, served)
            except KeyboardInterrupt:  # SIGINT between connections: gone quietly, no connection to drop
                os._exit(0)

    def between(self, conn: _socket.socket, wstat: int, served: int) -> tuple[_socket.socket, tuple[str, int]]:
        """Report a connection's end, close it and wait for the next one; exit when retiring or let go."""
        retire = (served >= self.uses or not self.tidy(conn.fileno()) or _rss() - self.rss > GROWTH_MAX
                  or not self.back())
        try:
            # Reported before the client sees the end: a client that connects again at
            # once (smtp-source, a sender's next message) finds this worker idle.
            self.sock.send((RETIRE if retire else END) + wstat.to_bytes(4, "little"))
        except OSError:
            os._exit(0)  # the parent is gone
        if retire:
            os._exit(0)
        # The client sees the end now, as when a child exits.
        conn.close()
        os.dup2(self.null, 0)
        os.dup2(self.null, 1)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(PEER_MAX, _socket.CMSG_SPACE(4))
        except OSError:
            os._exit(0)
        fds = workers.received_fds(ancillary)
        if not data or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            os._exit(0)  # the parent closed the pair: retired, or gone
        return _socket.socket(fileno=fds[0]), _decode_peer(data)

    def serve(self, conn: _socket.socket, peer: tuple[str, int]) -> int:
        """Serve one connection; return the program's exit code (tcpserver's own on a drop)."""

        def body() -> int:
            spawn.restore_environb(self.environ)
            conn.setblocking(True)
            deny, _ = learn(conn, peer, self.cfg, setenv)
            if deny:
                return EXIT_DENY
            fd = conn.fileno()
            os.dup2(fd, 0)
            os.dup2(fd, 1)
            conn.close()
            return self.call_program(alone=True)

        return self.guarded(body)

    def guarded(self, body: Callable[[], int]) -> int:
        """Run body, one connection's serving; a Die or an exception ends that connection as a child's end would."""
        code = EXIT_TEMP
        try:
            code = body()
        except Die as d:
            if d.text is not None:
                warn(self.cfg, d.text)
            code = d.code
        except Exception as e:  # noqa: BLE001 - the worker goes on; the connection ends as a child's would
            warn(self.cfg, DROP + b"internal error: " + type(e).__name__.encode() + b": "
                 + str(e).encode("utf-8", "replace"))
        except BaseException:  # noqa: BLE001 - KeyboardInterrupt, SystemExit: as a child, it ends
            os._exit(code)
        return code

    def call_program(self, alone: bool) -> int:
        """Run the program (its socket on 0 and 1) and return its exit code; Die if it cannot be run.

        A program that is no longer reusable (replaced while tcpserver runs) is exec'd when
        the connection is alone in this worker, and refused in a worker serving several.
        """
        name = self.cfg.argv[0]
        try:
            path = _ENVIRON.get(b"PATH")
            target = pathexec.target(name, None if path is None else os.fsdecode(path))
            rc = spawn.call(target, self.cfg.argv)
            if rc is None:
                if alone:  # the old way, once
                    spawn.become(target, self.cfg.argv, fds={0: 0, 1: 1, 2: 2})
                raise Die(EXIT_TEMP, DROP + b"unable to run " + arg(name) + b": no longer a reusable program")
        except OSError as e:
            raise Die(EXIT_TEMP, DROP + b"unable to run " + arg(name) + b": " + describe(e)) from e
        return rc

    # -- several connections at once (pyqmail.ucspi.hub) ------------------------------

    def run_many(self, conn: _socket.socket, peer: tuple[str, int]) -> NoReturn:
        """Serve conn and every connection the parent sends, side by side, until the parent closes the pair.

        Each connection is a session of the hub: the program's main in a greenlet,
        switched only where it waits (pyqmail.wait). A worker that retires (its uses,
        a leftover descriptor, its growth) says so with its connection's end and takes
        no more; it exits once its last connection is over and the parent has closed
        the pair, or at once when the parent is gone.
        """
        from pyqmail import wait
        from pyqmail.ucspi.hub import Hub

        h = self.hub = Hub(self.null)
        wait.hub = h

        def interrupted(_signum: int, _frame: object) -> None:
            # SIGINT (a ^C where tcpserver runs in a terminal) ends the worker and with it every
            # connection it holds, as it ends each child of C tcpserver: wherever it lands, not
            # only in the poll (in a session, the program's crash shim would end that one only).
            os._exit(EXIT_TEMP if h.sessions else 0)

        h.sigint = interrupted
        sig.signal(sig.SIGINT, interrupted)
        pair = self.sock.fileno()
        h.poller.register(pair, select.POLLIN)
        closed = False
        self.begin(conn, peer)
        while True:
            try:
                for _fd, _ in h.poll(h.timeout_ms()):  # only the pair is the worker's own
                    if not closed and not self.receive():
                        closed = True
                        h.poller.unregister(pair)
            except KeyboardInterrupt:  # SIGINT: as children die of it (quietly when no connection is here)
                os._exit(EXIT_TEMP if h.sessions else 0)
            if closed and not h.sessions:
                os._exit(0)

    def receive(self) -> bool:
        """Start a session for each connection the parent has sent; False once the pair is closed."""
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(PEER_MAX, _socket.CMSG_SPACE(4), _socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            fds = workers.received_fds(ancillary)
            if not data or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                return False  # closed: retired, let go, or the parent is gone
            self.begin(_socket.socket(fileno=fds[0]), _decode_peer(data))

    def begin(self, conn: _socket.socket, peer: tuple[str, int]) -> None:
        """Start conn's session; the hub owns its descriptor from here on."""
        fd = conn.detach()
        self.hub.start(fd, self.environ, lambda: self.serve_session(fd, peer), self.session_ended)

    def serve_session(self, fd: int, peer: tuple[str, int]) -> int:
        """Serve one connection in a session (its socket already on 0 and 1); return the exit code."""

        def body() -> int:
            conn = _socket.socket(fileno=fd)
            try:
                conn.setblocking(True)
                deny, _ = learn(conn, peer, self.cfg, setenv)
            finally:
                conn.detach()
            return EXIT_DENY if deny else self.call_program(alone=False)

        return self.guarded(body)

    def session_ended(self, s: Session) -> None:
        """Report a session's end (its socket still open); retire when this worker should take no more."""
        self.served += 1
        if not self.retiring:
            last = not self.hub.sessions
            self.retiring = (self.served >= self.uses or _rss() - self.rss > GROWTH_MAX
                             or (last and not (self.tidy(s.fd) and self.back())))
        try:
            self.sock.send((RETIRE if self.retiring else END) + (s.code << 8).to_bytes(4, "little"))
        except OSError:
            pass  # the parent is gone: the other sessions go on, as children outlive tcpserver

    def back(self) -> bool:
        """Go back to tcpserver's directory and umask for the next connection; False if the directory is gone.

        A child would start in it even when removed, or not searchable by -u's user
        once left: a worker that cannot go back retires (the next connection gets a new one).
        """
        os.umask(self.umask)
        if self.cwd is None:
            return False
        try:
            os.chdir(self.cwd)
        except OSError:
            return False
        return True

    def tidy(self, conn: int) -> bool:
        """Whether the session left no descriptor open, once its garbage is collected if need be.

        Objects in reference cycles outlive the session until the collector runs (sqlite3's
        connection is one: greylisting's file stayed open, and every worker retired after
        one connection). A child's exit closes them; here one collection does.
        """
        if self.clean(conn):
            return True
        import gc

        gc.collect()
        return self.clean(conn)

    def clean(self, conn: int) -> bool:
        """Whether the program left no descriptor open beyond 0, 1 and conn (the connection), 2, the pair, /dev/null."""
        fds = workers.open_fds()
        return fds is None or fds <= {0, 1, 2, conn, self.sock.fileno(), self.null}


class Server:
    """The accept loop: at most limit children, reaped on SIGCHLD.

    With reuse (a REUSABLE program and uses > 1), a child is a worker that
    serves one connection after another (Reuse): an accepted connection goes
    to an idle worker through its socket pair (SCM_RIGHTS), or to a new worker
    forked for it when none is idle. Workers report each connection's end;
    idle ones are let go (their pair closed) after idle seconds.
    """

    def __init__(self, cfg: Config, listener: socket.socket, uses: int = 0, idle: float = IDLE_MAX,
                 clock: Callable[[], float] | None = None, at_once: int = 1, spread: int = 1) -> None:
        self.cfg = cfg
        self.listener = listener
        self.children = 0
        # select.poll, not selectors: its select() is Python code run at every wake-up, and
        # after each fork every page the parent writes is a copy while children share it.
        self.poller = select.poll()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.accepting = False
        # accept() of socket.py wraps each connection in a socket.socket, converting the
        # family and type to enums in Python (pages written at every connection, as
        # above). The C level takes ints.
        self.family = int(listener.family)
        self.uses = uses
        self.idle_max = idle
        self.at_once = at_once if uses > 1 else 1
        self.spread = spread
        if clock is None:
            import time

            clock = time.monotonic
        self.clock = clock
        self.pool: dict[int, Worker] = {}  # by pid
        self.by_fd: dict[int, Worker] = {}
        self.idle: list[Worker] = []  # the most recently used last: it is the warmest

    def print_status(self) -> None:
        status(self.cfg, b"tcpserver: status: %d/%d" % (self.children, self.cfg.limit))

    def ended(self, pid: int, wstat: int) -> None:
        """Log a connection's end as tcpserver's sigchld does, and count it."""
        status(self.cfg, b"tcpserver: end %d status %d" % (pid, wstat))
        if self.children:
            self.children -= 1
        self.print_status()

    def reap(self) -> None:
        """Collect every finished child, logging each as tcpserver's sigchld does."""
        for pid, wstat in workers.reaped():
            w = self.pool.pop(pid, None)
            if w is None:
                self.ended(pid, wstat)
                continue
            if w.sessions and w.sock.fileno() != -1:
                self.hear(w)  # its last reports, if it sent them before exiting
            self.drop(w)
            for _ in range(w.sessions):  # died inside connections: they end with the worker
                self.ended(pid, wstat)
            w.sessions = 0

    def drop(self, w: Worker) -> None:
        """Let a worker go: its pair closed (an idle one exits on that).

        It stays in the pool until reaped: its exit is not a connection's end
        (a pid missing from the pool would be logged and counted as one).
        """
        w.retiring = True
        # Only if the number is still its own: once its pair is closed, a newer
        # worker's pair may have the same descriptor number.
        if self.by_fd.get(w.fd) is w:
            del self.by_fd[w.fd]
            self.poller.unregister(w.fd)
        if w in self.idle:
            self.idle.remove(w)
        w.sock.close()

    def hear(self, w: Worker) -> None:
        """Read a busy worker's reports of its connections' ends, as many as there are."""
        while w.sessions:
            try:
                data = w.sock.recv(16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if len(data) != 5 or data[:1] not in (END, RETIRE):
                if not data:
                    w.retiring = True  # gone: reap() says how, and ends its connections
                    if w in self.idle:
                        self.idle.remove(w)
                    if self.by_fd.get(w.fd) is w:
                        self.poller.unregister(w.fd)
                        del self.by_fd[w.fd]
                return
            w.sessions -= 1
            self.ended(w.pid, int.from_bytes(data[1:], "little"))
            if data[:1] == RETIRE:
                w.retiring = True
            if w.retiring:
                if not w.sessions:
                    # Its last connection is over: the pair closed, it exits (one serving a
                    # connection at a time has exited already).
                    self.drop(w)
            elif not w.sessions:
                w.since = self.clock()
                self.idle.append(w)

    def accept_one(self) -> bool:
        """Accept a connection, if one is still there, and fork its child (or hand it to a worker).

        Return False when none was waiting (or accept failed): the loop polls again.
        """
        try:
            fd, peer = self.listener._accept()  # type: ignore[attr-defined]
        except ConnectionAbortedError:
            return True  # that one is gone; the next may be there
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False  # as socket_accept4 failing: tcpserver just tries again
        conn = _socket.socket(self.family, _socket.SOCK_STREAM, 0, fd)
        try:
            self.children += 1
            self.print_status()
            if self.uses > 1:
                if not self.hand_over(conn, peer):
                    self.fork_worker(conn, peer)
                return True
            conn.setblocking(True)
            try:
                pid = os.fork()
            except OSError as e:
                warn(self.cfg, DROP + b"unable to fork: " + describe(e))
                self.children -= 1
                self.print_status()
                return False
            if pid == 0:
                self.in_child()
                child(conn, peer, self.cfg)
        finally:
            conn.close()
        return True

    def pick(self) -> Worker | None:
        """The worker for a new connection; None when a new one should be forked.

        An idle worker first (the most recently used: it is the warmest). Workers
        serving one connection at a time take no other. Otherwise connections are
        spread: a new worker while fewer than spread serve; then the worker with the
        fewest connections that has room for one more. An idle connection then
        costs a session inside a worker, not a process; a busy one shares its
        worker with few others.
        """
        if self.idle:
            return self.idle.pop()
        if self.at_once <= 1:
            return None
        best = None
        serving = 0
        for w in self.by_fd.values():
            if w.retiring:
                continue
            serving += 1
            if w.sessions < self.at_once and (best is None or w.sessions < best.sessions):
                best = w
        if serving < self.spread:
            return None
        return best

    def hand_over(self, conn: _socket.socket, peer: tuple[str, int]) -> bool:
        """Give conn to a worker (pick); False when none took it."""
        data = _encode_peer(peer)
        rights = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, conn.fileno().to_bytes(4, sys_byteorder))]
        while True:
            w = self.pick()
            if w is None:
                return False
            try:
                w.sock.sendmsg([data], rights)
            except OSError:
                self.drop(w)  # gone: reap() collects it and ends its connections
                continue
            w.sessions += 1
            return True

    def fork_worker(self, conn: _socket.socket, peer: tuple[str, int]) -> None:
        """Fork a worker that serves conn first."""
        try:
            pid, mine, theirs = workers.fork_pair(
                lambda: _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC))
        except OSError as e:
            warn(self.cfg, DROP + b"unable to fork: " + describe(e))
            self.children -= 1
            self.print_status()
            return
        if pid == 0:
            code = EXIT_TEMP
            try:
                mine.detach()  # the parent's end: closed with the rest below
                keep = {theirs.fileno(), conn.fileno()}
                low = 3
                for fd in sorted(keep):
                    os.closerange(low, fd)
                    low = fd + 1
                os.closerange(low, _MAX_FD)
                sig.set_wakeup_fd(-1)
                sig.signal(sig.SIGTERM, sig.SIG_DFL)
                sig.signal(sig.SIGCHLD, sig.SIG_DFL)
                Reuse(self.cfg, theirs, self.uses, self.at_once).run(conn, peer)
            except BaseException as e:  # noqa: BLE001 - the worker must never return to the loop
                warn(self.cfg, DROP + b"internal error: " + type(e).__name__.encode() + b": "
                     + str(e).encode("utf-8", "replace"))
            os._exit(code)
        theirs.close()
        mine.setblocking(False)
        w = Worker(pid, mine)
        self.pool[pid] = w
        self.by_fd[w.fd] = w
        self.poller.register(w.fd, select.POLLIN)

    def retire_idle(self) -> float | None:
        """Let go of workers idle for idle_max seconds; return seconds until the next one is due."""
        if not self.idle:
            return None
        now = self.clock()
        while self.idle and now - self.idle[0].since >= self.idle_max:
            self.drop(self.idle[0])
        if not self.idle:
            return None
        return self.idle[0].since + self.idle_max - now

    def in_child(self) -> None:
        """Let go of the parent's descriptors in a new child.

        Only the descriptors: the child ends in exec or os._exit, and freeing
        the parent's objects here would copy the pages they sit on.
        """
        for fd in (self.listener.fileno(), self.wake_r, self.wake_w, *self.by_fd):
            os.close(fd)

    def run(self) -> NoReturn:
        """Serve until SIGTERM."""
        sig.signal(sig.SIGTERM, _terminate)
        sig.signal(sig.SIGCHLD, _nothing)
        sig.set_wakeup_fd(self.wake_w)
        self.poller.register(self.wake_r, select.POLLIN)
        listener = self.listener.fileno()
        while True:
            want = self.children < self.cfg.limit
            if want != self.accepting:
                if want:
                    self.poller.register(listener, select.POLLIN)
                else:
                    self.poller.unregister(listener)
                self.accepting = want
            due = self.retire_idle()
            ready = [fd for fd, _ in self.poller.poll(None if due is None else max(int(due * 1000) + 1, 1))]
            if self.wake_r in ready:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except BlockingIOError:
                    pass  # drained
            for fd in ready:
                w = self.by_fd.get(fd)
                if w is not None:
                    if w.sessions:
                        self.hear(w)
                    else:
                        # An idle worker has nothing to say: gone, or confused (a second
                        # report, garbage). Let it go; left registered, poll would spin on it.
                        self.drop(w)
            # Children are reaped before each accept, as C tcpserver's
            # SIGCHLD handler runs the moment accept() waits.
            self.reap()
            # Accept while connections wait and children may start, as C tcpserver goes
            # straight back to accept(): a flood drains the kernel's queue at once
            # instead of one connection per poll, so the backlog (-b) overflows later.
            if listener in ready:
                while self.children < self.cfg.limit and self.accept_one():
                    self.reap()


def _terminate(signum: int, frame: object) -> None:
    os._exit(0)  # tcpserver exits at once on SIGTERM; children go on


def _nothing(signum: int, frame: object) -> None:
    """SIGCHLD only wakes the loop (through the wakeup descriptor)."""


def _quiet_std() -> None:
    """Let go of descriptors 0 and 1 as tcpserver does (its stdout may be a pipe someone waits on)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    if null > 1:
        os.close(null)


@program("tcpserver", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Serve host port with argv's program until SIGTERM; return only on a fatal error."""
    try:
        cfg, host, port_text = parse_args(argv)
    except Die as d:
        return d.report()
    try:
        port = port_number(port_text)
        if not cfg.argv:
            raise Die(EXIT_USAGE, USAGE)
        listener = listen(host, port, cfg)
        set_ids(cfg)
    except Die as d:
        if d.text is not None:
            warn(cfg, d.text)
        return d.code
    preload(cfg.argv)
    if cfg.remotehost or cfg.localname is None:
        netinfo.warm()  # each child looks names up: the resolver's set-up is shared, not redone
    if cfg.print_port:
        try:
            os.write(1, b"%d\n" % listener.getsockname()[1])
        except OSError:
            pass  # buffer_flush's result is not checked either
    _quiet_std()
    uses, idle = _setting(REUSE_ENV, REUSE_MAX, 0), _setting(IDLE_ENV, IDLE_MAX, 0.0)
    if uses > 1:
        try:
            if not spawn.reusable(pathexec.target(cfg.argv[0], os.environ.get("PATH"))):
                uses = 0  # a program that must run in a process of its own (or an exec'd one)
        except OSError:
            uses = 0  # not found now: each child says so, as without reuse
    at_once = _setting(SESSIONS_ENV, SESSIONS_MAX, 1)
    spread = _setting(SPREAD_ENV, max(os.cpu_count() or 1, 2), 1)
    server = Server(cfg, listener, uses, idle, at_once=at_once, spread=spread)
    server.print_status()
    server.run()
