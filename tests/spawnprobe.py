"""A program that describes the process it runs in, for the spawn tests."""

from __future__ import annotations

import json
import os
import signal
import sys

from pyqmail.entry import program


def _fds() -> dict[str, str]:
    out = {}
    for name in sorted(os.listdir("/proc/self/fd"), key=int):
        fd = int(name)
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the directory listing's own descriptor, already closed
        if target.startswith("/proc/") and target.endswith("/fd"):
            continue
        import fcntl
        flags = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        out[name] = f"{target.split(':')[0]} mode={flags} inheritable={os.get_inheritable(fd)}"
    return out


def _signals() -> dict[str, str]:
    out = {}
    for s in sorted(signal.valid_signals()):
        try:
            h = signal.getsignal(s)
        except (ValueError, OSError):
            continue
        out[str(int(s))] = "default" if h == signal.SIG_DFL else "ignore" if h == signal.SIG_IGN else getattr(h, "__name__", repr(h))
    return out


@program("spawn-probe", crash=111)
def main(argv: list[str]) -> int:
    umask = os.umask(0)
    os.umask(umask)
    data = {
        "argv": argv,
        "env": dict(os.environ),
        "fds": _fds(),
        "cwd": os.getcwd(),
        "umask": umask,
        "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), sorted(os.getgroups())],
        "signals": _signals(),
        "stdin": sys.stdin.read() if sys.stdin is not None else None,
    }
    sys.stdout.write(json.dumps(data, sort_keys=True))
    sys.stderr.write("probe on stderr\n")
    return 42
