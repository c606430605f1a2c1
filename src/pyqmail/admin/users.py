"""`qmail user`: the virtual-user database QMAILHOME/users/poppasswd that checkpassword reads.

Lines are "name:hash:uid:gid:home[:shell]". Every change rewrites the file
atomically (temporary file, fsync, rename, fsync of the directory) under an
exclusive lock, mode 600; lines this command does not understand (comments,
corrupt entries) are kept byte for byte. Exit 0 on success, 100 for a usage or
permanent error, 111 for a temporary one.
"""

from __future__ import annotations

import fcntl
import getpass
import grp
import os
import pwd
from typing import IO

EXIT_OK = 0
EXIT_PERM = 100
EXIT_TEMP = 111
DB = "users/poppasswd"
LOCK = "users/poppasswd.lock"
VHOMES = "pop"  # where add puts a home not given: QMAILHOME/pop/NAME
MAX_NAME = 255
MAX_PASSWORD = 511  # checkpassword reads at most 512 bytes for name and password together
MAX_DB = 1 << 24
PREFIX = "qmail user: fatal: "


class Failure(Exception):
    """A failure with its exit code; the message is printed after PREFIX."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _temp(what: str, e: OSError) -> Failure:
    return Failure(EXIT_TEMP, f"{what}: {e.strerror or e}")


def check_name(name: str) -> None:
    """Raise Failure(100) unless name can be a poppasswd key and a directory name."""
    if not name:
        raise Failure(EXIT_PERM, "empty user name")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        raise Failure(EXIT_PERM, "user name too long")
    if name.startswith(("#", ".", "-")) or any(c in ":/" or ord(c) <= 32 or ord(c) == 127 for c in name):
        raise Failure(EXIT_PERM, f"bad user name: {name!r}")


def split_entry(line: bytes) -> tuple[bytes, int, int, bytes] | None:
    """Return (name, uid, gid, home) of a well-formed entry line; None for comments and corrupt lines."""
    if line.startswith(b"#"):
        return None
    fields = line.split(b":")
    if len(fields) not in (5, 6) or not fields[0] or not fields[4]:
        return None
    if not (fields[2].isdigit() and fields[3].isdigit()):
        return None
    return fields[0], int(fields[2]), int(fields[3]), fields[4]


def entry_name(line: bytes) -> bytes | None:
    """Return the name a line is for, if any (corrupt lines with a name still claim it)."""
    if line.startswith(b"#") or b":" not in line:
        return None
    return line.split(b":", 1)[0]


class Database:
    """poppasswd's lines, read and written under the lock."""

    def __init__(self, qhome: str) -> None:
        self.path = os.path.join(qhome, DB)
        self.lock_path = os.path.join(qhome, LOCK)
        self.lines: list[bytes] = []
        self.trailing_newline = True
        self._lock_fd = -1

    def __enter__(self) -> Database:
        try:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        except OSError as e:
            raise _temp(f"unable to lock {self.lock_path}", e) from None
        self.read()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def read(self) -> None:
        """Read the lines of the database (none if it does not exist)."""
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_DB + 1)
        except FileNotFoundError:
            data = b""
        except OSError as e:
            raise _temp(f"unable to read {self.path}", e) from None
        if len(data) > MAX_DB:
            raise Failure(EXIT_PERM, f"{self.path} is too large")
        self.trailing_newline = data.endswith(b"\n") or not data
        self.lines = data.split(b"\n")
        if self.lines and self.lines[-1] == b"":
            self.lines.pop()

    def find(self, name: bytes) -> int:
        """Return the index of name's line, -1 if none."""
        for i, line in enumerate(self.lines):
            if entry_name(line) == name:
                return i
        return -1

    def write(self) -> None:
        """Replace the database atomically with the current lines, mode 600."""
        from pyqmail import durable

        data = b"".join(line + b"\n" for line in self.lines)
        tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            fd = durable.create_excl(tmp, 0o600)
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                durable.write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            durable.fsync_dir(os.path.dirname(self.path))
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass  # safe: already failing, and the write error is reported; a left tmp file is rewritten next time
            raise _temp(f"unable to write {self.path}", e) from None


