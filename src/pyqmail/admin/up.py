"""`qmail up` and `qmail down`: run a whole installation under daemontools-style supervision.

`qmail up` creates the home if it is missing (`qmail init`), the invoking
user's ~/Maildir/ in a single-user installation, then writes one service
directory per program into QMAILHOME/service/ (qmail-send through
qmail-start; tcpserver with qmail-smtpd, qmail-popup and qmail-qmtpd), each
with a multilog log service writing QMAILHOME/log/NAME/, and runs svscan on
them. SIGINT or SIGTERM (which `qmail down` sends) stops svscan, then every
service with `svc -dx` (qmail-send lets running deliveries finish), then the
log services once their services are gone, so the logs keep the last lines.
"""

from __future__ import annotations

import errno
import os
import pwd
import signal
import sys
import time
from typing import TextIO

from pyqmail import home as _home
from pyqmail import spawn

PIDFILE = "run/up.pid"
SVSCAN_PIDFILE = "run/svscan.pid"
SERVICES = "service"
LOOPBACK_FQDN = "localhost.localdomain"
LOGDIR = "log"
STOP_TIMEOUT = 120.0
POLL = 0.05


class _Stop(Exception):
    """SIGINT or SIGTERM arrived: stop the services."""


class Ports:
    """Where `qmail up` listens: SMTP, POP3, QMTP, SMTPS, POP3S, submission (0 = do not run that service)."""

    __slots__ = ("host", "smtp", "pop3", "qmtp", "smtps", "pop3s", "submission")

    def __init__(self, host: str, smtp: int, qmtp: int, pop3: int = 0, smtps: int = 0, pop3s: int = 0,
                 submission: int = 0) -> None:
        self.host = host
        self.smtp = smtp
        self.pop3 = pop3
        self.qmtp = qmtp
        self.smtps = smtps
        self.pop3s = pop3s
        self.submission = submission


def default_ports() -> Ports:
    """Root: qmail's ports on every address; otherwise loopback and unprivileged ports."""
    if os.geteuid() == 0:
        return Ports("0", 25, 209, 110, 465, 995, 587)
    return Ports("127.0.0.1", 2525, 2209, 2110, 2465, 2995, 2587)


# The environment words a TLS service's argv starts with (env(1)'s NAME=VALUE,
# given to `env -` in the run script): what qmail-smtpd and qmail-popup read.
SMTPS_ENV = "SMTPS=1"  # TLS from the first byte (RFC 8314), port 465
POP3S_ENV = "POP3S=1"  # TLS from the first byte, port 995
FORCETLS_ENV = "FORCETLS=1"  # qmail-popup refuses USER and PASS before STLS
# The submission service (RFC 6409, port 587): STARTTLS, then AUTH required before MAIL
# (the SMTP AUTH patch's $SMTPAUTH grammar: '!' = LOGIN PLAIN, required), never before TLS.
SUBMISSION_ENV = ("SMTPAUTH=!", FORCETLS_ENV)
SMTPS_AUTH_ENV = "SMTPAUTH="  # SMTPS: LOGIN PLAIN offered (TLS from the first byte), not required
# Recipient validation at RCPT (issue 15.2), on in every SMTP service `qmail up` runs:
# unknown local recipients get 550 instead of a bounce later (pyqmail.smtpd.rcptcheck).
RCPTCHECK_ENV = "RCPTCHECK_LOCAL=1"
# SMTPUTF8 (RFC 6531, issue 18.2) offered in every SMTP service `qmail up` runs; a bare
# qmail-smtpd offers it only with control/smtputf8, so that its EHLO stays qmail's.
SMTPUTF8_ENV = "SMTPUTF8=1"
# SIZE (RFC 1870) and CHUNKING (RFC 3030, BDAT) likewise: on in `qmail up`'s services, off
# in a bare qmail-smtpd (control/smtpsize, control/chunking) so that its EHLO stays qmail's.
SMTP_ENV = (RCPTCHECK_ENV, SMTPUTF8_ENV, "SMTPSIZE=1", "CHUNKING=1")
BRTLIMIT_DEFAULT = "10\n"  # control/brtlimit `qmail up` writes when there is none
AUTH_SUBPROGRAM = "/bin/true"  # what checkpassword runs as the user once the login is accepted
SERVERCERT = "control/servercert.pem"  # pyqmail.admin.certs.SERVERCERT, not imported: `qmail up` stays light


