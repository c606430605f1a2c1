"""daemontools' pathexec: exec a program found on $PATH, with an environment changed in order.

Shared by setuidgid, envuidgid, envdir and softlimit, whose error messages
depend on exactly how the search fails.
"""

from __future__ import annotations

import errno
import os

from pyqmail import sig as signal

DEFAULT_PATH = b"/bin:/usr/bin"
# A search goes on past these errors (remembering them) and stops at any other.
_GO_ON = frozenset((errno.EACCES, errno.EPERM, errno.EISDIR))


def changed_env(changes: list[bytes], environ: list[bytes] | None = None) -> list[bytes]:
    """Return environ ('name=value' entries) after each change in order.

    A change 'name=value' replaces the first entry of that name (the last
    entry moves into its place) and is appended; a change without '='
    only removes. The name ends at the change's first '='.
    """
    env = list(_environ() if environ is None else environ)
    for change in changes:
        name = change.split(b"=", 1)[0]
        for i, entry in enumerate(env):
            if entry.startswith(name + b"="):
                last = env.pop()
                if i < len(env):
                    env[i] = last
                break
        if b"=" in change:
            env.append(change)
    return env


def _environ() -> list[bytes]:
    return [k + b"=" + v for k, v in os.environb.items()]


def _mapping(env: list[bytes]) -> dict[bytes, bytes]:
    # execve takes a mapping: an entry with an empty name cannot be passed from Python.
    out: dict[bytes, bytes] = {}
    for entry in env:
        name, eq, value = entry.partition(b"=")
        if name and eq:
            out[name] = value
    return out


def run(argv: list[bytes], env: list[bytes] | None = None) -> OSError:
    """Exec argv[0] (searched on $PATH unless it has a '/'); return the error if that fails.

    The search uses this process's $PATH (default /bin:/usr/bin), an empty
    component meaning '.'; it goes on past 'no such file', 'access denied',
    'permission denied' and 'is a directory', reporting the last of those
    others if nothing runs.
    """
    # Python ignores SIGPIPE and SIGXFSZ; a program started from C would see them at default.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    envmap = _mapping(_environ() if env is None else env)
    file = argv[0]
    if b"/" in file:
        try:
            os.execve(file, argv, envmap)
        except OSError as e:
            return e
    path = os.environb.get(b"PATH", DEFAULT_PATH)
    saved: OSError | None = None
    last: OSError = OSError(errno.ENOENT, "No such file or directory")
    for part in path.split(b":"):
        try:
            os.execve((part or b".") + b"/" + file, argv, envmap)
        except OSError as e:
            last = e
            if e.errno != errno.ENOENT:
                saved = e
                if e.errno not in _GO_ON:
                    return e
    return saved if saved is not None else last
