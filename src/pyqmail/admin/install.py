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
    upgrade: bool = False
    new_cert: bool = False
    todo: str = ""  # "flat": intd/ and todo/ as qmail 1.03's; "big": split (a flat queue converted); "": default


HOME_HELP = ("the installation (default: $QMAILHOME, else the home of the bin/qmail stub that runs, "
             "else /var/qmail as root; an ordinary user: the checkout's qmail-home, as ./run, or ~/qmail)")


def default_home() -> str:
    """Return the home an admin command uses without --home.

    $QMAILHOME, else the home named by the QMAILHOME/bin stub that started
    this process, else /var/qmail as root; for an ordinary user the
    qmail-home directory of the source checkout pyqmail runs from (where
    ./run keeps it), or ~/qmail when pyqmail is installed as a package.
    """
    env = os.environ.get("QMAILHOME")
    if env:
        return env
    stub = _home.stub_home()
    if stub:
        return stub
    if os.geteuid() == 0:
        return _home.DEFAULT_HOME
    checkout = _checkout()
    if checkout is not None:
        return os.path.join(checkout, CHECKOUT_HOME)
    return os.path.join(os.path.expanduser("~"), "qmail")


CHECKOUT_HOME = "qmail-home"  # ./run's home in a source checkout


def _checkout() -> str | None:
    """Return the source checkout this pyqmail runs from (it has ./run and src/pyqmail); None otherwise."""
    import pyqmail

    pkg = os.path.dirname(os.path.abspath(pyqmail.__file__))
    src = os.path.dirname(pkg)
    top = os.path.dirname(src)
    if os.path.basename(src) == "src" and os.path.isfile(os.path.join(top, "run")) \
            and os.path.isfile(os.path.join(top, "pyproject.toml")):
        return top
    return None


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


def make_layout(lay: _Layout, bigtodo: bool | None = None) -> None:
    """Create the directories and queue of qmail 1.03's install.

    bigtodo: intd/ and todo/ split as mess/ (the big-todo layout), or flat as
    qmail 1.03's; None: as the queue already is, big-todo for a new queue.
    """
    if bigtodo is None:
        bigtodo = queue_bigtodo(lay.home)
    lay.d("", "root", 0o755)
    for rel in ("control", "users", "bin", "boot", "conf"):
        lay.d(rel, "root", 0o755)
    lay.d("alias", "alias", 0o2755)
    lay.d("run", "qmailq", 0o755)
    if not lay.inst.single:  # qmail-queue's fallback when qmail-queued is down (pyqmail.queue.maildrop)
        lay.d("maildrop", "qmailq", 0o3733)
    lay.d("authenticated", "root", 0o755)  # POP-before-SMTP stamps: only the POP3 service's user writes (pop3.relay)
    lay.d("queue", "qmailq", 0o750)
    lay.d("queue/pid", "qmailq", 0o700)
    if bigtodo:
        lay.dsplit("queue/intd", "qmailq", 0o700)
        lay.dsplit("queue/todo", "qmailq", 0o750)
    else:
        lay.d("queue/intd", "qmailq", 0o700)
        lay.d("queue/todo", "qmailq", 0o750)
    lay.d("queue/bounce", "qmails", 0o700)
    lay.dsplit("queue/mess", "qmailq", 0o750)
    lay.dsplit("queue/info", "qmails", 0o700)
    lay.dsplit("queue/local", "qmails", 0o700)
    lay.dsplit("queue/remote", "qmails", 0o700)
    lay.d("queue/lock", "qmailq", 0o750)
    lay.z("queue/" + layout.TCPTO, layout.TCPTO_SIZE, "qmailr", 0o644)
    lay.z("queue/" + layout.TCPTO6, layout.TCPTO6_SIZE, "qmailr", 0o644)
    lay.d("queue/mtasts", "qmailr", 0o700)  # qmail-remote's MTA-STS policy cache (pyqmail.remote.mtasts)
    lay.z("queue/" + layout.SENDMUTEX, 0, "qmails", 0o600)
    lay.fifo("queue/" + layout.TRIGGER, "qmails", 0o622)


def queue_bigtodo(qmail_home: str) -> bool:
    """Return True if the home's queue is big-todo, or has no todo/ yet (a new queue is made so)."""
    queue = os.path.join(qmail_home, "queue")
    if not os.path.isdir(os.path.join(queue, "todo")):
        return True
    return layout.is_bigtodo(queue)


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


# --- the code: a private copy of pyqmail and its dependencies ----------------

