"""`qmail doctor`: check an installation for the faults admins hit, with the fix for each.

    qmail doctor [--home DIR]

Seed 003's checklist, automated: control files present and consistent
(me, locals, rcpthosts, virtualdomains), users/cdb and morercpthosts.cdb
not older than their sources, every local user's home directory (and its
parents) and .qmail files safe from other users, the alias user's
postmaster, mailer-daemon and root files, the queue as `qmail init` made
it (owners, modes, the trigger FIFO), the SMTP and QMTP ports, what runs
(this home's services under any svscan, two svscans over one directory,
two systems for one home, stale run/up.pid and run/svscan.pid, a dangling
run/qmail-queue.sock, qmail-queued's lock held with no socket, messages
waiting in maildrop/), control/servercert.pem (unreadable by qmail-smtpd's
user or readable by everyone, key and certificate not a pair, expired or
expiring within 14 days), control/smtproutes and control/authsenders when they
hold smarthost passwords (readable by qmail-remote's user, qmailr, and no one
else: owner qmailr, mode 600), and control/me in DNS ($DNSCACHEIP honoured; a
loopback name is fine on a system listening on loopback only).

One line per item: "ok: ...", "note: ..." (worth knowing, not a fault) or
"problem: ...; fix: ..." with the command that fixes it. Exit 0 without
problems, 1 with problems, 100 for a usage error.
"""

from __future__ import annotations

import argparse
import os
import pwd
import socket
import stat
import time

from pyqmail import control, durable, errors
from pyqmail import home as _home
from pyqmail.admin import install
from pyqmail.local import dotqmail, users
from pyqmail.local.qmail_local import CUTABLE, PATRN, STICKY
from pyqmail.queue import layout
from pyqmail.remote import mx
from pyqmail.send.schedule import ColonMap

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 100
EXIT_TEMPORARY = 111

FD_OUT = 1
DNS_LIFETIME = 5.0
PORT_TIMEOUT = 1.0
UID_MIN = 1000  # login.defs' default: accounts below are the system's own
NOBODY = 65534
DOTQMAIL_MAX = 1 << 20  # bytes of a .qmail file read to check its lines
PARENT_PATRN = 0o022  # a parent of a home writable by others than its owner (not qmail-local's check)
ROOT_PORTS = (("SMTP", 25), ("QMTP", 209))  # what `qmail up` listens on as root
USER_PORTS = (("SMTP", 2525), ("QMTP", 2209))  # and as an ordinary user
ALIAS_NAMES = {".qmail-postmaster": "postmaster", ".qmail-mailer-daemon": "mailer-daemon", ".qmail-root": "root"}


class Report:
    """The lines of a check-up and the number of problems."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.problems = 0
        self._seen: set[str] = set()

    def ok(self, text: str) -> None:
        """Record a check that passed."""
        self.lines.append(f"ok: {text}")

    def note(self, text: str) -> None:
        """Record something worth knowing that is not a fault."""
        self.lines.append(f"note: {text}")

    def problem(self, text: str, fix: str) -> None:
        """Record a fault and the command that fixes it (once per text)."""
        if text in self._seen:
            return
        self._seen.add(text)
        self.problems += 1
        self.lines.append(f"problem: {text}; fix: {fix}")

    def text(self) -> bytes:
        """Return the report, with a last line counting the problems."""
        last = ("qmail doctor: no problems found" if not self.problems else
                f"qmail doctor: {self.problems} problem{'s' if self.problems > 1 else ''} found")
        return "".join(line + "\n" for line in [*self.lines, last]).encode("latin-1", "replace")


def _lstat(path: str) -> os.stat_result | None:
    """Return the lstat of path, None if it does not exist; raise OSError otherwise."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def _q(path: str) -> str:
    """Quote path for a shell command if it needs it."""
    import shlex

    return shlex.quote(path)


# --- control files ------------------------------------------------------------------------

