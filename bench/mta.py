"""The mail systems bench/compare.py measures: pyqmail, Postfix and C qmail, each installed,
configured, started and stopped by the bench in a private directory, on 127.0.0.1 ports
(never 25), its processes in a cgroup of their own.

Every system is driven through the same small interface (`Mta`): an SMTP port, the Maildir
its local recipient's mail lands in, the commands that inject a message, a way to fill the
queue while delivery is held and to release it, and the processes and CPU time of the whole
mail system.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

FQDN = "bench.example.com"
SENDER = "sender@bench.client"
REMOTE_RCPT = "sink@far.example"  # every system routes far.example to the bench's smtp-sink
USER = "pqtest"  # deliveries run as this ordinary user, into a Maildir of the bench's own
BIN = os.path.dirname(sys.executable)


class BenchError(Exception):
    """A system did not do what the bench asked within the time allowed."""


def wait_until(pred: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    """Poll pred until true; raise BenchError naming what after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
            c.settimeout(5)
            return c.recv(4).startswith(b"220")
    except OSError:
        return False


def count_files(top: str) -> int:
    """Return how many files are below top (0 if top is missing)."""
    return sum(len(files) for _, _, files in os.walk(top))


# --- process accounting ------------------------------------------------------------------------

def _cgroup2_root() -> str | None:
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if os.path.exists(os.path.join(root, "cgroup.procs")) and os.path.exists(
                os.path.join(root, "cgroup.controllers")):
            return root
    return None


class Accounting:
    """The processes and CPU time of one mail system.

    A cgroup v2 (cpu.stat's usage_usec) when one can be made here, else a cgroup v1
    cpuacct (cpuacct.usage); else, without cgroups, the process tree found by session id in
    /proc, its CPU the sum of utime+stime+cutime+cstime over the live processes (a process
    whose parent left the tree is lost at its exit). `how` says which.
    """

    def __init__(self, name: str) -> None:
        self.path: str | None = None
        self.sids: set[int] = set()
        self.how = "process tree in /proc (getrusage of live processes and their reaped children)"
        candidates = []
        root2 = _cgroup2_root()
        if root2:
            candidates.append((root2, "cgroup v2 cpu.stat usage_usec"))
        if os.path.exists("/sys/fs/cgroup/cpuacct/cpuacct.usage"):
            candidates.append(("/sys/fs/cgroup/cpuacct", "cgroup v1 cpuacct.usage"))
        for root, how in candidates:
            path = os.path.join(root, f"pyqmail-bench-{name}-{os.getpid()}")
            try:
                os.mkdir(path)
            except OSError:
                continue
            self.path, self.how = path, how
            break

    def wrap(self, argv: list[str]) -> list[str]:
        """Return argv run inside this system's cgroup (through /bin/sh, so no preexec_fn)."""
        if self.path is None:
            return argv
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', self.path, *argv]

    def add_session(self, sid: int) -> None:
        self.sids.add(sid)

    def pids(self) -> list[int]:
        if self.path is not None:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        out = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _stat(int(name))
                if st is not None and int(st[3]) in self.sids:
                    out.append(int(name))
        return out

    def cpu_ns(self) -> int:
        """Return the CPU time (user+system) the system used so far, in ns."""
        if self.path is not None:
            if self.how.startswith("cgroup v2"):
                with open(os.path.join(self.path, "cpu.stat")) as f:
                    for line in f:
                        if line.startswith("usage_usec "):
                            return int(line.split()[1]) * 1000
                raise BenchError("cpu.stat has no usage_usec")
            with open(os.path.join(self.path, "cpuacct.usage")) as f:
                return int(f.read())
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            st = _stat(pid)
            if st is not None:
                total += sum(int(x) for x in st[11:15])
        return total * 1_000_000_000 // tick

    def kill(self) -> None:
        """SIGKILL whatever is left of the system, then remove the cgroup (bounded)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        while self.path is not None:
            try:
                os.rmdir(self.path)
                break
            except OSError as e:  # EBUSY while the last processes finish exiting
                if time.monotonic() > deadline + 10:
                    print(f"bench: cannot remove {self.path}: {e}", file=sys.stderr)
                    break
                time.sleep(0.1)


def _stat(pid: int) -> list[str] | None:
    """Return the fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].decode().split()
    except (FileNotFoundError, ProcessLookupError):
        return None


# --- the systems ---------------------------------------------------------------------------

