"""Helpers for the delivery tests: homes owned by a delivering user, queueing, users/assign."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from conftest import IS_ROOT, TEST_USER, VENV_BIN, QHome, expect, run, world_dir
from queuefmt import files


@dataclass
class Site:
    """A single-user installation and the user it runs as (None: whoever runs the tests)."""

    home: QHome
    user: str | None
    uid: int
    gid: int

    @property
    def base(self) -> Path:
        return self.home.path.parent

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": f"{self.home.path}/bin:/usr/bin:/bin", **extra}

    def run(self, argv: list[str | os.PathLike[str]], **kw: object) -> object:
        return run(argv, user=self.user, **kw)  # type: ignore[arg-type]

    def mkdir(self, rel: str, mode: int = 0o755) -> Path:
        """Create a directory under the site's base, owned by the site's user."""
        p = self.base / rel
        p.mkdir(parents=True, exist_ok=True)
        os.chown(p, self.uid, self.gid)
        p.chmod(mode)
        return p

    def maildir(self, rel: str) -> Path:
        """Create a Maildir (and its parent directory) owned by the site's user."""
        top = self.mkdir(rel)
        for sub in ("tmp", "new", "cur"):
            self.mkdir(f"{rel}/{sub}", 0o700)
        return top

    def assign(self, lines: list[str]) -> None:
        """Write users/assign (a final '.' line is added) and compile it with qmail-newu."""
        path = self.home.path / "users" / "assign"
        path.write_text("".join(line + "\n" for line in lines) + ".\n", encoding="latin-1")
        os.chown(path, self.uid, self.gid)
        expect(run([self.home.bin("qmail-newu")], user=self.user))  # type: ignore[arg-type]

    def user_line(self, local: str, homedir: Path, uid: int | None = None, wild: bool = False) -> str:
        """Return a users/assign line giving local to this site's user (or uid) with homedir."""
        name = self.user or pwd.getpwuid(os.getuid()).pw_name
        u = self.uid if uid is None else uid
        if wild:
            return f"+{local}:{name}:{u}:{self.gid}:{homedir}:-::"
        return f"={local}:{name}:{u}:{self.gid}:{homedir}:::"


def make_site(fqdn: str = "test.example.com") -> Site:
    """A single-user home; as root it belongs to (and runs as) the test user, never root."""
    if not IS_ROOT:
        base = world_dir()
        home = base / "qmail"
        expect(run([VENV_BIN / "qmail", "init", "--single-user", "--home", home, fqdn]))
        return Site(QHome(home), None, os.getuid(), os.getgid())
    pw = pwd.getpwnam(TEST_USER)
    base = world_dir()
    os.chown(base, pw.pw_uid, pw.pw_gid)
    home = base / "qmail"
    expect(run([VENV_BIN / "qmail", "init", "--single-user", "--home", home, fqdn], user=TEST_USER))
    return Site(QHome(home), TEST_USER, pw.pw_uid, pw.pw_gid)


def remove_site(site: Site) -> None:
    shutil.rmtree(site.base, ignore_errors=True)


def qqueue(home: QHome, sender: bytes, recips: list[bytes], message: bytes, user: str | None = None,
           env: dict[str, str] | None = None) -> int:
    """Queue a message with QMAILHOME/bin/qmail-queue; return qmail-queue's exit code."""
    r, w = os.pipe()
    os.write(w, b"F" + sender + b"\0" + b"".join(b"T" + x + b"\0" for x in recips) + b"\0")
    os.close(w)
    try:
        kw: dict[str, object] = {}
        if user is not None:
            pw = pwd.getpwnam(user)
            kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        p = subprocess.run([home.bin("qmail-queue")], input=message, stdout=r, stderr=subprocess.PIPE,
                           env=env or {"PATH": "/usr/bin:/bin"}, timeout=60, **kw)  # type: ignore[call-overload]
    finally:
        os.close(r)
    assert p.returncode == 0, p.stderr
    return int(p.returncode)


def only_todo(home: QHome) -> int:
    """Return the number of the one message in todo/."""
    (name,) = files(home.queue)["todo"]
    return int(name)


def maildir_messages(maildir: Path) -> list[bytes]:
    """Return the contents of every message in maildir/new, in name order."""
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]