def ports_from(args: object) -> Ports:
    """Return the default ports with the --smtp-port ... --pop3s-port options of args applied."""
    ports = default_ports()
    for name in ("smtp", "qmtp", "pop3", "smtps", "pop3s", "submission"):
        value = getattr(args, f"{name}_port", None)
        if value is not None:
            setattr(ports, name, value)
    return ports


def _sh(word: str) -> str:
    """Quote word for a /bin/sh run script."""
    return "'" + word.replace("'", "'\\''") + "'"


def _tcpserver(qmail_home: str, inst: _home.Install, fqdn: str, host: str, port: int,
               program: list[str], as_qmaild: bool) -> list[str]:
    bindir = os.path.join(qmail_home, "bin")
    # The book's run file: -v -R -l "$LOCAL" -x tcp.smtp.cdb -c 40 -u qmaild -g nofiles.
    argv = [os.path.join(bindir, "tcpserver"), "-v", "-R", "-l", fqdn, "-c", "40"]
    if as_qmaild and not inst.single:
        qmaild = inst.users["qmaild"]
        argv += ["-u", str(qmaild.uid), "-g", str(qmaild.gid)]
    rules = os.path.join(qmail_home, "control", "tcp.smtp.cdb")
    if os.path.exists(rules):
        argv += ["-x", rules]
    return argv + [host, str(port), *program]


def services(qmail_home: str, inst: _home.Install, ports: Ports, fqdn: str) -> dict[str, list[str]]:
    """Return {service name: the argv its run script execs} for what `qmail up` runs.

    An argv may start with NAME=VALUE words: that service's environment,
    which the run script gives to env(1). With control/servercert.pem the
    POP3 service refuses passwords before STLS ($FORCETLS) and the SMTPS and
    POP3S services run; without it there is no TLS to offer or require.
    The submission service (and SMTPS) runs qmail-smtpd with checkpassword
    as its checkprogram, so AUTH checks the POP3 users; as root it runs
    as root, as the POP3 service does: checkpassword must read the user
    database and /etc/shadow (docs/DESIGN.md, issue 14).
    """
    bindir = os.path.join(qmail_home, "bin")
    tls = os.path.lexists(os.path.join(qmail_home, SERVERCERT))
    popup = [os.path.join(bindir, "qmail-popup"), fqdn, os.path.join(bindir, "checkpassword"),
             os.path.join(bindir, "qmail-pop3d"), "Maildir"]
    smtpd_auth = [os.path.join(bindir, "qmail-smtpd"), os.path.join(bindir, "checkpassword"), AUTH_SUBPROGRAM]
    out = {"send": [os.path.join(bindir, "qmail-start"), "./Maildir/"]}
    if not inst.single:
        # Root mode: local users queue through qmail-queued, a service of its
        # own so that intake does not depend on qmail-send.
        out["queued"] = [os.path.join(bindir, "qmail-queued")]
        # Root mode: qmail-smtpd runs as qmaild and cannot look into homes; it
        # asks qmail-rcptcheckd, which looks as each user (docs/DESIGN.md).
        out["rcptcheckd"] = [os.path.join(bindir, "qmail-rcptcheckd")]
    if ports.smtp:
        out["smtpd"] = [*SMTP_ENV] + _tcpserver(qmail_home, inst, fqdn, ports.host, ports.smtp,
                                  [os.path.join(bindir, "qmail-smtpd")], as_qmaild=True)
    if ports.pop3:
        # As root, checkpassword needs root to read /etc/shadow and become the user.
        out["pop3d"] = ([FORCETLS_ENV] if tls else []) + _tcpserver(qmail_home, inst, fqdn, ports.host, ports.pop3,
                                                                  popup, as_qmaild=False)
    if ports.qmtp:
        out["qmtpd"] = _tcpserver(qmail_home, inst, fqdn, ports.host, ports.qmtp,
                                  [os.path.join(bindir, "qmail-qmtpd")], as_qmaild=True)
    if ports.smtps and tls:
        out["smtps"] = [SMTPS_ENV, SMTPS_AUTH_ENV, *SMTP_ENV,
                        *_tcpserver(qmail_home, inst, fqdn, ports.host, ports.smtps, smtpd_auth, as_qmaild=False)]
    if ports.submission and tls:
        out["submission"] = [*SUBMISSION_ENV, *SMTP_ENV,
                             *_tcpserver(qmail_home, inst, fqdn, ports.host, ports.submission, smtpd_auth,
                                         as_qmaild=False)]
    if ports.pop3s and tls:
        out["pop3s"] = [POP3S_ENV, *_tcpserver(qmail_home, inst, fqdn, ports.host, ports.pop3s,
                                               popup, as_qmaild=False)]
    return out