def check_controls(r: Report, home: str) -> None:
    """me, locals, rcpthosts, virtualdomains: present and consistent."""
    cdir = os.path.join(home, "control")
    try:
        me = control.read_line("me")
        locals_ = control.read_lines("locals")
        rcpthosts = control.read_lines("rcpthosts")
        vdoms = control.read_lines("virtualdomains") or []
    except control.ControlError as e:
        r.problem(str(e), f"make the file readable: chmod 644 {_q(cdir)}/*")
        return
    if not me:
        r.problem("control/me is missing or empty: qmail programs fall back to literal names "
                  "(\"bouncehost\", \"envnoathost\", ...) in addresses and greetings",
                  f"echo mail.example.com > {_q(cdir)}/me   (this host's fully qualified name)")
    else:
        r.ok(f"control/me: {me}")
    if locals_ is None:
        if me:
            r.note(f"control/locals is missing: only {me} (control/me) is local")
            locals_ = [me]
        else:
            r.problem("control/locals and control/me are missing: qmail-send does not start",
                      f"echo mail.example.com > {_q(cdir)}/locals")
            locals_ = []
    else:
        r.ok(f"control/locals: {len(locals_)} domain{'s' if len(locals_) != 1 else ''}")
    local_set = {control.lower(d) for d in locals_}
    hosts: control.DomainSet | None = None
    if rcpthosts is None:
        r.problem("control/rcpthosts is missing: qmail-smtpd accepts mail for every domain and relays it "
                  "(an open relay)",
                  f"cp {_q(cdir)}/locals {_q(cdir)}/rcpthosts   (then add each virtual domain)")
    else:
        try:
            hosts = control.DomainSet(rcpthosts, os.path.join(cdir, "morercpthosts.cdb"))
        except control.ControlError as e:
            r.problem(str(e), f"chmod 644 {_q(cdir)}/morercpthosts.cdb")
        else:
            r.ok(f"control/rcpthosts: {len(rcpthosts)} domain{'s' if len(rcpthosts) != 1 else ''}")
    if hosts is not None:
        for d in locals_:
            # localhost-style names are local without being offered to the world.
            if "." not in d or control.lower(d).startswith("localhost"):
                continue
            if not hosts.match(d):
                r.problem(f"{d} is in control/locals but not in control/rcpthosts: "
                          "qmail-smtpd refuses mail for it from other hosts",
                          f"echo {_q(d)} >> {_q(cdir)}/rcpthosts")
    if hosts is not None:
        check_percenthack(r, cdir, hosts)
    vmap = ColonMap(line.encode(control.ENCODING) for line in vdoms)
    for line in vdoms:
        key, colon, prepend = line.partition(":")
        if not colon or not key:
            continue  # qmail ignores lines without a colon; the empty key is the catch-all
        if vmap.get(key.encode(control.ENCODING)) != prepend.encode(control.ENCODING):
            continue  # a later line for the same key wins: check that one only
        domain = key.rpartition("@")[2]
        if domain and not domain.startswith(".") and control.lower(domain) in local_set:
            r.problem(f"control/virtualdomains: {key} is also in control/locals, which qmail-send consults "
                      "first: the virtualdomains entry is never used",
                      f"remove {domain} from {_q(cdir)}/locals (or the line from virtualdomains), "
                      "then send qmail-send HUP")
        if hosts is not None and domain and prepend:
            probe = "x" + domain if domain.startswith(".") else domain
            if not hosts.match(probe):
                r.problem(f"control/virtualdomains: {domain} is not in control/rcpthosts: qmail-smtpd "
                          "refuses its mail from other hosts",
                          f"echo {_q(domain)} >> {_q(cdir)}/rcpthosts")


def check_percenthack(r: Report, cdir: str, hosts: control.DomainSet) -> None:
    """control/percenthack: a domain also in rcpthosts relays user%elsewhere@domain for anyone."""
    try:
        percent = control.read_lines("percenthack") or []
    except control.ControlError as e:
        r.problem(str(e), f"chmod 644 {_q(cdir)}/percenthack")
        return
    for d in percent:
        if d and hosts.match(d):
            # qmail-send(8): user%fqdn@domain becomes user@fqdn before locals are consulted, and
            # qmail-smtpd accepts any recipient at an rcpthosts domain: an open relay.
            r.problem(f"{d} is in control/percenthack and control/rcpthosts: anyone can relay through "
                      f"this host with user%elsewhere@{d}",
                      f"remove {_q(d)} from {_q(cdir)}/percenthack (or from rcpthosts, if it must stay)")


def check_compiled(r: Report, home: str) -> None:
    """users/cdb and morercpthosts.cdb: present and newer than their sources."""
    pairs = (("users/assign", "users/cdb", "qmail-newu", "qmail-lspawn still uses the old assignments"),
             ("control/morercpthosts", "control/morercpthosts.cdb", "qmail-newmrh",
              "qmail-smtpd still uses the old list"))
    for source, compiled, tool, effect in pairs:
        try:
            src = _mtime(os.path.join(home, source))
            out = _mtime(os.path.join(home, compiled))
        except OSError as e:
            r.note(f"cannot check {source}: {errors.describe(e)}")
            continue
        fix = os.path.join(home, "bin", tool)
        if src is None:
            if out is not None:
                r.note(f"{compiled} exists without {source}: it is used as it is")
            continue
        if out is None:
            r.problem(f"{source} exists but {compiled} does not: it is not in effect", _q(fix))
        elif out < src:
            r.problem(f"{compiled} is older than {source}: {effect}", _q(fix))
        else:
            r.ok(f"{compiled} is up to date with {source}")
    assign = os.path.join(home, "users", "assign")
    try:
        with open(assign, "rb") as f:
            data = f.read(64 << 20)
    except FileNotFoundError:
        return
    except OSError as e:
        r.note(f"cannot read users/assign: {errors.describe(e)}")
        return
    try:
        users.parse_assign(data)
    except users.AssignError:
        r.problem("users/assign is not in qmail-users(5) format (lines =local:user:uid:gid:home:dash:ext: "
                  "or +loc:..., ending with a line '.'): qmail-newu refuses it",
                  f"correct {_q(assign)}, then run {_q(os.path.join(home, 'bin', 'qmail-newu'))}")


# --- homes and .qmail files -----------------------------------------------------------

