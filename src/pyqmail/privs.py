"""Dropping privileges: the one place it happens (STYLE principle 8)."""

from __future__ import annotations

import os


class PrivilegeError(Exception):
    """A privilege drop did not take effect, or was asked to become root."""


class Credentials:
    """The identity a process should run under (a plain class: see home.Account)."""

    __slots__ = ("uid", "gid", "groups")

    def __init__(self, uid: int, gid: int, groups: tuple[int, ...] = ()) -> None:
        self.uid = uid
        self.gid = gid
        self.groups = groups

    def __repr__(self) -> str:
        return f"Credentials({self.uid}, {self.gid}, {self.groups})"


def drop(creds: Credentials, allow_root: bool = False) -> None:
    """Set groups, gid, then uid; raise PrivilegeError if root remains (unless allow_root)."""
    if not allow_root and creds.uid == 0:
        raise PrivilegeError("refusing to run as uid 0")
    if os.geteuid() == 0:
        os.setgroups(list(creds.groups) or [creds.gid])
        os.setgid(creds.gid)
        os.setuid(creds.uid)
    elif (os.getuid(), os.getgid()) != (creds.uid, creds.gid):
        # Not root: the only identity we can keep is our own.
        os.setgid(creds.gid)
        os.setuid(creds.uid)
    if creds.uid != 0 and (os.geteuid() == 0 or os.getuid() == 0):
        raise PrivilegeError("uid 0 survived the privilege drop")
