"""Process titles: every program shows in ps and top under its own name, as exec would make it.

A stub run by exec shows as `python3 -IS QMAILHOME/bin/NAME ARGS`, and a
program started by fork-and-call (spawn's fast path) would show its parent's
command line: tcpserver's for every qmail-smtpd, qmail-start's for qmail-send
and its daemons. So each program sets its command line (/proc/PID/cmdline,
what ps and top show) to its argv and the kernel's comm (ps -o comm, top's
default, pgrep, killall) to its file name, as exec of a C program would.
setproctitle's C module (docs/DEPENDENCIES.md) does both: rewriting the argv
area is the only way to change what ps shows without privileges.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType

COMM_MAX = 15  # the kernel's TASK_COMM_LEN less its NUL
_MODULE = "setproctitle._setproctitle"

_spt: ModuleType | None = None
_looked = False


def _load() -> ModuleType | None:
    """Load setproctitle's C module alone; None if it is not installed.

    The package's __init__ imports logging, 10 ms on every process start
    (qmail-inject, each exec'd program): the C module alone takes 0.25 ms.
    """
    import _frozen_importlib as bootstrap
    import _frozen_importlib_external as external

    for d in sys.path:
        for suffix in external.EXTENSION_SUFFIXES:
            path = os.path.join(d or ".", "setproctitle", "_setproctitle" + suffix)
            if os.path.isfile(path):
                loader = external.ExtensionFileLoader(_MODULE, path)
                spec = bootstrap.spec_from_loader(_MODULE, loader)
                mod: ModuleType = loader.create_module(spec)  # type: ignore[arg-type]
                loader.exec_module(mod)
                return mod
    return None


def _printable(text: str) -> str:
    """Return text with undecodable bytes (surrogate escapes) as \\xNN, encodable as UTF-8."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def preload() -> None:
    """Load the C module now, in a parent, so that its forked children share it."""
    global _spt, _looked
    if not _looked:
        _looked = True
        _spt = _load()


def set_title(path: str, argv: Sequence[str]) -> None:
    """Show this process as argv (its command line) and path's file name (its comm)."""
    preload()
    # Arguments are bytes in qmail (qmail-local's address may be any bytes): shown
    # with \xNN escapes, never an error, since a title is cosmetic and the program's
    # exit code is its interface (an exception here would bounce mail).
    title = _printable(" ".join(argv))
    name = _printable(os.path.basename(path))[:COMM_MAX]
    if _spt is not None:
        _spt.setproctitle(title)
        # setproctitle sets comm from the title's start; exec sets it from the file name.
        _spt.setthreadtitle(name)
        return
    try:
        # Without the C module only comm can change (Linux lets a process rename itself).
        with open("/proc/self/comm", "w", encoding="utf-8") as f:
            f.write(name)
    except OSError:
        pass  # no /proc: the title is cosmetic, the program runs the same