def local_users(home: str, inst: _home.Install) -> list[tuple[str, int, str]]:
    """Return (name, uid, home directory) of every user mail can be delivered to.

    The alias user (if its home exists: check_alias speaks of it otherwise),
    the users of users/assign, and the accounts qmail-getpw would pick: a
    uid of UID_MIN or more owning its home (in a single-user installation
    only the installing user's).
    """
    found: list[tuple[str, int, str]] = []
    alias = users.alias_entry()
    if alias is not None and os.path.isdir(alias.dir):
        found.append((os.fsdecode(alias.name), alias.uid, os.fsdecode(alias.dir)))
    try:
        with open(os.path.join(home, "users", "assign"), "rb") as f:
            data = f.read(64 << 20)
        for key, value in users.parse_assign(data):
            fields = value.split(b"\0")
            if key and len(fields) >= 4 and fields[1].isdigit():
                found.append((os.fsdecode(fields[0]), int(fields[1]), os.fsdecode(fields[3])))
    except (OSError, users.AssignError):
        pass  # check_compiled reports an unreadable or malformed assign
    owner = inst.uid("qmailq")
    for pw in pwd.getpwall():
        if inst.single and pw.pw_uid != owner:
            continue  # a single-user installation delivers to its own user only
        if pw.pw_uid < UID_MIN or pw.pw_uid == NOBODY or not pw.pw_dir.startswith("/"):
            continue
        try:
            if os.stat(pw.pw_dir).st_uid != pw.pw_uid:
                continue  # qmail-getpw ignores an account that does not own its home
        except OSError:
            continue
        found.append((pw.pw_name, pw.pw_uid, pw.pw_dir))
    out = []
    seen = set()
    for name, uid, homedir in found:
        if homedir not in seen:
            seen.add(homedir)
            out.append((name, uid, homedir))
    return out


def check_home(r: Report, name: str, homedir: str) -> bool:
    """Check a user's home directory and its parents; return True if the home exists."""
    try:
        st = os.stat(homedir)
    except FileNotFoundError:
        r.problem(f"home directory {homedir} of {name} does not exist: qmail-local defers its mail "
                  "(Unable to switch to the directory)",
                  f"mkdir -m 755 {_q(homedir)} && chown {_q(name)} {_q(homedir)}")
        return False
    except OSError as e:
        r.note(f"cannot check {homedir}: {errors.describe(e)}")
        return False
    if st.st_mode & PATRN:
        r.problem(f"home directory {homedir} of {name} is world-writable: qmail-local defers "
                  "every delivery (Uh-oh: home directory is writable)", f"chmod o-w {_q(homedir)}")
    if st.st_mode & STICKY:
        r.problem(f"home directory {homedir} of {name} is sticky: qmail-local defers deliveries "
                  "(user is editing his .qmail file)", f"chmod -t {_q(homedir)}")
    parent = os.path.dirname(os.path.abspath(homedir))
    while True:
        try:
            pst = os.stat(parent)
        except OSError as e:
            r.note(f"cannot check {parent}: {errors.describe(e)}")
            break
        # A sticky directory (/tmp) lets nobody rename what others own in it.
        if pst.st_mode & PARENT_PATRN and not pst.st_mode & STICKY:
            r.problem(f"{parent}, a parent of home directory {homedir}, is group- or world-writable: "
                      "others can replace the home and its .qmail files", f"chmod go-w {_q(parent)}")
        if parent == "/":
            break
        parent = os.path.dirname(parent)
    return True


def check_dotqmail_files(r: Report, homedir: str) -> None:
    """Check every .qmail file of a home: not world-writable, x bit only for forwards, no blank first line."""
    try:
        names = sorted(n for n in os.listdir(homedir) if n.startswith(".qmail"))
    except OSError as e:
        r.note(f"cannot list {homedir}: {errors.describe(e)}")
        return
    for n in names:
        path = os.path.join(homedir, n)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_mode & PATRN:
                r.problem(f"{path} is world-writable: qmail-local defers the mail it controls "
                          "(Uh-oh: .qmail file is writable)", f"chmod o-w {_q(path)}")
            with open(path, "rb") as f:
                text = f.read(DOTQMAIL_MAX)
        except OSError as e:
            r.note(f"cannot check {path}: {errors.describe(e)}")
            continue
        if not text:
            continue
        lines = dotqmail.parse(text)
        if lines and lines[0].kind == dotqmail.BLANK:
            r.problem(f"{path} starts with a blank line: qmail-local defers its mail "
                      "(Uh-oh: first line of .qmail file is blank)", f"remove the first line of {_q(path)}")
        if st.st_mode & CUTABLE and any(i.kind in (dotqmail.MBOX, dotqmail.MAILDIR, dotqmail.PROGRAM)
                                        for i in lines):
            r.problem(f"{path} has the x bit set (forward only) but delivers to a file or program: "
                      "qmail-local defers its mail", f"chmod u-x {_q(path)}")