LIB_DIR = "lib"
_LIB_PREFIX = "pyqmail-"
_STUB_PROBE = "qmail"  # the stub whose text tells which lib dir the stubs use


class _LibFile:
    """One file of a lib dir: its path inside it, its bytes, the file it comes from (if any) and its mtime then.

    The mtime is the one the bytes were read with (fstat of the same open file):
    a source edited after the read must neither lend its new mtime to the old
    bytes nor its new bytecode to them.
    """

    __slots__ = ("rel", "data", "src", "mtime_ns")

    def __init__(self, rel: str, data: bytes, src: str | None, mtime_ns: int | None = None) -> None:
        self.rel = rel
        self.data = data
        self.src = src
        self.mtime_ns = mtime_ns


def base_python() -> str:
    """Return the interpreter stubs run: the running one's base, not a venv's symlink to it."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    real = os.path.realpath(exe)
    if not os.access(real, os.X_OK):
        raise InstallError(f"qmail init: fatal: cannot run the base interpreter {real}")
    return real


def _requirement_names(reqs: list[str] | None) -> list[str]:
    """Return the distribution names a distribution needs at run time (extras left out)."""
    import re

    names = []
    for req in reqs or []:
        marker = req.partition(";")[2]
        if "extra" in marker:
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
        if m:
            names.append(m.group(1))
    return names


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _read_file(rel: str, src: str) -> _LibFile:
    """Read src for the lib dir as rel, with the mtime of what was read."""
    with open(src, "rb") as f:
        mtime_ns = os.fstat(f.fileno()).st_mtime_ns
        data = f.read()
    return _LibFile(rel, data, src, mtime_ns)


def _lib_files() -> tuple[str, list[_LibFile]]:
    """Return pyqmail's version and the files of a lib dir: the package, its dist-info, its dependencies.

    The pyqmail package is copied from the directory it runs from (an
    editable install is the checkout's src/pyqmail itself); each dependency
    from the files its installed distribution lists. Raise InstallError if a
    dependency is not installed.
    """
    from importlib import metadata

    import pyqmail

    files: dict[str, _LibFile] = {}
    pkg = os.path.dirname(os.path.abspath(pyqmail.__file__))
    for dirpath, dirnames, filenames in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in filenames:
            if fn.endswith((".pyc", ".pyo")):
                continue
            src = os.path.join(dirpath, fn)
            if not os.path.isfile(src):
                continue
            rel = os.path.join("pyqmail", os.path.relpath(src, pkg))
            files[rel] = _read_file(rel, src)
    try:
        dist = metadata.distribution("pyqmail")
        version = dist.version
        meta = dist.read_text("METADATA") or f"Metadata-Version: 2.1\nName: pyqmail\nVersion: {version}\n"
        eps = dist.read_text("entry_points.txt") or ""
        needs = _requirement_names(dist.requires)
    except metadata.PackageNotFoundError:
        # Running from a source tree without installation: pyproject.toml says it all.
        import tomllib

        with open(os.path.join(pkg, "..", "..", "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)["project"]
        version = project["version"]
        meta = f"Metadata-Version: 2.1\nName: pyqmail\nVersion: {version}\n"
        eps = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in project["scripts"].items())
        needs = _requirement_names(project.get("dependencies"))
    info = f"pyqmail-{version}.dist-info"
    for name, text in (("METADATA", meta), ("entry_points.txt", eps), ("top_level.txt", "pyqmail\n")):
        files[f"{info}/{name}"] = _LibFile(f"{info}/{name}", text.encode("utf-8"), None)
    seen = {"pyqmail"}
    while needs:
        name = needs.pop()
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            dep = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise InstallError(f"qmail init: fatal: pyqmail needs {name}, which the running Python "
                               f"({sys.executable}) does not have: pip install {name}") from None
        for pp in dep.files or []:
            rel = pp.as_posix()
            if rel.startswith("../") or rel.startswith("/") or "__pycache__" in rel or rel.endswith((".pyc", ".pyo")):
                continue  # scripts outside site-packages; bytecode is made afresh
            src = str(pp.locate())
            if os.path.isfile(src):
                files[rel] = _read_file(rel, src)
        needs.extend(_requirement_names(dep.requires))
    return version, [files[k] for k in sorted(files)]


def _pyc_if_valid(f: _LibFile) -> bytes | None:
    """Return the bytecode cached beside f's source if it is valid for the bytes read (timestamp-checked).

    The check is against the mtime and size f was read with, and the source
    must still have that mtime: bytecode of a source edited since the read
    is not taken for the old bytes.
    """
    import importlib.util

    if f.src is None or f.mtime_ns is None:
        return None
    try:
        data = _read(importlib.util.cache_from_source(f.src))
        now = os.stat(f.src).st_mtime_ns
    except (OSError, ValueError):
        return None
    seconds = f.mtime_ns // 1_000_000_000
    if (now == f.mtime_ns and len(data) >= 16 and data[:4] == importlib.util.MAGIC_NUMBER
            and data[4:8] == b"\0\0\0\0"
            and int.from_bytes(data[8:12], "little") == seconds & 0xFFFFFFFF
            and int.from_bytes(data[12:16], "little") == len(f.data) & 0xFFFFFFFF):
        return data
    return None


def _build_lib(tmp: str, files: list[_LibFile]) -> None:
    """Write files under tmp with 0755 directories and 0644 files, bytecode compiled beside them.

    Each copied file keeps its source's mtime so that the source's valid
    bytecode can be copied too; the rest is compiled here, so that no
    program ever writes a __pycache__ into the lib dir (as root under umask
    077 that would make a cache other users cannot read).
    """
    import importlib.util
    import py_compile

    made: set[str] = set()

    def mkdirs(d: str) -> None:
        if d in made or d == tmp:
            return
        mkdirs(os.path.dirname(d))
        os.mkdir(d, 0o755)
        os.chmod(d, 0o755)
        made.add(d)

    def write(path: str, data: bytes, mtime_ns: int | None) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            durable.write_all(fd, data)
            os.fsync(fd)
            os.fchmod(fd, 0o644)
            if mtime_ns is not None:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    for f in files:
        dst = os.path.join(tmp, f.rel)
        mkdirs(os.path.dirname(dst))
        write(dst, f.data, f.mtime_ns)
        if not f.rel.endswith(".py"):
            continue
        cfile = importlib.util.cache_from_source(dst)
        mkdirs(os.path.dirname(cfile))
        pyc = _pyc_if_valid(f)
        if pyc is not None:
            write(cfile, pyc, None)
            continue
        try:
            py_compile.compile(dst, cfile=cfile, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        except py_compile.PyCompileError as e:
            raise InstallError(f"qmail init: fatal: cannot compile {f.src or f.rel}: {e.msg}") from None
        os.chmod(cfile, 0o644)
    for d in sorted(made, reverse=True):
        durable.fsync_dir(d)


def lib_cache() -> str | None:
    """Return the directory of lib dirs kept in the running venv for hard links, or None outside a venv."""
    if sys.prefix == sys.base_prefix:
        return None
    return os.path.join(sys.prefix, "share", "pyqmail", "libs")


def _trusted_path(path: str) -> bool:
    """Say whether path and every directory above it are owned by us or root and writable by no one else."""
    me = os.geteuid()
    p = os.path.realpath(path)
    while True:
        try:
            st = os.stat(p)
        except OSError:
            return False
        if st.st_uid not in (0, me) or (st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX)):
            return False
        if p == "/":
            return True
        p = os.path.dirname(p)


def _link_lib(cached: str, tmp: str) -> bool:
    """Fill tmp with hard links to the files of the lib dir cached; return False if any cannot be used.

    A file is linked only if it is a regular 0644 file owned by us: a lib dir
    stays ours and read-only to everyone else whoever can write the cache's
    surroundings.
    """
    me = os.geteuid()
    for dirpath, dirnames, filenames in os.walk(cached):
        rel = os.path.relpath(dirpath, cached)
        for d in dirnames:
            os.mkdir(os.path.join(tmp, rel, d), 0o755)
            os.chmod(os.path.join(tmp, rel, d), 0o755)
        for fn in filenames:
            src = os.path.join(dirpath, fn)
            st = os.lstat(src)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != me or stat.S_IMODE(st.st_mode) != 0o644:
                return False
            os.link(src, os.path.join(tmp, rel, fn), follow_symlinks=False)
    for dirpath, _dirnames, _filenames in os.walk(tmp):
        durable.fsync_dir(dirpath)
    return True


def _cache_lib(lib: str, cache: str, replace: bool = False) -> None:
    """Keep lib in the cache by hard links (replacing what the cache held) for the next homes to link to.

    With replace, a cached lib dir of the same name that could not be linked
    from is replaced: a hard link shares its inode's owner, so a home whose
    files were chowned after `qmail init` takes the cache's files along.
    """
    import shutil

    name = os.path.basename(lib)
    if os.path.isdir(os.path.join(cache, name)):
        if not replace:
            return
        stale = os.path.join(cache, f".stale-{name}-{os.getpid()}")
        os.rename(os.path.join(cache, name), stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(cache, 0o755, exist_ok=True)
    tmp = os.path.join(cache, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.mkdir(tmp, 0o755)
        for dirpath, dirnames, filenames in os.walk(lib):
            rel = os.path.relpath(dirpath, lib)
            for d in dirnames:
                os.mkdir(os.path.join(tmp, rel, d), 0o755)
            for fn in filenames:
                os.link(os.path.join(dirpath, fn), os.path.join(tmp, rel, fn), follow_symlinks=False)
        os.rename(tmp, os.path.join(cache, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Homes hold their own links: removing older cached lib dirs costs them nothing.
    for old in os.listdir(cache):
        if old != name and not old.startswith((".tmp-", ".stale-")):
            shutil.rmtree(os.path.join(cache, old), ignore_errors=True)


def install_lib(lay: _Layout) -> str:
    """Install the running pyqmail and its dependencies as QMAILHOME/lib/pyqmail-VERSION-HASH; return its path.

    The name carries a hash of the content: an identical lib dir already
    there is used as it is. A new one is built beside it and renamed into
    place, so a lib dir that exists is complete. When the running venv keeps
    an identical lib dir on the same filesystem (lib_cache()), the new one is
    made of hard links to it, else copied; a copy is then kept there.
    """
    import hashlib
    import shutil

    version, files = _lib_files()
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.rel}\0{len(f.data)}\0".encode("utf-8", "surrogateescape"))
        h.update(f.data)
    name = f"{_LIB_PREFIX}{version}-{h.hexdigest()[:16]}"
    lay.d(LIB_DIR, "root", 0o755)
    libroot = os.path.join(lay.home, LIB_DIR)
    final = os.path.join(libroot, name)
    if os.path.isdir(final):
        return final
    tmp = os.path.join(libroot, f".tmp-{name}-{os.getpid()}")
    cache = lib_cache()
    cached = os.path.join(cache, name) if cache is not None else None
    linked = False
    tried = False
    try:
        if cached is not None and os.path.isdir(cached) and (lay.inst.single or _trusted_path(cached)):
            tried = True
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt of this same pid
            os.mkdir(tmp, 0o755)
            os.chmod(tmp, 0o755)
            try:
                linked = _link_lib(cached, tmp)
            except OSError:
                linked = False  # another filesystem, or the cache changed under us: copy instead
        if not linked:
            shutil.rmtree(tmp, ignore_errors=True)
            os.mkdir(tmp, 0o755)
            os.chmod(tmp, 0o755)
            _build_lib(tmp, files)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    durable.fsync_dir(libroot)
    if cache is not None and not linked:
        try:
            _cache_lib(final, cache, replace=tried)
        except OSError:
            pass  # the cache only saves the next `qmail init` time; without it that one copies
    return final


def stub_lib(path: str) -> str | None:
    """Return the lib dir the stub at path puts on sys.path, or None (not a stub, or an older stub)."""
    import ast

    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            head = f.read(4096)
    except OSError:
        return None
    for line in head.splitlines():
        if line.startswith("sys.path[0:0] = "):
            try:
                paths = ast.literal_eval(line.partition(" = ")[2])
            except (ValueError, SyntaxError):
                return None
            if isinstance(paths, list) and paths and isinstance(paths[0], str):
                return paths[0]
    return None


def _stub_processes(qmail_home: str) -> list[float]:
    """Return the start times (seconds since the epoch) of running processes started by this home's stubs."""
    bindir = os.path.realpath(os.path.join(qmail_home, "bin")) + "/"
    try:
        with open("/proc/stat", encoding="ascii") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        hz = os.sysconf("SC_CLK_TCK")
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except (OSError, StopIteration, ValueError):
        return [0.0]  # cannot tell: assume something old runs
    starts = []
    for pid in pids:
        try:
            # Programs retitle themselves (pyqmail.proctitle): argv[0] is then the stub's path,
            # with the rest in one space-separated string; exec'd, argv[2] is.
            argv = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").split()[:4]
            stat_ = _read(f"/proc/{pid}/stat")
        except OSError:
            continue  # gone, or not ours to read
        if not any(a.startswith(b"/") and os.path.realpath(os.fsdecode(a)).startswith(bindir) for a in argv):
            continue
        fields = stat_.rpartition(b")")[2].split()
        starts.append(btime + int(fields[19]) / hz)  # field 22: starttime, in clock ticks since boot
    return starts


def prune_libs(qmail_home: str, keep: set[str], since: float | None) -> list[str]:
    """Remove lib dirs not in keep, unless a process of this home's stubs started before `since` runs.

    `since` is when the lib dir the stubs used until now became current (None:
    no earlier lib dir). A process started earlier may still be running code
    from an older lib dir and import from it lazily, so then every lib dir is
    kept. Return the names removed.
    """
    import shutil

    libroot = os.path.join(qmail_home, LIB_DIR)
    try:
        names = os.listdir(libroot)
    except FileNotFoundError:
        return []
    old = [n for n in names if n.startswith(_LIB_PREFIX) and os.path.join(libroot, n) not in keep]
    if not old:
        return []
    if since is not None and any(start < since for start in _stub_processes(qmail_home)):
        return []
    for n in old:
        shutil.rmtree(os.path.join(libroot, n))
    return old


def write_stubs(lay: _Layout, lib: str) -> list[str]:
    """Write QMAILHOME/bin/NAME for every program, running base_python() on lib; return the names."""
    python = base_python()
    names = []
    for name, module in sorted(programs().items()):
        lay.file(f"bin/{name}", spawn.stub_text(python, [lib], name, module, lay.home), "root", 0o755)
        names.append(name)
    return names


def install_code(lay: _Layout) -> str:
    """Install the lib dir, point every stub at it, remove lib dirs no longer used; return the lib dir."""
    probe = os.path.join(lay.home, "bin", _STUB_PROBE)
    previous = stub_lib(probe)
    try:
        since: float | None = os.stat(probe).st_mtime if previous is not None else None
    except OSError:
        since = None
    lib = install_lib(lay)
    write_stubs(lay, lib)
    keep = {lib}
    if previous is not None:
        keep.add(previous)
    prune_libs(lay.home, keep, since)
    return lib


def upgrade(qmail_home: str, out: TextIO, todo: str = "") -> str:
    """Install the running pyqmail into an existing home (`qmail init --upgrade`); return the new lib dir.

    As qmail's `make setup` over a running installation: directories and
    modes again, the code (a new lib dir), stubs and boot scripts; control
    files, alias files, users, conf/install and the queue stay as they are,
    and nothing is restarted. Raise InstallError if qmail_home is no home.
    """
    qmail_home = os.path.abspath(qmail_home)
    try:
        with open(os.path.join(qmail_home, _home.INSTALL_FILE), encoding="utf-8") as f:
            inst = _home.parse_install(f.read())
    except FileNotFoundError:
        raise InstallError(f"qmail init: fatal: {qmail_home} is not a pyqmail home (no {_home.INSTALL_FILE}): "
                           f"run qmail init --home {qmail_home} FQDN") from None
    except ValueError as e:
        raise InstallError(f"qmail init: fatal: {e}") from None
    if not inst.single and os.geteuid() != 0:
        raise InstallError(f"qmail init: fatal: {qmail_home} is a root-mode home: upgrade it as root")
    lay = _Layout(qmail_home, inst)
    if todo == "flat" and queue_bigtodo(qmail_home):
        raise InstallError("qmail init: fatal: --flat-todo: the queue is big-todo already; "
                           "a split todo/ is not made flat again")
    # The queue keeps its layout; --big-todo converts a flat one: the
    # subdirectories are made, and messages waiting in the flat places are
    # still read from there (pyqmail.queue.layout).
    make_layout(lay, True if todo == "big" else None)
    previous = stub_lib(os.path.join(qmail_home, "bin", _STUB_PROBE))
    lib = install_code(lay)
    for name, text in __import__("pyqmail.admin.boot", fromlist=["scripts"]).scripts(qmail_home).items():
        lay.file(f"boot/{name}", text, "root", 0o755)
    # The new version's pages, as qmail's `make setup` installs them.
    __import__("pyqmail.admin.manpages", fromlist=["install"]).install(qmail_home)
    _upgrade_cert(lay, out)
    if previous == lib:
        print(f"{qmail_home} already runs {os.path.basename(lib)}; stubs rewritten.", file=out)
    else:
        print(f"Installed {lib}; the stubs in {qmail_home}/bin now run it.", file=out)
        print("Running programs keep the code they started with: restart them when convenient "
              "(svc -t for each service, or qmail down and qmail up).", file=out)
    return lib


# --- init ----------------------------------------------------------------------

def init(opts: Options, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Install and configure a qmail home; return 0, or 100 with the reason on err."""
    try:
        if opts.new_cert:
            new_cert(opts.home, out)
        elif opts.upgrade:
            upgrade(opts.home, out, opts.todo)
        else:
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
    make_layout(lay, {"flat": False, "big": True}.get(opts.todo))
    lay.file("conf/install", _home.format_install(inst), "root", 0o644)
    install_code(lay)
    for name, text in __import__("pyqmail.admin.boot", fromlist=["scripts"]).scripts(qmail_home).items():
        lay.file(f"boot/{name}", text, "root", 0o755)
    __import__("pyqmail.admin.manpages", fromlist=["install"]).install(qmail_home)
    _config_fast(lay, fqdn, out)
    install_cert(lay, fqdn, out)
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


# --- the TLS certificate ---------------------------------------------------------

CERT_ROLE = "qmaild"  # qmail-smtpd's user owns it, group qmail, 0640: the qmail-tls patch's `make cert`


def cert_mode(inst: _home.Install) -> int:
    """Return servercert.pem's mode: 0640 (qmaild, group qmail) as root, 0600 in a single-user home."""
    return 0o600 if inst.single else 0o640


def install_cert(lay: _Layout, fqdn: str, out: TextIO, replace: bool = False) -> bool:
    """Make control/servercert.pem, a self-signed certificate for fqdn, unless one exists; return True if made.

    replace: make a new one anyway, the old one kept as servercert.pem.old.
    Without the openssl program (or if it fails) say so and what to run
    later, and return False: the installation works without TLS.
    """
    from pyqmail.admin import certs

    path = os.path.join(lay.home, certs.SERVERCERT)
    if not replace and os.path.lexists(path):
        return False
    try:
        pem = certs.make_self_signed(fqdn)
    except certs.CertError as e:
        print(f"qmail init: warning: no {certs.SERVERCERT} made ({e}): qmail-smtpd offers no STARTTLS "
              f"until there is one; make it later with: qmail init --new-cert --home {lay.home}", file=out)
        return False
    if replace and os.path.lexists(path):
        old = path + ".old"
        try:
            os.unlink(old)
        except FileNotFoundError:
            pass
        os.link(path, old)  # the same inode: its owner and mode stay
        print(f"Keeping the previous certificate in {certs.SERVERCERT}.old.", file=out)
    lay.file(certs.SERVERCERT, pem.decode("ascii"), CERT_ROLE, cert_mode(lay.inst))
    print(f"Putting a self-signed certificate for {fqdn} into {certs.SERVERCERT}...", file=out)
    return True


def _upgrade_cert(lay: _Layout, out: TextIO) -> None:
    """On --upgrade, make the certificate a home made before pyqmail had TLS lacks (an existing one stays)."""
    try:
        with open(os.path.join(lay.home, "control", "me"), encoding="latin-1") as f:
            fqdn = f.readline().strip()
    except FileNotFoundError:
        return
    if fqdn:
        install_cert(lay, fqdn, out)


def new_cert(qmail_home: str, out: TextIO) -> None:
    """`qmail init --new-cert`: replace control/servercert.pem by a new self-signed one for control/me.

    Raise InstallError if qmail_home is no home, has no control/me, or no certificate could be made.
    """
    from pyqmail.admin import certs

    qmail_home = os.path.abspath(qmail_home)
    try:
        with open(os.path.join(qmail_home, _home.INSTALL_FILE), encoding="utf-8") as f:
            inst = _home.parse_install(f.read())
        with open(os.path.join(qmail_home, "control", "me"), encoding="latin-1") as f:
            fqdn = f.readline().strip()
    except FileNotFoundError as e:
        raise InstallError(f"qmail init: fatal: {qmail_home} is not a pyqmail home ({e.filename} is missing)") from None
    except ValueError as e:
        raise InstallError(f"qmail init: fatal: {e}") from None
    if not fqdn:
        raise InstallError(f"qmail init: fatal: {qmail_home}/control/me is empty")
    if not inst.single and os.geteuid() != 0:
        raise InstallError(f"qmail init: fatal: {qmail_home} is a root-mode home: run --new-cert as root")
    if not install_cert(_Layout(qmail_home, inst), fqdn, out, replace=True):
        raise InstallError(f"qmail init: fatal: no certificate made in {qmail_home}/{certs.SERVERCERT}")
