"""`qmail up` and `qmail down`: run a whole installation under one small supervisor.

`qmail up` creates the home if it is missing (`qmail init`), the invoking
user's ~/Maildir/ in a single-user installation, then starts and watches the
services the installation has: qmail-queued (root mode: local users'
injection), qmail-start with `./Maildir/` as default delivery. A service that
dies is restarted after a second. SIGINT or SIGTERM (which `qmail down`
sends) stops them all with TERM, so that qmail-send lets running deliveries
finish, and waits for them.
"""

from __future__ import annotations

import os
import pwd
import signal
import sys
import time
from typing import TextIO

from pyqmail import home as _home
from pyqmail import spawn

PIDFILE = "run/up.pid"
LOOPBACK_FQDN = "localhost.localdomain"
LOGDIR = "log"
RESTART_DELAY = 1.0
STOP_TIMEOUT = 120.0


class _Stop(Exception):
    """SIGINT or SIGTERM arrived: stop the services."""


class Service:
    """One supervised program."""

    def __init__(self, name: str, argv: list[str], log: str) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.pid = 0
        self.started = 0.0
        self.restarts = 0

    def start(self, qmail_home: str, env: dict[str, str], out: TextIO) -> None:
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # qmail-start without a logger gives qmail-send's activity record
            # the descriptors it was started with: both go to the log file.
            self.pid = spawn.spawn(self.argv[0], self.argv, env=env, fds={0: null, 1: fd, 2: fd},
                                   cwd=qmail_home)
        finally:
            os.close(fd)
            os.close(null)
        self.started = time.monotonic()
        print(f"qmail up: {self.name} started, pid {self.pid}, log {self.log}", file=out, flush=True)


class Ports:
    """Where `qmail up` listens: SMTP, QMTP (0 = do not run that service)."""

    __slots__ = ("host", "smtp", "qmtp")

    def __init__(self, host: str, smtp: int, qmtp: int) -> None:
        self.host = host
        self.smtp = smtp
        self.qmtp = qmtp


def default_ports() -> Ports:
    """Root: qmail's ports on every address; otherwise loopback and unprivileged ports."""
    if os.geteuid() == 0:
        return Ports("0", 25, 209)
    return Ports("127.0.0.1", 2525, 2209)


def _tcpserver(qmail_home: str, inst: _home.Install, host: str, port: int, program: list[str]) -> list[str]:
    bindir = os.path.join(qmail_home, "bin")
    argv = [os.path.join(bindir, "tcpserver"), "-v", "-R", "-c", "40"]
    if not inst.single:
        qmaild = inst.users["qmaild"]
        argv += ["-u", str(qmaild.uid), "-g", str(qmaild.gid)]
    rules = os.path.join(qmail_home, "control", "tcp.smtp.cdb")
    if os.path.exists(rules):
        argv += ["-x", rules]
    return argv + [host, str(port), *program]


def _services(qmail_home: str, inst: _home.Install, ports: Ports) -> list[Service]:
    bindir = os.path.join(qmail_home, "bin")
    logdir = os.path.join(qmail_home, LOGDIR)
    services = []
    # In root mode qmail-start also starts qmail-queued (local injection).
    services.append(Service("qmail-send", [os.path.join(bindir, "qmail-start"), "./Maildir/"],
                            os.path.join(logdir, "qmail-send.log")))
    if ports.smtp:
        services.append(Service(f"qmail-smtpd on {ports.host}:{ports.smtp}",
                                _tcpserver(qmail_home, inst, ports.host, ports.smtp,
                                           [os.path.join(bindir, "qmail-smtpd")]),
                                os.path.join(logdir, "qmail-smtpd.log")))
    if ports.qmtp:
        services.append(Service(f"qmail-qmtpd on {ports.host}:{ports.qmtp}",
                                _tcpserver(qmail_home, inst, ports.host, ports.qmtp,
                                           [os.path.join(bindir, "qmail-qmtpd")]),
                                os.path.join(logdir, "qmail-qmtpd.log")))
    return services


def _maildir(path: str) -> None:
    for sub in ("", "tmp", "new", "cur"):
        try:
            os.mkdir(os.path.join(path, sub), 0o700)
        except FileExistsError:
            pass