def check_alias(r: Report, inst: _home.Install) -> None:
    """The alias user's home (where qmail-getpw finds it) and its postmaster, mailer-daemon and root files."""
    alias = users.alias_entry()
    if alias is None:
        r.problem("there is no alias user: qmail-lspawn defers mail for unknown local parts "
                  "(Unable to find alias user!)", "qmail init --create-users (as root)")
        return
    adir = os.fsdecode(alias.dir)
    acct = inst.users.get("alias")
    if not os.path.isdir(adir):
        r.problem(f"the alias directory {adir} is missing: mail for postmaster, root and unknown local parts "
                  "is deferred", "qmail init --force (as root) to lay the home out again")
        return
    try:
        has_default = os.path.exists(os.path.join(adir, ".qmail-default"))
    except OSError:
        has_default = False
    for fname, who in ALIAS_NAMES.items():
        path = os.path.join(adir, fname)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if has_default:
                r.note(f"{path} is missing: mail to {who} goes by {adir}/.qmail-default")
            else:
                r.problem(f"{path} is missing: mail to {who} bounces (Sorry, no mailbox here by that name)",
                          f"echo '&you@example.com' > {_q(path)} && chmod 644 {_q(path)}")
            continue
        except OSError as e:
            r.note(f"cannot check {path}: {errors.describe(e)}")
            continue
        if st.st_size == 0:
            r.note(f"{path} is empty: mail to {who} goes to the default delivery in {adir}")
        else:
            r.ok(f"{path} present")


# --- the queue ------------------------------------------------------------------------

class _Expect(install._Layout):
    """install's layout, recorded instead of made: what `qmail init` leaves in the home."""

    def __init__(self, qmail_home: str, inst: _home.Install) -> None:
        super().__init__(qmail_home, inst)
        self.entries: list[tuple[str, str, str, int]] = []  # (rel, kind, role, mode)

    def d(self, rel: str, role: str, mode: int) -> None:
        self.entries.append((rel, "directory", role, mode))

    def z(self, rel: str, size: int, role: str, mode: int) -> None:
        self.entries.append((rel, "file", role, mode))

    def fifo(self, rel: str, role: str, mode: int) -> None:
        self.entries.append((rel, "fifo", role, mode))


_KIND_TEST = {"directory": stat.S_ISDIR, "file": stat.S_ISREG, "fifo": stat.S_ISFIFO}


def _make_cmd(kind: str, path: str, mode: int) -> str:
    if kind == "directory":
        return f"mkdir -m {mode:o} {_q(path)}"
    if kind == "fifo":
        return f"mkfifo -m {mode:o} {_q(path)}"
    return f"touch {_q(path)} && chmod {mode:o} {_q(path)}"


def check_layout(r: Report, home: str, inst: _home.Install) -> None:
    """The directories, queue files and trigger FIFO: types, owners and modes as `qmail init` made them."""
    expect = _Expect(home, inst)
    install.make_layout(expect)
    gid = inst.groups.get("qmail", -1)
    group = "qmail"
    bad = 0
    denied: list[str] = []
    for rel, kind, role, mode in expect.entries:
        path = os.path.join(home, rel) if rel else home
        uid = 0 if role == "root" and not inst.single else inst.uid(role if role != "root" else "qmailq")
        owner = "root" if role == "root" and not inst.single else (
            inst.users[role].name if role in inst.users else str(uid))
        chown = f"chown {owner}:{group} {_q(path)}" if not inst.single else f"chown {owner} {_q(path)}"
        try:
            st = _lstat(path)
        except OSError as e:
            denied.append(f"{path} ({errors.describe(e)})")
            continue
        what = "queue/lock/trigger" if rel == "queue/" + layout.TRIGGER else rel or "the home"
        if st is None or not _KIND_TEST[kind](st.st_mode):
            fix = _make_cmd(kind, path, mode) + f" && {chown}"
            if st is not None:
                fix = f"rm {'-r ' if stat.S_ISDIR(st.st_mode) else ''}{_q(path)} && " + fix
            if rel == "queue/" + layout.TRIGGER:
                text = (f"{path} is {'missing' if st is None else 'not a named pipe'}: qmail-queue cannot "
                        "wake qmail-send, so new mail waits for its periodic scan of todo/")
                fix += " && restart qmail-send"
            else:
                text = f"{path} is {'missing' if st is None else f'not a {kind}'}"
            r.problem(text, fix)
            bad += 1
            continue
        if st.st_uid != uid or (not inst.single and gid != -1 and st.st_gid != gid):
            r.problem(f"{what}: owned by uid {st.st_uid} gid {st.st_gid}, not {owner}:{group} as qmail init "
                      "made it", chown)
            bad += 1
        if stat.S_IMODE(st.st_mode) != mode:
            r.problem(f"{what}: mode {stat.S_IMODE(st.st_mode):o}, not {mode:o} as qmail init made it",
                      f"chmod {mode:o} {_q(path)}")
            bad += 1
    if denied:
        # One line, not one per split directory: the cause is who runs the doctor.
        r.note(f"cannot check {len(denied)} of the queue's entries as this user, e.g. {denied[0]}: "
               "run qmail doctor as root")
    elif not bad:
        r.ok(f"layout: {len(expect.entries)} directories and queue files with qmail init's owners and modes")