def _write_file(path: str, text: str, mode: int) -> None:
    tmp = path + ".new"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_services(qmail_home: str, inst: _home.Install, wanted: dict[str, list[str]]) -> list[str]:
    """Make QMAILHOME/service/NAME/{run,log/run} for wanted, remove other services; return their dirs."""
    bindir = os.path.join(qmail_home, "bin")
    top = os.path.join(qmail_home, SERVICES)
    os.makedirs(top, mode=0o755, exist_ok=True)
    path = f"{bindir}:/usr/local/bin:/usr/bin:/bin"
    dirs = []
    for name in sorted(os.listdir(top)):
        if name not in wanted and not name.startswith("."):
            import shutil

            shutil.rmtree(os.path.join(top, name))
    logger = []
    if not inst.single:
        logger = [os.path.join(bindir, "setuidgid"), inst.users["qmaill"].name]
    for name, argv in wanted.items():
        d = os.path.join(top, name)
        os.makedirs(os.path.join(d, "log"), mode=0o755, exist_ok=True)
        # qmail-send runs in the home (qmail-start's defaultdelivery is relative
        # to each user's home, qmail-send itself works in queue/).
        _write_file(os.path.join(d, "run"),
                    "#!/bin/sh\nexec 2>&1\n"
                    f"cd {_sh(qmail_home)} || exit 111\n"
                    f"exec env - PATH={_sh(path)} {' '.join(_sh(w) for w in argv)}\n", 0o755)
        logdir = os.path.join(qmail_home, LOGDIR, name)
        os.makedirs(logdir, mode=0o755, exist_ok=True)
        if not inst.single:
            qmaill = inst.users["qmaill"]
            os.chown(logdir, qmaill.uid, qmaill.gid)
        multilog = [*logger, os.path.join(bindir, "multilog"), "t", logdir]
        _write_file(os.path.join(d, "log", "run"),
                    f"#!/bin/sh\nexec env - PATH={_sh(path)} {' '.join(_sh(w) for w in multilog)}\n", 0o755)
        dirs.append(d)
    return dirs


def _maildir(path: str) -> None:
    for sub in ("", "tmp", "new", "cur"):
        try:
            os.mkdir(os.path.join(path, sub), 0o700)
        except FileExistsError:
            pass