class Mta:
    """One mail system under test."""

    name = ""
    smtp_port = 0
    maildir = ""
    rcpt = ""
    logfile = ""

    def __init__(self, base: str) -> None:
        self.base = os.path.join(base, self.name)
        os.makedirs(self.base, mode=0o755)
        self.acct = Accounting(self.name)

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def queued(self) -> int:
        """Return how many messages are in the queue."""
        raise NotImplementedError

    def hold(self) -> None:
        """Stop delivery; intake goes on."""

    def release(self) -> None:
        """Start delivery again."""

    def fill(self, n: int, rcpt: str, body: bytes) -> None:
        """Queue n messages for rcpt without delivering them (delivery is held)."""

    def inject_commands(self) -> dict[str, list[str]]:
        """Return {label: argv} of the injection programs (message on stdin)."""
        return {}

    def make_maildir(self, top: str) -> None:
        pw = pwd.getpwnam(USER)
        for d in (top, *(os.path.join(top, s) for s in ("tmp", "new", "cur"))):
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)


def _qmail_queue_fill(prog: str, n: int, rcpt: str, body: bytes) -> None:
    """Run prog (a qmail-queue) n times with body and an envelope for rcpt."""
    envelope = f"F{SENDER}\0T{rcpt}\0\0".encode()
    for _ in range(n):
        mr, mw = os.pipe()
        er, ew = os.pipe()
        p = subprocess.Popen([prog], stdin=mr, stdout=er, env={"PATH": "/usr/bin:/bin"})
        os.close(mr)
        os.close(er)
        os.write(mw, body)  # 4 KB: fits in the pipe
        os.close(mw)
        os.write(ew, envelope)
        os.close(ew)
        if p.wait(timeout=60) != 0:
            raise BenchError(f"{prog} exited {p.returncode}")


def _assign(qhome: str, user_home: str, newu: list[str]) -> None:
    """users/assign: bench@FQDN delivered as USER with user_home as its home."""
    pw = pwd.getpwnam(USER)
    with open(os.path.join(qhome, "users", "assign"), "w") as f:
        f.write(f"=bench:{USER}:{pw.pw_uid}:{pw.pw_gid}:{user_home}:::\n.\n")
    subprocess.run(newu, check=True, timeout=60, env={"PATH": "/usr/bin:/bin"})


