"""QMAILHOME/bin stubs: the text `qmail init` writes, and reading back what a stub names.

Apart from pyqmail.spawn so that a client that only asks "is this path our
qmail-queue?" (QQ's hand-over to qmail-queued, sendmail) does not import
spawn's fork machinery (its signals, privileges and descriptor code) on
every message: half a millisecond of qmail-inject's start (issue 17).
pyqmail.spawn re-exports these names.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Sequence

STUB_MARKER = b"# pyqmail-program "
_STUB_HEAD = 512

# Cache of stub parses, keyed by (path, mtime_ns, inode): a stub can be
# replaced by an administrator's wrapper at any time.
_stub_cache: dict[str, tuple[tuple[int, int], Stub | None]] = {}


class Stub:
    """What a QMAILHOME/bin stub names: the program, its module and its home."""

    __slots__ = ("name", "module", "home")

    def __init__(self, name: str, module: str, home: str) -> None:
        self.name = name
        self.module = module
        self.home = home


# Programs whose stub first asks qmail-queued to run them (pyqmail.inject.client):
# module -> the name qmail-queued knows the program by.
SERVED = {"pyqmail.inject.qmail_inject": "qmail-inject", "pyqmail.inject.sendmail": "sendmail"}


def stub_text(python: str, sys_path: Sequence[str], name: str, module: str, home: str) -> str:
    """Return the text of the stub for program name in home."""
    served = SERVED.get(module)
    ask = "" if served is None else (
        "from pyqmail.inject.client import run\n"
        f"run({served!r}, {home!r})\n"
    )
    return (
        f"#!{python} -IS\n"
        f"{STUB_MARKER.decode()}{name} {module} {home}\n"
        "import sys\n"
        f"sys.path[0:0] = {list(sys_path)!r}\n"
        f"{ask}"
        "from pyqmail.entry import stub\n"
        f"stub({module!r}, {home!r})\n"
    )


def read_stub(path: str) -> Stub | None:
    """Return the Stub that path is, or None if it is any other file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_mtime_ns, st.st_ino)
    hit = _stub_cache.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    stub = None
    try:
        with open(path, "rb") as f:
            head = f.read(_STUB_HEAD)
    except OSError:
        head = b""
    lines = head.split(b"\n", 2)
    if len(lines) >= 2 and lines[0].startswith(b"#!") and lines[1].startswith(STUB_MARKER):
        fields = lines[1][len(STUB_MARKER):].decode("utf-8", "surrogateescape").split(" ", 2)
        if len(fields) == 3:
            stub = Stub(*fields)
    _stub_cache[path] = (key, stub)
    return stub


def runnable_stub(path: str, module: str | None = None) -> Stub | None:
    """Return the Stub that path is if it is executable (and names module, if given), else None:
    whatever else is there (an administrator's wrapper, a stub not executable) must be exec'd."""
    stub = read_stub(path)
    if stub is None or (module is not None and stub.module != module) or not os.access(path, os.X_OK):
        return None
    return stub
