"""Shared fixtures: installations made with `qmail init`, and running programs as processes."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
IS_ROOT = os.geteuid() == 0
CI = os.environ.get("CI") == "true"
TEST_USER = "pqtest"


def _qmail_users_exist() -> bool:
    try:
        for u in ("alias", "qmaild", "qmaill", "qmailp", "qmailq", "qmailr", "qmails"):
            pwd.getpwnam(u)
        return True
    except KeyError:
        return False


def need_root_setup() -> None:
    """Skip (or, in CI, fail) unless running as root with the qmail users present."""
    if not IS_ROOT:
        pytest.skip("needs root")
    if not _qmail_users_exist():
        if CI:
            pytest.fail("qmail users missing: .ci/run should have created them")
        pytest.skip("qmail users missing (run .ci/run once as root)")


@dataclass
class Result:
    """A finished process: argv, exit code and both streams."""

    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    def explain(self) -> str:
        return (f"command: {self.argv!r}\nexit: {self.returncode}\n"
                f"stdout: {self.stdout[:4000]!r}\nstderr: {self.stderr[:4000]!r}")


def run(argv: Sequence[str | os.PathLike[str]], input: bytes = b"", env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (), cwd: str | os.PathLike[str] | None = None, timeout: float = 60,
        user: str | None = None) -> Result:
    """Run a program as a process and collect its result."""
    args = [os.fspath(a) for a in argv]
    kw: dict[str, object] = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        kw.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    p = subprocess.run(args, input=input, capture_output=True, env=dict(env) if env is not None else None,
                       pass_fds=pass_fds, cwd=cwd, timeout=timeout, **kw)  # type: ignore[call-overload]
    return Result(args, p.returncode, p.stdout, p.stderr)


def expect(res: Result, code: int = 0) -> Result:
    """Assert res exited with code, showing the whole result otherwise."""
    assert res.returncode == code, res.explain()
    return res


def world_dir() -> Path:
    """A fresh directory that every user can traverse (the qmail users must)."""
    base = Path(tempfile.mkdtemp(prefix="pyqmail-test-", dir="/tmp"))
    base.chmod(0o755)
    return base


@dataclass
class QHome:
    """An installation made by `qmail init` for a test."""

    path: Path

    def bin(self, name: str) -> Path:
        return self.path / "bin" / name

    def control(self, name: str, text: str | None) -> None:
        p = self.path / "control" / name
        if text is None:
            p.unlink(missing_ok=True)
        else:
            p.write_text(text, encoding="latin-1")
            p.chmod(0o644)

    @property
    def queue(self) -> Path:
        return self.path / "queue"


def make_home(fqdn: str = "test.example.com", *extra: str, single: bool = True) -> QHome:
    """Create an installation with `qmail init`.

    Its queue is flat (--flat-todo: intd/N and todo/N as qmail 1.03's), which
    most tests read by name; pass "--big-todo" in extra for qmail init's default.
    """
    base = world_dir()
    home = base / "qmail"
    if "--big-todo" not in extra:
        extra = ("--flat-todo", *extra)
    args = [VENV_BIN / "qmail", "init", "--home", home, *extra, fqdn]
    if single:
        args.insert(2, "--single-user")
    expect(run(args))
    return QHome(home)


@pytest.fixture
def qhome() -> QHome:
    """A single-user installation (owned by whoever runs the tests)."""
    h = make_home()
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


@pytest.fixture
def root_home() -> QHome:
    """A root-mode installation with the real qmail users (root only)."""
    need_root_setup()
    h = make_home(single=False)
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)