def up(qmail_home: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr, ports: Ports | None = None) -> int:
    """Run the installation in qmail_home until SIGINT/SIGTERM; return the exit code."""
    ports = ports or default_ports()
    if not os.path.isdir(os.path.join(qmail_home, "queue")):
        from pyqmail.admin import install

        import io

        try:
            fqdn = install.find_fqdn(io.StringIO())
        except install.InstallError:
            fqdn = ""
        if "." not in fqdn:
            # qmail-inject appends defaultdomain to a host without a dot, so
            # a bare "localhost" would turn user into user@localhost.localhost.
            fqdn = LOOPBACK_FQDN
        opts = install.Options(home=qmail_home, fqdn=fqdn, single_user=os.geteuid() != 0,
                               create_users=os.geteuid() == 0)
        rc = install.init(opts, out, err)
        if rc != 0:
            return rc
        # A system on loopback also takes mail for user@localhost.
        for name in ("locals", "rcpthosts"):
            with open(os.path.join(qmail_home, "control", name), "a", encoding="latin-1") as f:
                f.write("localhost\n")
    _home.set_default(qmail_home)
    inst = _home.install()
    os.makedirs(os.path.join(qmail_home, LOGDIR), exist_ok=True)
    pidfile = os.path.join(qmail_home, PIDFILE)
    try:
        with open(pidfile) as f:
            other = int(f.read().strip() or "0")
        if other and other != os.getpid():
            try:
                os.kill(other, 0)
            except ProcessLookupError:
                pass
            else:
                print(f"qmail up: fatal: already running in {qmail_home} (pid {other}); "
                      f"stop it with: qmail down --home {qmail_home}", file=err)
                return 111
    except (FileNotFoundError, ValueError):
        pass
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()}\n")

    pw = pwd.getpwuid(os.getuid())
    user = pw.pw_name
    with open(os.path.join(qmail_home, "control", "me"), encoding="latin-1") as f:
        me = f.read().strip()
    if inst.single:
        # Where qmail-lspawn will deliver: the passwd home, not $HOME.
        maildir = os.path.join(pw.pw_dir, "Maildir")
        _maildir(maildir)
    else:
        # As root, mail for postmaster, root and mailer-daemon goes to the
        # alias user's default delivery.
        user = "postmaster"
        alias = inst.users["alias"]
        maildir = os.path.join(alias.home, "Maildir")
        _maildir(maildir)
        for sub in ("", "tmp", "new", "cur"):
            os.chown(os.path.join(maildir, sub), alias.uid, alias.gid)
    env = {"PATH": f"{qmail_home}/bin:/usr/local/bin:/usr/bin:/bin"}
    services = _services(qmail_home, inst, ports)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            # Python retries an interrupted waitpid after the handler; an
            # exception is what ends the wait.
            raise _Stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        for s in services:
            s.start(qmail_home, env, out)
        print(f"qmail up: running in {qmail_home} ({'single-user' if inst.single else 'root'} mode)", file=out)
        print(f"qmail up: mail to {user}@{me} is delivered to {maildir}/", file=out)
        print(f"qmail up: send one with: echo 'Subject: hello' | {qmail_home}/bin/qmail-inject {user}", file=out)
        if ports.smtp:
            print(f"qmail up: or over SMTP: swaks --server {'127.0.0.1' if ports.host == '0' else ports.host}"
                  f" --port {ports.smtp} --to {user}@{me}", file=out)
        print(f"qmail up: stop with Ctrl-C or: qmail down --home {qmail_home}", file=out, flush=True)
        while not stopping:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(RESTART_DELAY)
                continue
            for s in services:
                if s.pid == pid and not stopping:
                    code = spawn.exit_code(status)
                    print(f"qmail up: {s.name} exited ({code}); restarting", file=out, flush=True)
                    time.sleep(RESTART_DELAY)
                    s.restarts += 1
                    if not stopping:
                        s.start(qmail_home, env, out)
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for s in reversed(services):
            if s.pid:
                try:
                    os.kill(s.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for s in services:
            while s.pid and time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(s.pid, os.WNOHANG)
                except ChildProcessError:
                    break
                if done:
                    break
                time.sleep(0.05)
        try:
            os.unlink(pidfile)
        except FileNotFoundError:
            pass
        print("qmail up: stopped", file=out, flush=True)
    return 0


def down(qmail_home: str, err: TextIO = sys.stderr) -> int:
    """Stop the `qmail up` running for qmail_home; return 0, or 111 if none runs."""
    try:
        with open(os.path.join(qmail_home, PIDFILE)) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGTERM)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        print(f"qmail down: nothing runs in {qmail_home}", file=err)
        return 111
    # `qmail up` removes its pid file when everything has stopped (its parent
    # may not have reaped it yet, so the pid alone says nothing).
    pidfile = os.path.join(qmail_home, PIDFILE)
    for _ in range(int(STOP_TIMEOUT * 10)):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        if not os.path.exists(pidfile):
            return 0
        time.sleep(0.1)
    print(f"qmail down: pid {pid} still running after {STOP_TIMEOUT:.0f} s", file=err)
    return 111