class Pyqmail(Mta):
    """pyqmail in root mode: `qmail init --home DIR FQDN`, run by `qmail up` on free ports."""

    name = "pyqmail"

    def __init__(self, base: str, sink_port: int) -> None:
        super().__init__(base)
        self.home = os.path.join(self.base, "qmail")
        subprocess.run([os.path.join(BIN, "qmail"), "init", "--home", self.home, FQDN],
                       check=True, stdout=subprocess.DEVNULL, timeout=300)
        user_home = os.path.join(self.base, "user")
        os.mkdir(user_home, 0o755)
        os.chown(user_home, pwd.getpwnam(USER).pw_uid, -1)
        self.maildir = os.path.join(user_home, "Maildir")
        self.make_maildir(self.maildir)
        _assign(self.home, user_home, [os.path.join(self.home, "bin", "qmail-newu")])
        with open(os.path.join(self.home, "control", "smtproutes"), "w") as f:
            f.write(f"far.example:[127.0.0.1]:{sink_port}\n")
        self.rcpt = f"bench@{FQDN}"
        self.smtp_port = free_port()
        self.logfile = os.path.join(self.base, "up.out")
        self.up: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [os.path.join(BIN, "qmail"), "up", "--home", self.home, "--smtp-port", str(self.smtp_port)]
        for other in ("pop3", "qmtp", "submission", "smtps", "pop3s"):
            argv += [f"--{other}-port", "0"]
        with open(self.logfile, "wb") as out:
            self.up = subprocess.Popen(self.acct.wrap(argv), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.base)
        self.acct.add_session(self.up.pid)

        def ready() -> bool:
            if self.up is not None and self.up.poll() is not None:
                raise BenchError(f"qmail up exited {self.up.returncode}: {self._log()}")
            return "stop with" in self._log()

        wait_until(ready, 180, "qmail up to start")
        wait_until(lambda: port_open(self.smtp_port), 120, "pyqmail's SMTP service")
        wait_until(lambda: all(self._state(s) == "up" for s in os.listdir(os.path.join(self.home, "service"))),
                   60, "every service of qmail up")
        # qmail-smtpd asks qmail-rcptcheckd at RCPT: 451 until its socket is there.
        wait_until(lambda: os.path.exists(os.path.join(self.home, "run", "qmail-rcptcheck.sock")), 60,
                   "qmail-rcptcheckd's socket")

    def _log(self) -> str:
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def _state(self, service: str) -> str:
        p = subprocess.run([os.path.join(self.home, "bin", "svstat"), os.path.join(self.home, "service", service)],
                           capture_output=True, timeout=30)
        text = p.stdout.decode(errors="replace")
        return "up" if ": up " in text else "down" if ": down " in text else "?"

    def _svc(self, flag: str, service: str) -> None:
        subprocess.run([os.path.join(self.home, "bin", "svc"), flag, os.path.join(self.home, "service", service)],
                       check=True, timeout=30)

    def stop(self) -> None:
        if self.up is not None and self.up.poll() is None:
            subprocess.run([os.path.join(BIN, "qmail"), "down", "--home", self.home], capture_output=True, timeout=150)
            try:
                self.up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        self.acct.kill()
        if self.up is not None and self.up.poll() is None:
            self.up.wait(timeout=10)

    def queued(self) -> int:
        return count_files(os.path.join(self.home, "queue", "mess")) + sum(
            n.startswith("m") for n in os.listdir(os.path.join(self.home, "maildrop")))

    def hold(self) -> None:
        self._svc("-d", "send")
        wait_until(lambda: self._state("send") == "down", 60, "qmail-send to stop")

    def release(self) -> None:
        self._svc("-u", "send")

    def fill(self, n: int, rcpt: str, body: bytes) -> None:
        # pyqmail.spawn's fork fast path (bench/common.py): a new interpreter per message
        # would make filling take longer than draining.
        import common

        common.queue_messages(self.home, n, body, f"F{SENDER}\0T{rcpt}\0\0".encode())

    def inject_commands(self) -> dict[str, list[str]]:
        b = os.path.join(self.home, "bin")
        return {"qmail-inject": [os.path.join(b, "qmail-inject"), self.rcpt],
                "sendmail": [os.path.join(b, "sendmail"), "-t", "-i", "-f", SENDER]}


