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


def make_site(fqdn: str = "test.example.com", todo: str = "--flat-todo") -> Site:
    """A single-user home; as root it belongs to (and runs as) the test user, never root.

    todo: the queue's layout, flat by default (tests read todo/N by name); "--big-todo" for qmail init's default.
    """
    if not IS_ROOT:
        base = world_dir()
        home = base / "qmail"
        expect(run([VENV_BIN / "qmail", "init", "--single-user", todo, "--home", home, fqdn]))
        return Site(QHome(home), None, os.getuid(), os.getgid())
    pw = pwd.getpwnam(TEST_USER)
    base = world_dir()
    os.chown(base, pw.pw_uid, pw.pw_gid)
    home = base / "qmail"
    expect(run([VENV_BIN / "qmail", "init", "--single-user", todo, "--home", home, fqdn], user=TEST_USER))
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


class Running:
    """qmail-start running for a site: its activity record read as it comes."""

    def __init__(self, site: Site, args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        import signal as _signal  # noqa: F401 - tests may use it through this module

        self.site = site
        self._r, w = os.pipe()
        self._err = open(site.base / "qmail-start.stderr", "wb")
        kw: dict[str, object] = {}
        if site.user is not None:
            kw = {"user": site.uid, "group": site.gid, "extra_groups": []}
        self.proc = subprocess.Popen([str(site.home.bin("qmail-start")), *(args or ["./Maildir/"])],
                                     stdin=subprocess.DEVNULL, stdout=w, stderr=self._err,
                                     env=env or site.env(), **kw)  # type: ignore[call-overload]
        os.close(w)
        os.set_blocking(self._r, False)
        self.log = b""
        self._closed = False

    def _read(self, timeout: float) -> bool:
        """Read what is there within timeout; return False at end of the log."""
        import select

        if self._closed:
            return False
        ready, _, _ = select.select([self._r], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self._r, 65536)
        except BlockingIOError:
            return True
        if not data:
            self._closed = True
            return False
        self.log += data
        return True

    def lines(self) -> list[bytes]:
        return self.log.split(b"\n")[:-1]

    def wait_for(self, pred: object, timeout: float = 60.0) -> list[bytes]:
        """Read the log until pred(lines) is true (or a line equals pred, if bytes); return the lines."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            if (pred in lines) if isinstance(pred, bytes) else pred(lines):  # type: ignore[operator]
                return lines
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 1.0)) and self._closed:
                raise AssertionError(f"waited in vain for {pred!r}; log so far:\n" + self.log.decode("latin-1")
                                     + "\nstderr:\n" + (self.site.base / "qmail-start.stderr").read_text("latin-1"))

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 60.0) -> int:
        """TERM qmail-send, read the log to its end; return the exit code."""
        import signal as _signal

        if self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._to_eof()
        self.close()
        return rc

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for qmail-send to exit by itself; return the exit code."""
        rc = self.proc.wait(timeout)
        self._to_eof()
        self.close()
        return rc

    def _to_eof(self, timeout: float = 30.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not self._closed and time.monotonic() < deadline:
            self._read(1.0)

    def kill(self) -> None:
        """SIGKILL qmail-send (the process qmail-start became)."""
        import signal as _signal

        self.proc.send_signal(_signal.SIGKILL)
        self.proc.wait(60)
        self._to_eof()
        self.close()

    def close(self) -> None:
        if self._r != -1:
            os.close(self._r)
            self._r = -1
            self._closed = True
        self._err.close()


FILL = """
import os, sys
sys.path.insert(0, sys.argv[1])
os.environ["QMAILHOME"] = sys.argv[2]
from pyqmail.queue.qq import QQ
count, size, sender, recip = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].encode(), sys.argv[6].encode()
for i in range(count):
    q = QQ()
    q.write(b"Subject: m%d\\n\\n" % i + b"x" * size + b"\\n")
    r = q.close(sender, [recip])
    if r:
        sys.exit(r.decode())
"""


def fill(site: Site, count: int, recip: bytes, size: int = 100, sender: bytes = b"s@x.example") -> None:
    """Queue count messages 'Subject: m<i>' to recip through qmail-queue, as the site's user."""
    import sys

    from conftest import ROOT

    res = run([sys.executable, "-c", FILL, str(ROOT / "src"), str(site.home.path), str(count), str(size),
               sender.decode(), recip.decode()], user=site.user, env={"PATH": "/usr/bin:/bin"}, timeout=600)
    expect(res)
