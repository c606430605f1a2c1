"""QMAILHOME: where an installation lives, and what its installer recorded.

C qmail compiles its home (/var/qmail) into every program. pyqmail takes it
from the stub in QMAILHOME/bin that started the program (the stub is written
by `qmail init` and names its home), lets $QMAILHOME override it, and reads it
once. The installer also records, in QMAILHOME/conf/install, what qmail fixes
at compile time: the queue split and the qmail users' ids.
"""

from __future__ import annotations

import os

DEFAULT_HOME = "/var/qmail"
INSTALL_FILE = "conf/install"

# The qmail users and groups, with the names qmail's conf-users/conf-groups use.
USER_ROLES = ("alias", "qmaild", "qmaill", "root", "qmailp", "qmailq", "qmailr", "qmails")
GROUP_ROLES = ("qmail", "nofiles")

_default: str | None = None
_home: str | None = None
_install: Install | None = None
_install_home: str | None = None  # the home whose conf/install _install was read from


def set_default(path: str) -> None:
    """Set the home compiled into the running stub; $QMAILHOME still wins.

    The install record read so far is kept when the home stays the same: a
    child started by fork-and-call (pyqmail.spawn) would otherwise read
    conf/install again, once per message (issue 17).
    """
    global _default, _home, _install
    _default = path
    _home = None
    if _install is not None and _install_home != home():
        _install = None


def stub_home() -> str | None:
    """Return the home named by the stub that started this process; None if no stub did."""
    return _default


def reset() -> None:
    """Forget the home and install record read so far (used after fork)."""
    global _home, _install
    _home = None
    _install = None


def home() -> str:
    """Return QMAILHOME: $QMAILHOME, else the stub's home, else /var/qmail."""
    global _home
    if _home is None:
        _home = os.environ.get("QMAILHOME") or _default or DEFAULT_HOME
    return _home


# Records on the start-up path of every program are plain slotted classes:
# importing dataclasses costs several milliseconds per process start.

class Account:
    """A qmail user as the installer found it."""

    __slots__ = ("name", "uid", "gid", "home")

    def __init__(self, name: str, uid: int, gid: int, home: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.home = home

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Account) and (self.name, self.uid, self.gid, self.home) == (
            other.name, other.uid, other.gid, other.home)

    def __repr__(self) -> str:
        return f"Account({self.name!r}, {self.uid}, {self.gid}, {self.home!r})"


class Install:
    """What `qmail init` recorded about an installation."""

    __slots__ = ("single", "split", "users", "groups")

    def __init__(self, single: bool, split: int, users: dict[str, Account], groups: dict[str, int]) -> None:
        self.single = single  # single-user mode: everything runs as one ordinary user
        self.split = split
        self.users = users
        self.groups = groups

    def uid(self, role: str) -> int:
        """Return the uid of a qmail role; -1 where this install has none."""
        acct = self.users.get(role)
        return acct.uid if acct is not None else -1


def parse_install(text: str) -> Install:
    """Parse conf/install; raise ValueError on a malformed line."""
    single = False
    split = 23
    users: dict[str, Account] = {}
    groups: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        key = fields[0]
        try:
            if key == "mode" and len(fields) == 2 and fields[1] in ("single", "root"):
                single = fields[1] == "single"
            elif key == "split" and len(fields) == 2:
                split = int(fields[1])
                if split < 1:
                    raise ValueError("split must be positive")
            elif key == "user" and len(fields) == 6:
                role, name, uid, gid, home_dir = fields[1:]
                users[role] = Account(name, int(uid), int(gid), home_dir)
            elif key == "group" and len(fields) == 4:
                groups[fields[1]] = int(fields[3])
            else:
                raise ValueError("unknown setting")
        except ValueError as e:
            raise ValueError(f"{INSTALL_FILE} line {lineno}: {e}: {line!r}") from None
    return Install(single, split, users, groups)


def format_install(inst: Install) -> str:
    """Return the text of conf/install for inst."""
    out = ["# Written by `qmail init`: what C qmail compiles in. Edit with care.",
           f"mode {'single' if inst.single else 'root'}",
           f"split {inst.split}"]
    for role, a in inst.users.items():
        out.append(f"user {role} {a.name} {a.uid} {a.gid} {a.home}")
    for role, gid in inst.groups.items():
        out.append(f"group {role} {role} {gid}")  # role name, account name, gid
    return "\n".join(out) + "\n"


def install() -> Install:
    """Return this home's install record; a home without one is single-user, split 23."""
    global _install, _install_home
    if _install is None:
        _install_home = home()
        try:
            with open(os.path.join(_install_home, INSTALL_FILE), encoding="utf-8") as f:
                _install = parse_install(f.read())
        except FileNotFoundError:
            _install = Install(True, 23, {}, {})
            _install_home = None  # not kept by set_default: `qmail init` may write it next
    return _install
