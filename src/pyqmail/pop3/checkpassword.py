"""checkpassword: check a POP login, then run a program as the user (the checkpassword interface).

Usage: checkpassword prog [args...], with descriptor 3 giving the name, the
password and a timestamp, each NUL-terminated, at most 512 bytes in all. The
name is looked up first in the virtual-user database QMAILHOME/users/poppasswd
(lines "name:hash:uid:gid:home[:shell]", hash as passwords.scrypt_hash makes
it, or any crypt(3) string), else among the system's accounts (/etc/passwd,
/etc/shadow). On success: groups, gid, uid of the user, cwd its home, USER,
HOME and SHELL set, prog run in this process's place. Exit 1 if the login is
refused (after a delay; reason on stderr), 2 if the input is malformed or prog
missing, 111 for temporary trouble, said on stderr: among others, a system
account whose hash is in a shadow file this process cannot read (run as an
ordinary user), which is not a wrong password. A successful login also
writes the POP-before-SMTP stamp (pop3.relay) before the identity changes.

Run by Dovecot (ORIG_UID set), the identity is reported, not taken: no
privilege change and no chdir; userdb_uid and userdb_gid set and listed in
EXTRA, and descriptor 4 kept open, for Dovecot's checkpassword-reply. With
AUTHORIZED=1 as well (a userdb lookup) no password is checked, AUTHORIZED
becomes 2, and an unknown user exits 3.
"""

from __future__ import annotations

import os
import pwd
import time

from pyqmail.entry import program

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_TEMP = 111
FD_AUTH = 3
MAX_INPUT = 512  # the interface's limit: 512 bytes or more is refused
FAIL_DELAY = 2.0  # seconds a refused login waits, to slow password guessing
DELAY_ENV = "PYQMAIL_AUTH_DELAY"  # overrides FAIL_DELAY (tests set 0)
VIRTUAL_DB = "users/poppasswd"
SHADOW = "/etc/shadow"
MAX_DB_LINE = 4096
VIRTUAL_SHELL = "/bin/false"
# Dovecot's extensions of the interface (its wiki page AuthDatabase/CheckPassword).
DOVECOT_ENV = "ORIG_UID"  # set by Dovecot's auth process; checkpassword-reply compares it with its uid
AUTHORIZED_ENV = "AUTHORIZED"  # "1": a lookup without password, answered by setting "2"
CREDENTIALS_ENV = "CREDENTIALS_LOOKUP"  # Dovecot wants the password back: we store only hashes
EXTRA_ENV = "EXTRA"  # names of the further variables checkpassword-reply passes on
EXIT_NOUSER = 3  # Dovecot's lookup: no such user
FD_DOVECOT_REPLY = 4  # where Dovecot reads checkpassword-reply's answer


class Temporary(Exception):
    """The check could not be made now (unreadable database, no crypt)."""


class Account:
    """Whom a login becomes: the stored hash and the identity to run as."""

    __slots__ = ("name", "stored", "uid", "gid", "home", "shell")

    def __init__(self, name: str, stored: str, uid: int, gid: int, home: str, shell: str) -> None:
        self.name = name
        self.stored = stored
        self.uid = uid
        self.gid = gid
        self.home = home
        self.shell = shell


def parse_input(data: bytes) -> tuple[bytes, bytes] | None:
    """Return (name, password) from descriptor 3's record; None if either is not NUL-terminated."""
    name, sep, rest = data.partition(b"\0")
    if not sep or not rest:
        return None
    password, sep, _ = rest.partition(b"\0")
    if not sep:
        return None
    return name, password


def _read_input(fd: int) -> bytes | int:
    data = b""
    while True:
        try:
            chunk = os.read(fd, MAX_INPUT - len(data))
        except InterruptedError:
            continue
        except OSError:
            return EXIT_TEMP
        if not chunk:
            return data
        data += chunk
        if len(data) >= MAX_INPUT:
            return EXIT_REFUSED


def _lines(path: str) -> list[bytes] | None:
    """Return the lines of path (overlong ones dropped); None if it does not exist."""
    try:
        with open(path, "rb") as f:
            out: list[bytes] = []
            while True:
                line = f.readline(MAX_DB_LINE + 1)
                if not line:
                    return out
                if len(line) > MAX_DB_LINE:
                    # Skip the rest of an overlong line: it is no valid entry.
                    while line and not line.endswith(b"\n"):
                        line = f.readline(MAX_DB_LINE + 1)
                    continue
                out.append(line.rstrip(b"\n"))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Temporary(f"unable to read {path}: {e.strerror}") from e


def virtual_account(name: bytes, db: str) -> Account | None:
    """Return name's entry in the virtual-user database db; None if absent (or db absent)."""
    lines = _lines(db)
    for line in lines or ():
        if line.startswith(b"#"):
            continue
        fields = line.split(b":")
        if len(fields) < 5 or fields[0] != name:
            continue
        try:
            uid, gid = int(fields[2]), int(fields[3])
        except ValueError:
            raise Temporary(f"{db}: bad uid or gid for {name!r}") from None
        shell = fields[5].decode("latin-1") if len(fields) > 5 and fields[5] else VIRTUAL_SHELL
        return Account(name.decode("latin-1"), fields[1].decode("latin-1"), uid, gid,
                       os.fsdecode(fields[4]), shell)
    return None


SHADOWED = ("x", "*NP*")  # passwd fields that say "the hash is in the shadow file"