def _alive(pidfile: str) -> int:
    """Return the pid in pidfile if that process exists, else 0."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().strip() or "0")
    except (FileNotFoundError, ValueError):
        return 0
    if pid <= 0:
        return 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return 0
    except PermissionError:
        pass
    return pid


def _control(service_dir: str, data: bytes) -> bool:
    """Send svc's commands to the supervise of service_dir; False if none runs there."""
    try:
        fd = os.open(os.path.join(service_dir, "supervise", "control"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENOENT):
            return False
        raise
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return True


def _supervised(service_dir: str) -> bool:
    from pyqmail.svc import status

    try:
        status.read(service_dir)
    except status.NotRunning:
        return False
    except status.StatusError:
        return os.path.isdir(os.path.join(service_dir, "supervise"))
    return True


def stop_all(qmail_home: str, out: TextIO | None = None) -> None:
    """Stop svscan, then each service (svc -dx), then the log services; wait for every supervise."""
    pid = _alive(os.path.join(qmail_home, SVSCAN_PIDFILE))
    if pid:
        # First svscan, or it would start the supervise processes again.
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while _alive(os.path.join(qmail_home, SVSCAN_PIDFILE)) and time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                pass
            time.sleep(POLL)
    top = os.path.join(qmail_home, SERVICES)
    try:
        names = sorted(n for n in os.listdir(top) if not n.startswith("."))
    except FileNotFoundError:
        return
    for layer in ([os.path.join(top, n) for n in names], [os.path.join(top, n, "log") for n in names]):
        for d in layer:
            _control(d, b"dx")
        deadline = time.monotonic() + STOP_TIMEOUT
        for d in layer:
            while _supervised(d) and time.monotonic() < deadline:
                _reap()
                time.sleep(POLL)
    _reap()
    try:
        os.unlink(os.path.join(qmail_home, SVSCAN_PIDFILE))
    except FileNotFoundError:
        pass


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _init_home(qmail_home: str, out: TextIO, err: TextIO) -> int:
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
    return 0


POP3_PASSWORD_FILE = "conf/pop3-password"


def _pop3_user(qmail_home: str, inst: _home.Install, user: str, maildir_home: str, uid: int, gid: int) -> str:
    """Make user a POP3 virtual user whose mail is maildir_home/Maildir; return its password file."""
    import io
    import secrets

    from pyqmail.admin import users

    path = os.path.join(qmail_home, POP3_PASSWORD_FILE)
    with users.Database(qmail_home) as db:
        known = db.find(os.fsencode(user)) >= 0
    if known and os.path.exists(path):
        return path
    password = secrets.token_urlsafe(12)
    if known:
        users.passwd(qmail_home, user, io.BytesIO(password.encode() + b"\n"), False)
    else:
        users.add(qmail_home, user, str(uid), str(gid), maildir_home, io.BytesIO(password.encode() + b"\n"), False)
    fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    os.replace(path + ".new", path)
    return path


def up(qmail_home: str, out: TextIO = sys.stdout, err: TextIO = sys.stderr, ports: Ports | None = None) -> int:
    """Run the installation in qmail_home until SIGINT/SIGTERM; return the exit code."""
    ports = ports or default_ports()
    if not os.path.isdir(os.path.join(qmail_home, "queue")):
        rc = _init_home(qmail_home, out, err)
        if rc != 0:
            return rc
    _home.set_default(qmail_home)
    inst = _home.install()
    os.makedirs(os.path.join(qmail_home, "run"), exist_ok=True)
    pidfile = os.path.join(qmail_home, PIDFILE)
    lock = take_lock(pidfile)
    if lock < 0:
        print(f"qmail up: fatal: already running in {qmail_home} ({f'pid {-lock}' if lock < -1 else 'pid unknown'}); "
              f"stop it with: qmail down --home {qmail_home}", file=err)
        return 111
    try:
        elsewhere = supervised_elsewhere(qmail_home)
        if elsewhere:
            print(f"qmail up: fatal: this home's services already run: {elsewhere}; "
                  f"see: qmail status --home {qmail_home}", file=err)
            _release(pidfile, lock)
            return 111
        # Services a killed `qmail up` left behind.
        stop_all(qmail_home)
    except BaseException:
        _release(pidfile, lock)
        raise
    return _run(qmail_home, inst, ports, out, pidfile, lock)


def take_lock(pidfile: str) -> int:
    """flock pidfile and write our pid into it; return the descriptor, or -PID of the holder (-1: unknown)."""
    import fcntl

    fd = os.open(pidfile, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            text = os.pread(fd, 64, 0).strip()
        finally:
            os.close(fd)
        return -int(text) if text.isdigit() and int(text) > 1 else -1
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release(pidfile: str, fd: int) -> None:
    """Remove the pid file, then drop its lock."""
    try:
        os.unlink(pidfile)
    except FileNotFoundError:
        pass
    os.close(fd)


def locked(pidfile: str) -> bool:
    """Return whether a process holds the flock of pidfile."""
    from pyqmail.admin import supervision

    return supervision.lock_held(pidfile) is True


def supervised_elsewhere(qmail_home: str) -> str:
    """Describe where this home's services run outside `qmail up`'s control; "" if nowhere."""
    from pyqmail.admin import supervision, systemd

    s = supervision.survey(qmail_home, int(time.time()))
    places: dict[str, list[str]] = {}
    for svc in s.running(include_own=False):
        places.setdefault(svc.where(), []).append(svc.directory)
    ours = _alive(os.path.join(qmail_home, SVSCAN_PIDFILE))
    if ours and os.path.exists(os.path.join(qmail_home, systemd.UNIT_MARK)):
        # A systemd unit's svscan over QMAILHOME/service, not a killed `qmail up`'s.
        places.setdefault(f"systemd unit {systemd.unit_name(qmail_home)} (svscan pid {ours}) "
                          f"in {os.path.join(qmail_home, SERVICES)}", [])
        ours = 0
    own_dir = os.path.realpath(os.path.join(qmail_home, SERVICES))
    for top, procs in s.scanners().items():
        for p in procs:
            if os.path.realpath(top) == own_dir and p.pid != ours:
                places.setdefault(f"svscan (pid {p.pid}) in {top}", [])
    return "; ".join(f"{where}: {', '.join(dirs)}" if dirs else where for where, dirs in places.items())


def postmaster_goes(qmail_home: str, inst: _home.Install) -> str:
    """Return, in words, where mail to postmaster is delivered (alias/.qmail-postmaster, else the default)."""
    from pyqmail.local import dotqmail

    alias_dir = os.path.join(qmail_home, "alias")
    default = f"the alias user's default delivery, {alias_dir}/Maildir/"
    try:
        with open(os.path.join(alias_dir, ".qmail-postmaster"), "rb") as f:
            text = f.read(1 << 16)
    except FileNotFoundError:
        return default
    except OSError as e:
        return f"unknown ({alias_dir}/.qmail-postmaster: {e.strerror})"
    said = []
    for line in dotqmail.parse(text):
        target = os.fsdecode(line.target)
        if line.kind == dotqmail.FORWARD:
            where = f"forwarded to {target}"
            if inst.single and target.partition("@")[0] == pwd.getpwuid(os.getuid()).pw_name:
                where += f" (you: {os.path.join(pwd.getpwuid(os.getuid()).pw_dir, 'Maildir')}/)"
            said.append(where)
        elif line.kind in (dotqmail.MAILDIR, dotqmail.MBOX):
            said.append(f"delivered to {os.path.normpath(os.path.join(alias_dir, target))}"
                        + ("/" if line.kind == dotqmail.MAILDIR else ""))
        elif line.kind == dotqmail.PROGRAM:
            said.append(f"piped to {target}")
    return ", ".join(said) if said else default


def _default_brtlimit(qmail_home: str) -> None:
    """Write control/brtlimit (BRTLIMIT_DEFAULT) unless the admin has one: a dictionary attack is cut short."""
    path = os.path.join(qmail_home, "control", "brtlimit")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(BRTLIMIT_DEFAULT)


def _run(qmail_home: str, inst: _home.Install, ports: Ports, out: TextIO, pidfile: str, lock: int) -> int:
    """Write the services and run svscan over them until SIGINT/SIGTERM; release the lock at the end."""
    pw = pwd.getpwuid(os.getuid())
    user = pw.pw_name
    with open(os.path.join(qmail_home, "control", "me"), encoding="latin-1") as f:
        me = f.read().strip()
    if inst.single:
        # Where qmail-lspawn will deliver: the passwd home, not $HOME.
        maildir_home, uid, gid = pw.pw_dir, pw.pw_uid, pw.pw_gid
        maildir = os.path.join(maildir_home, "Maildir")
        _maildir(maildir)
    else:
        # As root, mail for postmaster, root and mailer-daemon goes to the
        # alias user's default delivery.
        user = "postmaster"
        alias = inst.users["alias"]
        maildir_home, uid, gid = alias.home, alias.uid, alias.gid
        maildir = os.path.join(maildir_home, "Maildir")
        _maildir(maildir)
        for sub in ("", "tmp", "new", "cur"):
            os.chown(os.path.join(maildir, sub), alias.uid, alias.gid)
    password_file = (_pop3_user(qmail_home, inst, user, maildir_home, uid, gid)
                     if ports.pop3 or ports.submission else "")
    wanted = services(qmail_home, inst, ports, me)
    _default_brtlimit(qmail_home)
    write_services(qmail_home, inst, wanted)
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
    svscan = 0
    try:
        svscan = os.fork()
        if svscan == 0:
            try:
                # Its own session: Ctrl-C on the terminal reaches `qmail up`
                # alone, which stops the services in order.
                os.setsid()
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                null = os.open(os.devnull, os.O_RDWR)
                spawn.become(os.path.join(qmail_home, "bin", "svscan"), ["svscan", os.path.join(qmail_home, SERVICES)],
                             env={"PATH": f"{qmail_home}/bin:/usr/local/bin:/usr/bin:/bin"},
                             fds={0: null, 1: null, 2: null})
            finally:
                os._exit(111)
        with open(os.path.join(qmail_home, SVSCAN_PIDFILE), "w") as f:
            f.write(f"{svscan}\n")
        host = "127.0.0.1" if ports.host == "0" else ports.host
        print(f"qmail up: running in {qmail_home} ({'single-user' if inst.single else 'root'} mode), "
              f"services in {qmail_home}/{SERVICES}, logs in {qmail_home}/{LOGDIR}/", file=out)
        listening = {"smtpd": ports.smtp, "pop3d": ports.pop3, "qmtpd": ports.qmtp,
                     "smtps": ports.smtps, "pop3s": ports.pop3s, "submission": ports.submission}
        for name, argv in wanted.items():
            where = f" on {ports.host}:{listening[name]}" if name in listening else ""
            print(f"qmail up: {name}{where}: {' '.join(argv)}", file=out)
        print(f"qmail up: mail to {user}@{me} is delivered to {maildir}/", file=out)
        print(f"qmail up: mail to postmaster@{me} (and root, mailer-daemon) goes by "
              f"{qmail_home}/alias/.qmail-postmaster: {postmaster_goes(qmail_home, inst)}", file=out)
        print(f"qmail up: send one with: echo 'Subject: hello' | {qmail_home}/bin/qmail-inject {user}", file=out)
        if ports.smtp:
            print(f"qmail up: or over SMTP: swaks --server {host} --port {ports.smtp} --to {user}@{me}", file=out)
        if "smtps" in wanted:
            print(f"qmail up: or over SMTPS: swaks --server {host} --port {ports.smtps} --tls-on-connect "
                  f"--to {user}@{me}", file=out)
        if ports.pop3:
            print(f"qmail up: read it over POP3 at {host}:{ports.pop3} as user {user}, "
                  f"password in {password_file}", file=out)
        if "pop3s" in wanted:
            print(f"qmail up: or over POP3S at {host}:{ports.pop3s}", file=out)
        if "submission" in wanted:
            print(f"qmail up: mail program: outgoing server {host} port {ports.submission}, STARTTLS, "
                  f"password authentication (PLAIN or LOGIN) as user {user}, password in {password_file}", file=out)
            print(f"qmail up: try it: swaks --server {host} --port {ports.submission} --tls --auth PLAIN "
                  f"--auth-user {user} --auth-password \"$(cat {password_file})\" --to someone@example.org", file=out)
        print(_tls_line(qmail_home, ports, wanted), file=out)
        print(f"qmail up: status with: qmail status --home {qmail_home}", file=out)
        print(f"qmail up: stop with Ctrl-C or: qmail down --home {qmail_home}", file=out, flush=True)
        while not stopping:
            try:
                pid, status = os.waitpid(svscan, 0)
            except ChildProcessError:
                break
            if pid == svscan and not stopping:
                print(f"qmail up: svscan exited ({spawn.exit_code(status)}); stopping", file=out, flush=True)
                break
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all(qmail_home, out)
        _release(pidfile, lock)
        print("qmail up: stopped", file=out, flush=True)
    return 0


def _tls_line(qmail_home: str, ports: Ports, wanted: dict[str, list[str]]) -> str:
    """Say what TLS the services offer, or why they offer none."""
    cert = os.path.join(qmail_home, SERVERCERT)
    if not os.path.lexists(cert):
        return (f"qmail up: no TLS: {cert} is missing (make one with: qmail init --new-cert --home {qmail_home}, "
                "or see docs/TLS.md)")
    offers = ["STARTTLS on SMTP" if "smtpd" in wanted else "",
              "STLS on POP3 (required before a password)" if "pop3d" in wanted else "",
              f"SMTPS on port {ports.smtps}" if "smtps" in wanted else "",
              f"POP3S on port {ports.pop3s}" if "pop3s" in wanted else "",
              f"submission on port {ports.submission} (STARTTLS and AUTH required)" if "submission" in wanted else ""]
    said = ", ".join(o for o in offers if o) or "no service to offer it on"
    return f"qmail up: TLS with {cert}: {said}"


def down(qmail_home: str, err: TextIO = sys.stderr) -> int:
    """Stop the `qmail up` running for qmail_home (or what a killed one left); 0, or 111 if nothing runs."""
    pidfile = os.path.join(qmail_home, PIDFILE)
    # Only a pid file whose lock is held names a running `qmail up`: a stale one may name anybody.
    pid = _alive(pidfile) if locked(pidfile) else 0
    if not pid:
        top = os.path.join(qmail_home, SERVICES)
        left = _alive(os.path.join(qmail_home, SVSCAN_PIDFILE)) or (
            os.path.isdir(top) and any(_supervised(os.path.join(top, n)) for n in os.listdir(top)))
        if not left:
            print(f"qmail down: nothing runs in {qmail_home}", file=err)
            return 111
        stop_all(qmail_home)
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    # `qmail up` removes its pid file when everything has stopped (its parent
    # may not have reaped it yet, so the pid alone says nothing).
    deadline = time.monotonic() + STOP_TIMEOUT * 2
    while time.monotonic() < deadline:
        if not locked(pidfile):
            return 0
        time.sleep(0.1)
    print(f"qmail down: pid {pid} still running after {STOP_TIMEOUT * 2:.0f} s", file=err)
    return 111