class CQmail(Mta):
    """An installed C qmail (notqmail) at DIR, configured by the bench, run as its rc and run
    files would: qmail-start ./Maildir/ (log to a file) and ucspi-tcp's tcpserver -u qmaild."""

    name = "cqmail"

    def __init__(self, base: str, qdir: str, sink_port: int) -> None:
        super().__init__(base)
        self.home = os.path.abspath(qdir)
        ctl = os.path.join(self.home, "control")
        for name, text in (("me", FQDN), ("locals", FQDN), ("rcpthosts", FQDN), ("defaultdomain", "example.com"),
                           ("plusdomain", "example.com"), ("smtproutes", f"far.example:127.0.0.1:{sink_port}")):
            with open(os.path.join(ctl, name), "w") as f:
                f.write(text + "\n")
        if self.queued():
            raise BenchError(f"{self.home}/queue is not empty: the bench needs a C qmail of its own")
        user_home = os.path.join(self.base, "user")
        os.mkdir(user_home, 0o755)
        os.chown(user_home, pwd.getpwnam(USER).pw_uid, -1)
        self.maildir = os.path.join(user_home, "Maildir")
        self.make_maildir(self.maildir)
        _assign(self.home, user_home, [os.path.join(self.home, "bin", "qmail-newu")])
        self.rcpt = f"bench@{FQDN}"
        self.smtp_port = free_port()
        self.logfile = os.path.join(self.base, "send.log")
        tcpserver = shutil.which("tcpserver", path="/usr/bin:/usr/local/bin:/bin")
        if tcpserver is None:
            raise BenchError("C qmail needs ucspi-tcp's tcpserver (Debian: ucspi-tcp)")
        self.tcpserver: str = tcpserver
        self.send: subprocess.Popen[bytes] | None = None
        self.smtpd: subprocess.Popen[bytes] | None = None

    def _start_send(self) -> None:
        with open(self.logfile, "ab") as log:
            self.send = subprocess.Popen(
                self.acct.wrap(["env", "-", f"PATH={self.home}/bin:/usr/bin:/bin",
                                os.path.join(self.home, "bin", "qmail-start"), "./Maildir/"]),
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, cwd="/")
        self.acct.add_session(self.send.pid)

    def start(self) -> None:
        self._start_send()
        qmaild = pwd.getpwnam("qmaild")
        import grp

        nofiles = grp.getgrnam("nofiles").gr_gid
        # The book's run file, as pyqmail's qmail up writes it: -v -R -l FQDN -c 40 -u qmaild -g nofiles,
        # and -H: ucspi-tcp asks DNS for 127.0.0.1's name (djbdns's client reads no /etc/hosts)
        # where pyqmail's tcpserver gets "localhost" from /etc/hosts, and a resolver that drops
        # bursts of queries (this machine's does: 3 s retries, 19 connections/s instead of 1083)
        # would measure the resolver, not qmail.
        argv = [self.tcpserver, "-v", "-R", "-H", "-l", FQDN, "-c", "40", "-u", str(qmaild.pw_uid), "-g", str(nofiles),
                "127.0.0.1", str(self.smtp_port), os.path.join(self.home, "bin", "qmail-smtpd")]
        with open(os.path.join(self.base, "smtpd.log"), "ab") as log:
            self.smtpd = subprocess.Popen(self.acct.wrap(["env", "-", f"PATH={self.home}/bin:/usr/bin:/bin", *argv]),
                                          stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        self.acct.add_session(self.smtpd.pid)
        wait_until(lambda: port_open(self.smtp_port), 60, "C qmail's tcpserver")

    def hold(self) -> None:
        if self.send is not None:
            self.send.terminate()  # qmail-start became qmail-send: it waits for its deliveries
            self.send.wait(timeout=120)
            self.send = None

    def release(self) -> None:
        self._start_send()

    def stop(self) -> None:
        self.hold()
        if self.smtpd is not None:
            self.smtpd.terminate()
            self.smtpd.wait(timeout=30)
        self.acct.kill()

    def queued(self) -> int:
        return count_files(os.path.join(self.home, "queue", "mess"))

    def fill(self, n: int, rcpt: str, body: bytes) -> None:
        _qmail_queue_fill(os.path.join(self.home, "bin", "qmail-queue"), n, rcpt, body)

    def inject_commands(self) -> dict[str, list[str]]:
        b = os.path.join(self.home, "bin")
        return {"qmail-inject": [os.path.join(b, "qmail-inject"), self.rcpt],
                "sendmail": [os.path.join(b, "sendmail"), "-t", "-i", "-f", SENDER]}


POSTFIX_SERVICES = [
    # service type private unpriv chroot wakeup maxproc command: Debian's master.cf, chroot off
    # (a private instance has no copy of /etc in its queue directory).
    "pickup unix n - n 60 1 pickup",
    "cleanup unix n - n - 0 cleanup",
    "qmgr unix n - n 300 1 qmgr",
    "tlsmgr unix - - n 1000? 1 tlsmgr",
    "rewrite unix - - n - - trivial-rewrite",
    "bounce unix - - n - 0 bounce",
    "defer unix - - n - 0 bounce",
    "trace unix - - n - 0 bounce",
    "verify unix - - n - 1 verify",
    "flush unix n - n 1000? 0 flush",
    "proxymap unix - - n - - proxymap",
    "proxywrite unix - - n - 1 proxymap",
    "smtp unix - - n - - smtp",
    "relay unix - - n - - smtp",
    "showq unix n - n - - showq",
    "error unix - - n - - error",
    "retry unix - - n - - error",
    "discard unix - - n - - discard",
    "local unix - n n - - local",
    "anvil unix - - n - 1 anvil",
    "scache unix - - n - 1 scache",
    "postlog unix-dgram n - n - 1 postlogd",
]


def postfix_available() -> bool:
    return shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin") is not None and os.path.exists(
        "/usr/lib/postfix/sbin/smtpd")