# --- network --------------------------------------------------------------------------

def check_ports(r: Report, inst: _home.Install) -> None:
    """Say which of the ports `qmail up` would use have a listener on 127.0.0.1 (notes only)."""
    for service, port in (USER_PORTS if inst.single else ROOT_PORTS):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=PORT_TIMEOUT):
                pass
        except OSError as e:
            r.note(f"nothing answers on 127.0.0.1:{port} ({service}): {errors.describe(e)}; "
                   "is `qmail up` (or tcpserver) running?")
        else:
            r.ok(f"127.0.0.1:{port} ({service}) accepts connections")


def is_loopback_name(name: str) -> bool:
    """Return whether name is a loopback host name: localhost, *.localdomain, localhost.*, 127.x.y.z."""
    n = control.lower(name).rstrip(".")
    if n == "localhost" or n.startswith("localhost.") or n.endswith(".localdomain") or n == "localdomain":
        return True
    parts = n.split(".")
    return len(parts) == 4 and parts[0] == "127" and all(p.isdigit() for p in parts)


def _loopback_host(host: str) -> bool:
    import ipaddress

    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_hosts(home: str) -> list[str] | None:
    """Return the hosts this home's tcpservers listen on (`qmail up`'s and any other supervision's).

    None if no run script of this home runs a tcpserver.
    """
    from pyqmail.admin import status, supervision

    dirs = [os.path.join(home, supervision.UP_SERVICES, n) for n in status.service_names(home) or []]
    dirs += [s.directory for s in supervision.survey(home, 0).services]
    hosts = []
    for d in dirs:
        try:
            with open(os.path.join(d, "run"), "rb") as f:
                where = status.listen_address(f.read(status.RUN_MAX))
        except (OSError, ValueError):
            continue
        if where is not None:
            hosts.append(where.rpartition(":")[0])
    return hosts or None


def loopback_only(home: str, inst: _home.Install) -> bool:
    """Return whether the system listens on loopback alone (`qmail up`'s single-user default)."""
    hosts = listen_hosts(home)
    if hosts is None:
        return inst.single  # nothing written yet: `qmail up` as an ordinary user listens on 127.0.0.1
    return all(_loopback_host(h) for h in hosts)


def check_dns(r: Report, home: str, dns: mx.Lookup, inst: _home.Install | None = None) -> None:
    """control/me should have an address in DNS (a loopback name on a loopback-only system need not)."""
    try:
        me = control.read_line("me")
    except control.ControlError:
        return
    if not me:
        return
    if is_loopback_name(me) and inst is not None and loopback_only(home, inst):
        r.ok(f"control/me {me} is a loopback name, and the system listens on loopback only")
        return
    status, ips = mx.ip_plus(dns, me, 0)
    if status == mx.SOFT:
        r.note(f"could not look {me} (control/me) up in DNS now")
    elif status == mx.HARD or not ips:
        r.problem(f"control/me {me} has no address in DNS: bounces and HELO name a host nobody can reach",
                  f"add an A record for {me}, or put this host's DNS name into {_q(os.path.join(home, 'control', 'me'))}")
    else:
        r.ok(f"{me} resolves to {', '.join(a.ip for a in ips)}")


# --- what runs: supervision, pid files, the socket, the locks, the maildrop -------------

SOCKET = "run/qmail-queue.sock"  # qmail-queued's socket (pyqmail.queue.qmail_queue.SOCKET)
QUEUED_LOCK = "queue/lock/queued"  # qmail-queued's flock'd lock, "PID\n" or "PID p\n"
MAILDROP = "maildrop"  # qmail-queue's drop directory when qmail-queued is away
UP_PID = "run/up.pid"  # `qmail up`'s, flock'd while it runs
SVSCAN_PID = "run/svscan.pid"  # the svscan `qmail up` started
PID_MAX = 64


def _read_pid(path: str) -> int | None:
    """Return the pid at the start of path; None if it holds none. Raise OSError (FileNotFoundError: absent)."""
    with open(path, "rb") as f:
        words = f.read(PID_MAX).split()
    return int(words[0]) if words and words[0].isdigit() and int(words[0]) > 0 else None


def _is_process(pid: int, names: tuple[str, ...]) -> bool | None:
    """Return whether pid runs one of the programs names (by comm or argv); None if it does not exist."""
    from pyqmail.admin import supervision

    try:
        comm = supervision._read(f"/proc/{pid}/comm", 64).decode("latin-1").strip()
        argv = supervision._read(f"/proc/{pid}/cmdline", supervision.CMDLINE_MAX).split(b"\0")
    except FileNotFoundError:
        return None
    except OSError:
        return True  # hidden from us: not ours to call stale
    words = {comm, *(os.path.basename(os.fsdecode(a)) for a in argv[:4] if a)}
    return any(n in words for n in names) or any(n in os.fsdecode(b" ".join(argv[:4])) for n in names)