def _read_password(stdin: IO[bytes], interactive: bool) -> bytes:
    """Return the new password: prompted twice on a terminal, else stdin's first line."""
    if interactive:
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise Failure(EXIT_PERM, "passwords do not match")
        password = first.encode("utf-8", "surrogateescape")
    else:
        data = stdin.read(MAX_PASSWORD + 2)
        line = data.split(b"\n", 1)[0]
        if line.endswith(b"\r"):
            line = line[:-1]
        password = line
    if not password:
        raise Failure(EXIT_PERM, "empty password")
    if len(password) > MAX_PASSWORD:
        raise Failure(EXIT_PERM, "password too long")
    if b"\0" in password:
        raise Failure(EXIT_PERM, "password contains NUL")
    return password


def _id(text: str | None, db: str) -> int | None:
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid if db == "passwd" else grp.getgrnam(text).gr_gid
    except KeyError:
        raise Failure(EXIT_PERM, f"no such {'user' if db == 'passwd' else 'group'}: {text}") from None


def _identity(uid_arg: str | None, gid_arg: str | None) -> tuple[int, int]:
    """Return the uid and gid a new user's mail runs as."""
    from pyqmail import home

    uid, gid = _id(uid_arg, "passwd"), _id(gid_arg, "group")
    inst = home.install()
    if uid is None:
        if not inst.single and os.geteuid() == 0:
            raise Failure(EXIT_PERM, "--uid is required in a root-mode installation")
        owner = next(iter(inst.users.values()), None) if inst.single else None
        uid = owner.uid if owner is not None else os.geteuid()  # the installing user
    if gid is None:
        if uid_arg is not None and not uid_arg.isdigit():
            gid = pwd.getpwnam(uid_arg).pw_gid
        else:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                raise Failure(EXIT_PERM, f"--gid is required: uid {uid} has no passwd entry") from None
    if uid == 0:
        raise Failure(EXIT_PERM, "refusing uid 0: qmail-pop3d does not run as root")
    if os.geteuid() != 0 and (uid != os.geteuid()):
        raise Failure(EXIT_PERM, "only root can add users with another uid")
    return uid, gid


def _make_maildir(home_dir: str, uid: int, gid: int) -> None:
    """Create home_dir (mode 700) and home_dir/Maildir, owned by uid:gid; keep what exists."""
    try:
        for d in (home_dir, os.path.join(home_dir, "Maildir"),
                  *(os.path.join(home_dir, "Maildir", s) for s in ("tmp", "new", "cur"))):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise Failure(EXIT_PERM, f"{d} exists and is not a directory") from None
                continue
            if os.geteuid() == 0:
                os.chown(d, uid, gid)
    except OSError as e:
        raise _temp(f"unable to create {home_dir}/Maildir", e) from None


def _make_stamp_dir(qhome: str) -> None:
    """Create QMAILHOME/authenticated for POP-before-SMTP stamps, mode 755 (see pop3.relay)."""
    from pyqmail.pop3 import relay

    path = os.path.join(qhome, relay.DIR)
    try:
        os.mkdir(path, 0o700)
        os.chmod(path, relay.DIR_MODE)
    except FileExistsError:
        pass
    except OSError as e:
        raise _temp(f"unable to create {path}", e) from None