def _shadow_hash(name: str) -> str | None:
    """Return name's hash from the shadow file; None if the file or the entry is absent.

    Raise Temporary if the file cannot be read (as an ordinary user it cannot).
    """
    try:
        lines = _lines(SHADOW)
    except Temporary as e:
        raise Temporary(f"cannot read the shadow file: {e}") from None
    prefix = name.encode("latin-1") + b":"
    for line in lines or ():
        if line.startswith(prefix):
            return line.split(b":")[1].decode("latin-1")
    return None


def system_account(name: bytes) -> Account | None:
    """Return the system account name, with its shadow hash; None if no such user.

    Raise Temporary if the hash lives in an unreadable shadow file: the
    password cannot be checked now, which is not a wrong password.
    """
    if b"\0" in name or b":" in name or not name:
        return None
    text = name.decode("latin-1")
    try:
        pw = pwd.getpwnam(text)
    except KeyError:
        return None
    try:
        stored = _shadow_hash(pw.pw_name)
    except Temporary:
        if pw.pw_passwd not in SHADOWED:
            stored = None  # the hash is in passwd itself: no need of the shadow file
        else:
            raise
    if stored is None:
        stored = pw.pw_passwd
    return Account(pw.pw_name, stored, pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell)


def _printable(b: bytes) -> str:
    return "".join(chr(c) if 32 <= c < 127 else f"\\x{c:02x}" for c in b[:64])


def _refuse(name: bytes, why: str) -> int:
    peer = os.environ.get("TCPREMOTEIP", "")
    text = f"checkpassword: login refused for {_printable(name)}{' from ' + peer if peer else ''}: {why}\n"
    try:
        os.write(2, text.encode("ascii", "replace"))
    except OSError:
        pass  # safe: only the log line is lost; the login is refused all the same
    try:
        delay = float(os.environ.get(DELAY_ENV, FAIL_DELAY))
    except ValueError:
        delay = FAIL_DELAY
    if delay > 0:
        time.sleep(min(delay, 60.0))
    return EXIT_REFUSED


def _temp(why: str) -> int:
    try:
        os.write(2, f"checkpassword: temporary failure: {why}\n".encode("utf-8", "replace"))
    except OSError:
        pass  # safe: only the log line is lost; the exit code says temporary
    return EXIT_TEMP


def _dovecot_reply(env: dict[str, str], account: Account, lookup: bool) -> None:
    """Put account's uid and gid into env as Dovecot's userdb fields; acknowledge a lookup."""
    env.update(userdb_uid=str(account.uid), userdb_gid=str(account.gid))
    names = env.get(EXTRA_ENV, "").split()
    names += [n for n in ("userdb_uid", "userdb_gid") if n not in names]
    env[EXTRA_ENV] = " ".join(names)
    if lookup:
        env[AUTHORIZED_ENV] = "2"


def _record_login() -> None:
    """Write the POP-before-SMTP stamp for $TCPREMOTEIP while still the POP3 service's user (pop3.relay).

    Only where authenticated/ exists and we are a user whose stamps count; a
    failure is logged and never refuses the login.
    """
    from pyqmail.pop3 import relay

    ip = os.environ.get("TCPREMOTEIP")
    if not ip or not relay.trusted(os.geteuid()) or not os.path.isdir(relay.directory()):
        return
    try:
        relay.record(ip)
    except (OSError, ValueError) as e:
        relay.warn("checkpassword", f"unable to record {ip[:64]} in {relay.directory()}: "
                   f"{e.strerror if isinstance(e, OSError) else e}")


@program("checkpassword", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Check descriptor 3's login; on success become argv[1:] as the user, else exit 1/2/111."""
    from pyqmail import home, spawn
    from pyqmail.pop3 import passwords
    from pyqmail.privs import Credentials, drop

    if len(argv) < 2:
        return EXIT_USAGE
    data = _read_input(FD_AUTH)
    if isinstance(data, int):
        return data
    try:
        os.close(FD_AUTH)
    except OSError:
        pass  # safe: the input was read in full; a failed close loses nothing
    parsed = parse_input(data)
    if parsed is None:
        return EXIT_USAGE
    name, password = parsed
    # Dovecot's checkpassword-reply refuses to run under any uid but its caller's (ORIG_UID),
    # lest the user tamper with the reply: the identity is reported to Dovecot, not taken.
    dovecot = DOVECOT_ENV in os.environ
    lookup = dovecot and os.environ.get(AUTHORIZED_ENV) == "1"
    if lookup and CREDENTIALS_ENV in os.environ:
        return _refuse(name, "password lookup not supported")
    try:
        account = virtual_account(name, os.path.join(home.home(), VIRTUAL_DB))
        if account is None:
            account = system_account(name)
        if account is None:
            return EXIT_NOUSER if lookup else _refuse(name, "no such user")
        ok = lookup or passwords.verify(password, account.stored)
    except (Temporary, passwords.Unavailable) as e:
        return _temp(str(e))
    if not ok:
        return _refuse(name, "bad password")
    if not dovecot:
        _record_login()
    env = dict(os.environ)
    env.update(USER=account.name, HOME=account.home, SHELL=account.shell)
    fds = {0: 0, 1: 1, 2: 2}
    if dovecot:
        _dovecot_reply(env, account, lookup)
        fds[FD_DOVECOT_REPLY] = FD_DOVECOT_REPLY
    else:
        try:
            drop(Credentials(account.uid, account.gid), allow_root=True)
        except OSError:
            return EXIT_REFUSED
        try:
            os.chdir(account.home)
        except OSError as e:
            return _temp(f"unable to chdir to {account.home}: {e.strerror}")
    try:
        spawn.become(argv[1], argv[1:], env=env, fds=fds)
    except OSError as e:
        return _temp(f"unable to run {argv[1]}: {e.strerror}")