def check_supervision(r: Report, home: str, now: int) -> None:
    """This home's services wherever they run; two svscans over one directory; two systems for one home."""
    from pyqmail.admin import supervision

    s = supervision.survey(home, now)
    for svc in s.services:
        line = f"service {svc.directory}: {svc.state} ({svc.where()})"
        if svc.up:
            r.ok(line)
        else:
            r.note(line)
    for top, procs in s.scanners().items():
        if len(procs) > 1:
            pids = ", ".join(str(p.pid) for p in procs)
            r.problem(f"{len(procs)} svscan processes (pids {pids}) run over {top}: each starts its own "
                      "supervise, and the second of each pair cannot lock the service",
                      f"kill {' '.join(str(p.pid) for p in procs[1:])}")
    roots: dict[str, list[str]] = {}
    for svc in s.running():
        roots.setdefault(os.path.dirname(svc.directory), []).append(os.path.basename(svc.directory))
    if len(roots) > 1:
        where = "; ".join(f"{top} ({', '.join(names)})" for top, names in roots.items())
        own = os.path.join(home, supervision.UP_SERVICES)
        others = [t for t in roots if t != own]
        fix = (f"qmail down --home {_q(home)}" if own in roots else
               "svc -dx " + " ".join(_q(os.path.join(t, n)) for t in others[1:] for n in roots[t]))
        r.problem(f"two systems run this home's programs, from {where}: the second qmail-send cannot start "
                  "and the second tcpservers cannot bind", fix)