class Postfix(Mta):
    """Debian's Postfix in a private instance: own config_directory, queue_directory and
    data_directory, inet_interfaces 127.0.0.1, STARTTLS offered (a self-signed certificate, as
    Debian's package does with its snakeoil one), local(8) delivering into a Maildir
    (mail_spool_directory ending in "/": $spool/pqtest/ is a Maildir, written as pqtest)."""

    name = "postfix"

    def __init__(self, base: str, sink_port: int) -> None:
        super().__init__(base)
        self.cmd = shutil.which("postfix", path="/usr/sbin:/usr/bin:/sbin") or "postfix"
        self.conf = os.path.join(self.base, "etc")
        self.spool = os.path.join(self.base, "spool")
        self.data = os.path.join(self.base, "data")
        mailspool = os.path.join(self.base, "mail")
        for d in (self.conf, self.spool, self.data, mailspool):
            os.makedirs(d, mode=0o755)
        shutil.chown(self.data, "postfix")
        self.maildir = os.path.join(mailspool, USER)
        self.make_maildir(self.maildir)
        self.rcpt = f"{USER}@{FQDN}"
        self.smtp_port = free_port()
        self.logfile = os.path.join(self.base, "postfix.log")
        cert, key = os.path.join(self.conf, "cert.pem"), os.path.join(self.conf, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "30", "-subj", f"/CN={FQDN}"],
                       check=True, capture_output=True, timeout=60)
        main = {
            "compatibility_level": "3.6",
            "queue_directory": self.spool,
            "data_directory": self.data,
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "shlib_directory": "/usr/lib/postfix",
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": FQDN,
            "mydomain": "example.com",
            "myorigin": FQDN,
            "mydestination": FQDN,
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{sink_port}",
            "smtp_dns_support_level": "disabled",
            "disable_dns_lookups": "yes",
            "alias_maps": "",
            "alias_database": "",
            "home_mailbox": "",
            "mail_spool_directory": mailspool + "/",
            "biff": "no",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": cert,
            "smtpd_tls_key_file": key,
            "maillog_file": self.logfile,
            "maillog_file_prefixes": self.base,
            "multi_instance_enable": "no",
        }
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write("".join(f"{k} = {v}\n" for k, v in main.items()))
        self._master(with_qmgr=True)
        self.env = {"PATH": "/usr/sbin:/usr/bin:/bin", "MAIL_CONFIG": self.conf}

    def _master(self, with_qmgr: bool) -> None:
        lines = [f"127.0.0.1:{self.smtp_port} inet n - n - - smtpd"]
        lines += [s for s in POSTFIX_SERVICES if with_qmgr or not s.startswith("qmgr ")]
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def _postfix(self, *args: str) -> None:
        p = subprocess.run(self.acct.wrap([self.cmd, "-c", self.conf, *args]), env=self.env,
                           capture_output=True, timeout=120)
        if p.returncode != 0:
            raise BenchError(f"postfix {' '.join(args)}: {p.stderr.decode(errors='replace')}")

    def master_pid(self) -> int:
        try:
            with open(os.path.join(self.spool, "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return 0

    def start(self) -> None:
        self._postfix("start")
        wait_until(lambda: self.master_pid() > 0, 60, "Postfix's master.pid")
        self.acct.add_session(self.master_pid())
        wait_until(lambda: port_open(self.smtp_port), 60, "Postfix's smtpd")

    def stop(self) -> None:
        subprocess.run([self.cmd, "-c", self.conf, "stop"], env=self.env, capture_output=True, timeout=120)
        deadline = time.monotonic() + 30
        while os.path.exists(os.path.join(self.spool, "pid", "master.pid")) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.acct.kill()

    def queued(self) -> int:
        return sum(count_files(os.path.join(self.spool, d))
                   for d in ("maildrop", "incoming", "active", "deferred", "hold"))

    def _qmgr_running(self) -> bool:
        for pid in self.acct.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0].endswith(b"qmgr"):
                        return True
            except (FileNotFoundError, ProcessLookupError):
                pass
        return False

    def hold(self) -> None:
        # No queue manager: what smtpd and pickup take stays in incoming/.
        self._master(with_qmgr=False)
        self._postfix("reload")
        wait_until(lambda: not self._qmgr_running(), 60, "Postfix's qmgr to stop")

    def release(self) -> None:
        self._master(with_qmgr=True)
        self._postfix("reload")

    def fill(self, n: int, rcpt: str, body: bytes) -> None:
        # smtp-source from 127.0.0.1 (mynetworks: relaying to far.example allowed).
        p = subprocess.run(["smtp-source", "-4", "-s", "5", "-m", str(n), "-l", str(len(body)), "-M", "bench.client",
                            "-f", SENDER, "-t", rcpt, f"127.0.0.1:{self.smtp_port}"],
                           capture_output=True, timeout=600)
        if p.returncode != 0:
            raise BenchError(f"smtp-source: {p.stderr.decode(errors='replace')}")

    def inject_commands(self) -> dict[str, list[str]]:
        return {"sendmail": ["/usr/sbin/sendmail", "-C", self.conf, "-t", "-i", "-f", SENDER]}