def add(qhome: str, name: str, uid_arg: str | None, gid_arg: str | None, home_dir: str | None,
        stdin: IO[bytes], interactive: bool) -> None:
    """Add name to the database with a new password and a Maildir."""
    from pyqmail.pop3 import passwords

    check_name(name)
    key = os.fsencode(name)
    uid, gid = _identity(uid_arg, gid_arg)
    if home_dir is None:
        home_dir = os.path.join(qhome, VHOMES, name)
        try:
            os.makedirs(os.path.join(qhome, VHOMES), mode=0o755, exist_ok=True)
        except OSError as e:
            raise _temp(f"unable to create {os.path.join(qhome, VHOMES)}", e) from None
    home_dir = os.path.abspath(home_dir)
    if any(c in home_dir for c in ":\n\0"):
        raise Failure(EXIT_PERM, f"bad home directory: {home_dir!r}")
    with Database(qhome) as db:
        if db.find(key) >= 0:
            raise Failure(EXIT_PERM, f"user already exists: {name}")
        password = _read_password(stdin, interactive)
        _make_maildir(home_dir, uid, gid)
        _make_stamp_dir(qhome)
        line = b"%s:%s:%d:%d:%s" % (key, passwords.scrypt_hash(password).encode("ascii"), uid, gid,
                                    os.fsencode(home_dir))
        db.lines.append(line)
        db.write()


def delete(qhome: str, name: str) -> None:
    """Remove name's line (its home and mail stay)."""
    key = os.fsencode(name)
    with Database(qhome) as db:
        i = db.find(key) if name else -1
        if i < 0:
            raise Failure(EXIT_PERM, f"no such user: {name}")
        del db.lines[i]
        db.write()


def passwd(qhome: str, name: str, stdin: IO[bytes], interactive: bool) -> None:
    """Give name a new password; the rest of its line stays."""
    from pyqmail.pop3 import passwords

    key = os.fsencode(name)
    with Database(qhome) as db:
        i = db.find(key) if name else -1
        if i < 0:
            raise Failure(EXIT_PERM, f"no such user: {name}")
        fields = db.lines[i].split(b":")
        if split_entry(db.lines[i]) is None:
            raise Failure(EXIT_PERM, f"entry for {name} is corrupt; fix it by hand")
        fields[1] = passwords.scrypt_hash(_read_password(stdin, interactive)).encode("ascii")
        db.lines[i] = b":".join(fields)
        db.write()


def listing(qhome: str, out: IO[bytes], err: IO[bytes]) -> None:
    """Write "name uid gid home" for each entry (never hashes); warn about corrupt lines."""
    db = Database(qhome)
    db.read()
    for n, line in enumerate(db.lines, 1):
        e = split_entry(line)
        if e is None:
            if line and not line.startswith(b"#"):
                err.write(b"qmail user: warning: %s line %d is corrupt\n" % (os.fsencode(db.path), n))
            continue
        out.write(b"%s %d %d %s\n" % e)


def run(args: object, qhome: str) -> int:
    """Run the user subcommand args (from qmail's parser) on the installation qhome."""
    import sys

    from pyqmail import home

    home.set_default(qhome)
    os.environ["QMAILHOME"] = qhome  # home.install() reads this installation's record
    home.reset()
    action = getattr(args, "action")
    name = getattr(args, "name", None) or ""
    interactive = sys.stdin is not None and sys.stdin.isatty()
    stdin = sys.stdin.buffer
    try:
        if not os.path.isdir(os.path.join(qhome, "users")):
            raise Failure(EXIT_PERM, f"{qhome} is not a qmail installation (no users directory)")
        if action == "add":
            add(qhome, name, getattr(args, "uid"), getattr(args, "gid"), getattr(args, "home_dir"),
                stdin, interactive)
        elif action == "del":
            delete(qhome, name)
        elif action == "passwd":
            passwd(qhome, name, stdin, interactive)
        else:
            sys.stdout.flush()
            listing(qhome, sys.stdout.buffer, sys.stderr.buffer)
            sys.stdout.buffer.flush()
    except Failure as f:
        sys.stderr.buffer.write((PREFIX + str(f) + "\n").encode("utf-8", "backslashreplace"))
        sys.stderr.flush()
        return f.code
    return EXIT_OK
