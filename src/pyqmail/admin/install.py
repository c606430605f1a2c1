"""`qmail init`: qmail's install and config-fast (or config) in one step.

Lays out QMAILHOME as qmail 1.03's install does (directories, modes and, as
root, owners), records what C qmail compiles in (conf/install), writes one
stub per program into bin/, the boot scripts, the control files config-fast
writes and the alias files. Run by an ordinary user (or with
--single-user) the installation is single-user: everything is owned by and
runs as that user.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, TextIO

from pyqmail import durable, spawn
from pyqmail import home as _home
from pyqmail.queue import layout

DEFAULT_SPLIT = 23
ROLE_GROUPS = {"alias": "nofiles", "qmaild": "nofiles", "qmaill": "nofiles", "qmailp": "nofiles",
               "qmailq": "qmail", "qmailr": "qmail", "qmails": "qmail"}
ALIAS_FILES = (".qmail-postmaster", ".qmail-mailer-daemon", ".qmail-root")
CONTROL_FILES = ("me", "defaultdomain", "plusdomain", "locals", "rcpthosts")


class InstallError(Exception):
    """The installation cannot be made as asked; the message says why and what to do."""


@dataclass(slots=True)
class Options:
    """What `qmail init` was asked to do."""

    home: str
    fqdn: str | None = None
    user: str | None = None
    split: int = DEFAULT_SPLIT
    force: bool = False
    create_users: bool = False
    single_user: bool = False


def default_home() -> str:
    """Return the home `qmail` commands use without --home."""
    env = os.environ.get("QMAILHOME")
    if env:
        return env
    if os.geteuid() == 0:
        return _home.DEFAULT_HOME
    return os.path.join(os.path.expanduser("~"), "qmail")


# --- derived control values, as config-fast computes them ---------------------

def default_domain(fqdn: str) -> str:
    """control/defaultdomain: the FQDN without its first label, if it has three or more."""
    parts = fqdn.split(".")
    if len(parts) >= 3:
        return ".".join(parts[1:])
    return fqdn


def plus_domain(fqdn: str) -> str:
    """control/plusdomain: the last two labels of the FQDN, if it has three or more."""
    parts = fqdn.split(".")
    if len(parts) >= 3:
        return ".".join(parts[-2:])
    return fqdn


def find_fqdn(out: TextIO) -> str:
    """Find this host's name as qmail's config does: the hostname, then DNS."""
    host = socket.gethostname()
    print(f"Your hostname is {host}.", file=out)
    try:
        infos = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM, 0, socket.AI_CANONNAME)
        canon = next((i[3] for i in infos if i[3]), "")
    except OSError:
        canon = ""
    if not canon or "." not in canon:
        if "." in host:
            canon = host
        else:
            raise InstallError(
                "Sorry, I couldn't find your host's canonical name in DNS.\n"
                "You will have to set up control/me yourself: run qmail init with the\n"
                "fully qualified name as argument, e.g. qmail init mail.example.com")
    print(f"Your host's fully qualified name in DNS is {canon}.", file=out)
    return canon.rstrip(".").lower()


# --- users ---------------------------------------------------------------------

def _lookup_users(create: bool, out: TextIO) -> _home.Install:
    missing_groups = [g for g in ("nofiles", "qmail") if not _group_exists(g)]
    missing_users = [u for u in ROLE_GROUPS if not _user_exists(u)]
    if (missing_groups or missing_users) and not create:
        raise InstallError(
            "qmail init: fatal: missing "
            + ", ".join([f"group {g}" for g in missing_groups] + [f"user {u}" for u in missing_users])
            + "\nRerun with --create-users to create them (as qmail's INSTALL does), "
              "or with --single-user for a single-user installation.")
    return _ensure_users(missing_groups, missing_users, out)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _run(cmd: list[str], out: TextIO) -> None:
    print(" ".join(cmd), file=out)
    try:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        raise InstallError(f"qmail init: fatal: {' '.join(cmd)} failed: {e}") from None


def _ensure_users(missing_groups: list[str], missing_users: list[str], out: TextIO,
                  system_home: str = _home.DEFAULT_HOME) -> _home.Install:
    for g in missing_groups:
        _run(["groupadd", "--system", g], out)
    for u in missing_users:
        home_dir = os.path.join(system_home, "alias") if u == "alias" else system_home
        _run(["useradd", "--system", "-M", "-d", home_dir, "-s", "/bin/false",
              "-g", ROLE_GROUPS[u], u], out)
    users = {}
    for role in ROLE_GROUPS:
        pw = pwd.getpwnam(role)
        users[role] = _home.Account(role, pw.pw_uid, pw.pw_gid, pw.pw_dir)
    groups = {g: grp.getgrnam(g).gr_gid for g in ("qmail", "nofiles")}
    return _home.Install(False, DEFAULT_SPLIT, users, groups)


def _single_user(qmail_home: str) -> _home.Install:
    uid, gid = os.getuid(), os.getgid()
    name = pwd.getpwuid(uid).pw_name
    users = {role: _home.Account(name, uid, gid, os.path.join(qmail_home, "alias") if role == "alias" else qmail_home)
             for role in ROLE_GROUPS}
    return _home.Install(True, DEFAULT_SPLIT, users, {"qmail": gid, "nofiles": gid})


# --- the layout ----------------------------------------------------------------

class _Layout:
    """Make directories and files with qmail's modes and, as root, owners."""

    def __init__(self, qmail_home: str, inst: _home.Install) -> None:
        self.home = qmail_home
        self.inst = inst
        self.gid_q = inst.groups.get("qmail", os.getgid())

    def owner(self, role: str) -> int:
        if role == "root":
            return 0 if not self.inst.single else os.getuid()
        return self.inst.uid(role)

    def _own(self, path: str, role: str, mode: int) -> None:
        if not self.inst.single:
            os.lchown(path, self.owner(role), self.gid_q)
        os.chmod(path, mode)

    def d(self, rel: str, role: str, mode: int) -> None:
        path = os.path.join(self.home, rel)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not os.path.isdir(path) or os.path.islink(path):
                raise InstallError(f"qmail init: fatal: {path} exists and is not a directory") from None
        self._own(path, role, mode)

    def dsplit(self, rel: str, role: str, mode: int) -> None:
        self.d(rel, role, mode)
        for i in range(self.inst.split):
            self.d(f"{rel}/{i}", role, mode)

    def z(self, rel: str, size: int, role: str, mode: int) -> None:
        """A file of size zero bytes, made only if missing."""
        path = os.path.join(self.home, rel)
        try:
            fd = durable.create_excl(path, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                durable.write_all(fd, b"\0" * size)
                os.fsync(fd)
            finally:
                os.close(fd)
        self._own(path, role, mode)

    def fifo(self, rel: str, role: str, mode: int) -> None:
        path = os.path.join(self.home, rel)
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:
            if not stat.S_ISFIFO(os.lstat(path).st_mode):
                raise InstallError(f"qmail init: fatal: {path} exists and is not a named pipe") from None
        self._own(path, role, mode)

    def file(self, rel: str, text: str, role: str, mode: int, replace: bool = True) -> bool:
        """Write text to rel atomically; with replace False keep an existing file. Return True if written."""
        path = os.path.join(self.home, rel)
        if not replace and os.path.lexists(path):
            return False
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            durable.write_all(fd, text.encode("latin-1" if rel.startswith("control/") else "utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._own(tmp, role, mode)
        os.rename(tmp, path)
        return True


def make_layout(lay: _Layout) -> None:
    """Create the directories and queue of qmail 1.03's install."""
    lay.d("", "root", 0o755)
    for rel in ("control", "users", "bin", "boot", "conf"):
        lay.d(rel, "root", 0o755)
    lay.d("alias", "alias", 0o2755)
    lay.d("run", "qmailq", 0o755)
    lay.d("queue", "qmailq", 0o750)
    lay.d("queue/pid", "qmailq", 0o700)
    lay.d("queue/intd", "qmailq", 0o700)
    lay.d("queue/todo", "qmailq", 0o750)
    lay.d("queue/bounce", "qmails", 0o700)
    lay.dsplit("queue/mess", "qmailq", 0o750)
    lay.dsplit("queue/info", "qmails", 0o700)
    lay.dsplit("queue/local", "qmails", 0o700)
    lay.dsplit("queue/remote", "qmails", 0o700)
    lay.d("queue/lock", "qmailq", 0o750)
    lay.z("queue/" + layout.TCPTO, layout.TCPTO_SIZE, "qmailr", 0o644)
    lay.z("queue/" + layout.SENDMUTEX, 0, "qmails", 0o600)
    lay.fifo("queue/" + layout.TRIGGER, "qmails", 0o622)


# --- programs ------------------------------------------------------------------

def programs() -> dict[str, str]:
    """Return {program name: module} from the console-script table of pyproject.toml."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        eps = distribution("pyqmail").entry_points
        found = {ep.name: ep.value.split(":")[0] for ep in eps if ep.group == "console_scripts"}
        if found:
            return found
    except PackageNotFoundError:
        pass
    import tomllib

    pyproject = os.path.join(os.path.dirname(__file__), "..", "..", "..", "pyproject.toml")
    with open(pyproject, "rb") as f:
        table = tomllib.load(f)["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in table.items()}


def _package_paths() -> list[str]:
    import pyqmail

    src = os.path.dirname(os.path.dirname(os.path.abspath(pyqmail.__file__)))
    paths = [src]
    for p in sys.path:
        if p.endswith("site-packages") and p not in paths and os.path.isdir(p):
            paths.append(p)
    return paths


def write_stubs(lay: _Layout) -> list[str]:
    """Write QMAILHOME/bin/NAME for every program; return the names."""
    python = os.path.realpath(sys.executable)
    paths = _package_paths()
    names = []
    for name, module in sorted(programs().items()):
        lay.file(f"bin/{name}", spawn.stub_text(python, paths, name, module, lay.home), "root", 0o755)
        names.append(name)
    return names


# --- init ----------------------------------------------------------------------

def init(opts: Options, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Install and configure a qmail home; return 0, or 100 with the reason on err."""
    try:
        _init(opts, out)
    except InstallError as e:
        print(str(e), file=err)
        return 100
    except OSError as e:
        print(f"qmail init: fatal: {e}", file=err)
        return 111
    return 0


def _init(opts: Options, out: TextIO) -> None:
    qmail_home = os.path.abspath(opts.home)
    if opts.split < 1:
        raise InstallError("qmail init: fatal: --split must be at least 1")
    existing = [f for f in CONTROL_FILES if os.path.lexists(os.path.join(qmail_home, "control", f))]
    if existing and not opts.force:
        raise InstallError(
            "qmail init: fatal: control files exist: "
            + ", ".join(f"control/{f}" for f in existing)
            + f" in {qmail_home}\nRerun with --force to overwrite them.")
    fqdn = opts.fqdn if opts.fqdn else find_fqdn(out)
    if not fqdn or any(c.isspace() for c in fqdn) or "/" in fqdn:
        raise InstallError(f"qmail init: fatal: not a host name: {fqdn!r}")

    root_mode = os.geteuid() == 0 and not opts.single_user
    if root_mode:
        inst = _lookup_users(opts.create_users, out)
    else:
        inst = _single_user(qmail_home)
    # The alias user's home is this installation's alias/ whatever passwd says,
    # so that several installations can live side by side (the book's chapter 5).
    alias_dir = os.path.join(qmail_home, "alias")
    passwd_alias = inst.users.get("alias")
    if root_mode and passwd_alias is not None and os.path.normpath(passwd_alias.home) != alias_dir:
        print(f"Mail for postmaster, root and mailer-daemon goes by the files in {alias_dir}/ "
              f"(the alias user's passwd home, {passwd_alias.home}, is not used).", file=out)
    users = {role: _home.Account(a.name, a.uid, a.gid,
                                 os.path.join(qmail_home, "alias") if role == "alias" else qmail_home)
             for role, a in inst.users.items()}
    inst = _home.Install(inst.single, opts.split, users, inst.groups)
    if opts.user:
        try:
            pwd.getpwnam(opts.user)
        except KeyError:
            print(f"qmail init: warning: no system account named {opts.user}", file=out)

    os.makedirs(os.path.dirname(qmail_home) or "/", exist_ok=True)
    lay = _Layout(qmail_home, inst)
    make_layout(lay)
    lay.file("conf/install", _home.format_install(inst), "root", 0o644)
    write_stubs(lay)
    for name, text in __import__("pyqmail.admin.boot", fromlist=["scripts"]).scripts(qmail_home).items():
        lay.file(f"boot/{name}", text, "root", 0o755)
    _config_fast(lay, fqdn, out)
    user = opts.user
    if user is None and inst.single:
        user = pwd.getpwuid(os.getuid()).pw_name
    for name in ALIAS_FILES:
        lay.file(f"alias/{name}", f"&{user}\n" if user else "", "root", 0o644, replace=opts.force)


def _config_fast(lay: _Layout, fqdn: str, out: TextIO) -> None:
    print(f"Your fully qualified host name is {fqdn}.", file=out)
    print(f"Putting {fqdn} into control/me...", file=out)
    lay.file("control/me", fqdn + "\n", "root", 0o644)
    ddom = default_domain(fqdn)
    print(f"Putting {ddom} into control/defaultdomain...", file=out)
    lay.file("control/defaultdomain", ddom + "\n", "root", 0o644)
    pdom = plus_domain(fqdn)
    print(f"Putting {pdom} into control/plusdomain...", file=out)
    lay.file("control/plusdomain", pdom + "\n", "root", 0o644)
    print(f"Putting {fqdn} into control/locals...", file=out)
    lay.file("control/locals", fqdn + "\n", "root", 0o644)
    print(f"Putting {fqdn} into control/rcpthosts...", file=out)
    lay.file("control/rcpthosts", fqdn + "\n", "root", 0o644)
    print(f"Now qmail will refuse to accept SMTP messages except to {fqdn}.", file=out)
    print("Make sure to change rcpthosts if you add hosts to locals or virtualdomains!", file=out)