def check_pidfiles(r: Report, home: str) -> None:
    """run/up.pid and run/svscan.pid: present only while what they name runs."""
    for rel, names, what in ((UP_PID, ("qmail",), "qmail up"), (SVSCAN_PID, ("svscan",), "svscan")):
        path = os.path.join(home, rel)
        try:
            pid = _read_pid(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            r.note(f"cannot read {rel}: {errors.describe(e)}")
            continue
        if rel == UP_PID:
            from pyqmail.admin import supervision

            try:
                held = supervision.lock_held(path)
            except OSError as e:
                r.note(f"cannot check {rel}: {errors.describe(e)}")
                continue
            if held:
                r.ok(f"{rel}: qmail up runs (pid {pid})")
                continue
            why = "no `qmail up` holds its lock"
        else:
            alive = None if pid is None else _is_process(pid, names)
            if alive:
                r.ok(f"{rel}: svscan runs (pid {pid})")
                continue
            why = ("it holds no pid" if pid is None else f"pid {pid} does not exist" if alive is None
                   else f"pid {pid} is not {what}")
        r.problem(f"{rel} is stale: {why}; `qmail status` and `qmail down` may act on the wrong process",
                  f"rm {_q(path)}")


def check_socket(r: Report, home: str, inst: _home.Install) -> None:
    """run/qmail-queue.sock answers; qmail-queued's lock with no socket; messages waiting in maildrop/."""
    path = os.path.join(home, SOCKET)
    sock_ok: bool | None = None  # None: no socket file
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        r.note(f"cannot check {SOCKET}: {errors.describe(e)}")
        return
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            r.problem(f"{SOCKET} is not a socket: qmail-queued cannot bind it",
                      f"rm {_q(path)}, then restart qmail-queued")
            sock_ok = False
        else:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(PORT_TIMEOUT)
            try:
                s.connect(path)
                sock_ok = True
                r.ok(f"{SOCKET}: qmail-queued answers")
            except ConnectionRefusedError:
                sock_ok = False
                r.problem(f"{SOCKET} is dangling: nothing listens on it (ECONNREFUSED), so local users' and "
                          "qmail-smtpd's messages go to maildrop/ or fail until qmail-queued runs again",
                          "restart qmail-queued (svc -t its service, or restart qmail-send's service: "
                          "qmail-start starts one)")
            except OSError as e:
                r.note(f"cannot connect to {SOCKET}: {errors.describe(e)}")
            finally:
                s.close()
    from pyqmail.admin import supervision

    lock = os.path.join(home, QUEUED_LOCK)
    try:
        held = supervision.lock_held(lock)
        holder = _read_pid(lock) if held else None
    except OSError as e:
        held, holder = None, None
        if not inst.single:
            r.note(f"cannot check {QUEUED_LOCK}: {errors.describe(e)}; run qmail doctor as root")
    if held and not sock_ok:
        who = f"pid {holder}" if holder else "a process"
        r.problem(f"qmail-queued ({who}) holds {QUEUED_LOCK} but {SOCKET} "
                  f"{'does not exist' if st is None else 'does not answer'}: it accepts nothing",
                  f"kill {holder}   (supervise or qmail-start starts it again)" if holder else
                  f"restart qmail-queued (fuser {_q(lock)} names it)")
    drop = os.path.join(home, MAILDROP)
    try:
        waiting = sum(1 for n in os.listdir(drop) if n.startswith("m"))
    except FileNotFoundError:
        return
    except OSError as e:
        if not inst.single:
            r.note(f"cannot list {MAILDROP}/: {errors.describe(e)}; run qmail doctor as root")
        return
    if waiting and not held:
        r.problem(f"{waiting} message{'s wait' if waiting != 1 else ' waits'} in {MAILDROP}/, start qmail-queued: "
                  "nothing queues them while it is down",
                  "svc -u the qmail-queued service (or start qmail-send's service: qmail-start starts one)")
    elif waiting:
        r.note(f"{waiting} message{'s' if waiting != 1 else ''} in {MAILDROP}/: qmail-queued queues them "
               "within a second")


# --- the TLS certificate -------------------------------------------------------------

def _day(t: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(t))


def check_certs(r: Report, home: str, inst: _home.Install, now: int) -> None:
    """control/servercert.pem: readable by qmail-smtpd's user and no one else, key and certificate a pair, in date."""
    from pyqmail.admin import certs

    path = os.path.join(home, certs.SERVERCERT)
    name = certs.SERVERCERT
    mode = install.cert_mode(inst)
    qmaild = inst.users["qmaild"].name
    own = (f"chmod {mode:o} {_q(path)}" if inst.single
           else f"chown {qmaild}:qmail {_q(path)}; chmod {mode:o} {_q(path)}")
    remake = f"qmail init --new-cert --home {_q(home)}"
    rebuild = f"cat fullchain.pem privkey.pem > {_q(path)}; {own}   (docs/TLS.md)"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        r.note(f"no {name}: qmail-smtpd offers no STARTTLS and qmail-popup no STLS; "
               f"a self-signed one: {remake}; one from a CA: docs/TLS.md")
        return
    except OSError as e:
        r.problem(f"cannot stat {name}: {errors.describe(e)}", own)
        return
    try:
        with open(path, "rb") as f:
            data = f.read(certs.PEM_MAX)
    except PermissionError as e:
        if os.geteuid() != 0 and not inst.single:
            r.note(f"cannot check {name} as this user ({errors.describe(e)}): run qmail doctor as root")
        else:
            r.problem(f"cannot read {name}: {errors.describe(e)}", own)
        return
    except OSError as e:
        r.problem(f"cannot read {name}: {errors.describe(e)}", own)
        return
    if st.st_mode & 0o004 or (inst.single and st.st_mode & 0o040):
        r.problem(f"{name} holds the private key and every user can read it (mode {stat.S_IMODE(st.st_mode):o})",
                  own)
    if not inst.single and os.geteuid() == 0:
        readers = [("qmaild", path, "qmail-smtpd")]
        client = os.path.join(home, certs.CLIENTCERT)
        if os.path.lexists(client):
            readers.append(("qmailr", client, "qmail-remote"))
        for role, p, program in readers:
            acct = inst.users[role]
            err = certs.readable_as(p, acct.uid, acct.gid)
            if err:
                why = os.strerror(err) if 0 < err < 255 else f"exit {err}"
                real = os.path.realpath(p)
                # clientcert.pem linked to servercert.pem (the patch's `make cert`): qmailr reads it as group qmail.
                fix = (own if real == os.path.realpath(path) else
                       f"chown root:qmail {_q(real)}; chmod 640 {_q(real)}")
                r.problem(f"{acct.name} ({program}'s user) cannot read {os.path.relpath(p, home)}: {why}", fix)
    try:
        blocks = certs.read_pem(data)
    except certs.CertError as e:
        r.problem(f"{name} is damaged: {e}", f"{rebuild}, or a self-signed one: {remake}")
        return
    ders = [der for label, der in blocks if label == "CERTIFICATE"]
    if not ders:
        r.problem(f"{name} holds no certificate", f"{rebuild}, or a self-signed one: {remake}")
        return
    if not any(label in certs.KEY_LABELS for label, _der in blocks):
        r.problem(f"{name} holds no private key: the certificate alone cannot serve TLS",
                  f"cat privkey.pem >> {_q(path)}")
        return
    if certs.key_encrypted(blocks, data):
        r.problem(f"the private key in {name} is encrypted: qmail-smtpd has no passphrase to give",
                  "openssl pkey -in privkey.pem -out plain.pem, then "
                  f"cat fullchain.pem plain.pem > {_q(path)}; {own}")
        return
    why_not = certs.key_mismatch(path)
    if why_not is not None:
        r.problem(f"the key in {name} does not belong to its first certificate (OpenSSL: {why_not})",
                  f"the server's own certificate first, with its own key: {rebuild}; or a self-signed one: {remake}")
        return
    try:
        infos = [certs.parse_cert(der) for der in ders]
    except certs.CertError as e:
        r.problem(f"cannot read the certificate in {name}: {e}", f"{rebuild}, or a self-signed one: {remake}")
        return
    leaf = infos[0]
    renew = remake if leaf.self_signed else f"renew it with your ACME client or CA, then {rebuild}"
    names = ", ".join(leaf.names()) or "no host name"
    days = (leaf.not_after - now) // 86400
    if now >= leaf.not_after:
        r.problem(f"the certificate in {name} ({names}) expired on {_day(leaf.not_after)}: "
                  "senders that verify it, and every mail client, refuse it", renew)
    elif leaf.not_after - now < certs.SOON_DAYS * 86400:
        r.problem(f"the certificate in {name} ({names}) expires on {_day(leaf.not_after)}, "
                  f"in {days} day{'s' if days != 1 else ''}", renew)
    elif now < leaf.not_before:
        r.problem(f"the certificate in {name} ({names}) is not valid before {_day(leaf.not_before)}: "
                  "is this system's clock right?", f"check the clock (date -u), or {renew}")
    else:
        r.ok(f"{name}: certificate for {names}, valid until {_day(leaf.not_after)} ({days} days)")
    for info in infos[1:]:
        if now >= info.not_after:
            r.problem(f"a chain certificate in {name} ({info.common_name or 'no name'}) expired on "
                      f"{_day(info.not_after)}", f"your CA's current chain: {rebuild}")
    if leaf.self_signed:
        r.note(f"{name} is self-signed: senders encrypt to it but cannot verify it, mail clients warn; "
               "one from a CA: docs/TLS.md")
    try:
        me = control.read_line("me")
    except control.ControlError:
        me = None  # check_controls reports it
    if me and leaf.names() and not any(certs.name_matches(n, me) for n in leaf.names()):
        r.note(f"the certificate in {name} is for {names}, not control/me ({me}): clients verify the name "
               "they connected to (the MX name for senders using DANE or MTA-STS)")


# --- passwords for smarthosts --------------------------------------------------------------

PASSWORD_FILES = ("smtproutes", "authsenders")


def _has_credentials(name: str) -> bool:
    """Return whether a control file's lines carry SMTP AUTH credentials (pyqmail.remote.auth)."""
    from pyqmail.remote import auth

    lines = control.read_lines(name) or []
    if name == "authsenders":
        return any(auth.split(v)[1] is not None for v in auth.parse_authsenders(lines).values())
    return any(auth.split(line.partition(":")[2])[1] is not None for line in lines if ":" in line)


def check_passwords(r: Report, home: str, inst: _home.Install) -> None:
    """control/smtproutes, control/authsenders with passwords: readable by qmail-remote's user, by no one else."""
    qmailr = inst.users.get("qmailr")
    for name in PASSWORD_FILES:
        path = os.path.join(home, "control", name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            r.problem(f"cannot stat control/{name}: {errors.describe(e)}", f"ls -l {_q(path)}")
            continue
        fix = (f"chmod 600 {_q(path)}" if inst.single or qmailr is None
               else f"chown {qmailr.name} {_q(path)}; chmod 600 {_q(path)}")
        try:
            secret = _has_credentials(name)
        except control.ControlError:
            if os.geteuid() != 0 and not inst.single:
                r.note(f"cannot read control/{name} as this user: run qmail doctor as root")
            else:
                r.problem(f"cannot read control/{name}", fix)
            continue
        if not secret:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o044:
            who = "every user" if mode & 0o004 else "its group"
            r.problem(f"control/{name} holds smarthost passwords and {who} can read it (mode {mode:o})", fix)
            continue
        if not inst.single and qmailr is not None and os.geteuid() == 0:
            from pyqmail.admin import certs

            err = certs.readable_as(path, qmailr.uid, qmailr.gid)
            if err:
                why = os.strerror(err) if 0 < err < 255 else f"exit {err}"
                r.problem(f"{qmailr.name} (qmail-remote's user) cannot read control/{name}: {why}", fix)
                continue
        r.ok(f"control/{name} holds smarthost passwords, readable only by qmail-remote's user")


# --- the command ---------------------------------------------------------------------

def doctor(home: str, dns: mx.Lookup) -> Report:
    """Return the report on the installation in home (already this process's QMAILHOME)."""
    r = Report()
    r.lines.append(f"qmail doctor: checking {home}")
    try:
        inst = _home.install()
    except ValueError as e:
        r.problem(f"conf/install is damaged: {e}", f"qmail init --home {_q(home)}")
        return r
    check_controls(r, home)
    check_compiled(r, home)
    for name, _uid, homedir in local_users(home, inst):
        if check_home(r, name, homedir):
            check_dotqmail_files(r, homedir)
    check_alias(r, inst)
    check_layout(r, home, inst)
    check_ports(r, inst)
    check_supervision(r, home, int(time.time()))
    check_pidfiles(r, home)
    check_socket(r, home, inst)
    check_certs(r, home, inst, int(time.time()))
    check_passwords(r, home, inst)
    check_dns(r, home, dns, inst)
    return r


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Check an installation; print each problem with its fix.")
    p.add_argument("--home", default=None,
                   help=install.HOME_HELP)
    return p


def command(argv: list[str]) -> int:
    """Run `qmail doctor`; return 0 (healthy), 1 (problems) or 100 (usage)."""
    try:
        args = _parser(argv[0]).parse_args(argv[1:])
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    from pyqmail.admin.queue import use_home

    home = use_home(args.home)
    if not os.path.isdir(os.path.join(home, "control")):
        r = Report()
        r.problem(f"no installation in {home}", f"qmail init --home {_q(home)} FQDN")
        durable.write_all(FD_OUT, r.text())
        return EXIT_PROBLEMS
    dns = mx.Resolver.from_env(dict(os.environ))
    dns.lifetime = DNS_LIFETIME
    r = doctor(home, dns)
    durable.write_all(FD_OUT, r.text())
    return EXIT_PROBLEMS if r.problems else EXIT_OK
