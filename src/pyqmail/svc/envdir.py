"""envdir: run a program with environment variables taken from files (daemontools envdir(8)).

usage: envdir d child

For each file in d whose name does not start with '.': if it is empty, the
variable of that name is removed; otherwise it is set to the file's first
line, trailing spaces and tabs removed and NUL bytes turned into newlines.
Exit 111 for usage and for every failure (directory, file, program).
"""

from __future__ import annotations

import os

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.strerr import Die
from pyqmail.svc import pathexec

FATAL = b"envdir: fatal: "
USAGE = b"envdir: usage: envdir dir child"
EXIT_TROUBLE = 111
CHUNK = 4096
# Only the first line counts; a longer one could not be passed to exec anyway
# (Linux refuses an environment string over 128 KiB), so stopping here changes nothing.
LINE_MAX = 1 << 18


def _die(*parts: bytes, e: OSError | None = None) -> Die:
    text = FATAL + b"".join(parts)
    if e is not None:
        text += describe(e).encode()
    return Die(EXIT_TROUBLE, text)


def first_line(fd: int) -> bytes:
    """Read fd up to its first newline (or LINE_MAX bytes); return what was read."""
    data = b""
    while b"\n" not in data and len(data) < LINE_MAX:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            break
        data += chunk
    return data


def value(content: bytes) -> bytes:
    """Return the variable's value for a file's content (non-empty): envdir(8)'s rules."""
    return content.split(b"\n", 1)[0].rstrip(b" \t").replace(b"\0", b"\n")


def changes(dirname: bytes) -> list[bytes]:
    """Return the environment changes the files in the current directory (dirname) make, in readdir order."""
    try:
        names = os.listdir(b".")
    except OSError as e:
        raise _die(b"unable to read directory ", dirname, b": ", e=e) from None
    out = []
    # daemontools reads every file into one buffer: a file that vanished
    # (a dangling symlink) leaves the previous value there, and it is used again.
    buf = b""
    for name in names:
        if name.startswith(b"."):
            continue
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _die(b"unable to read ", dirname, b"/", name, b": ", e=e) from None
        else:
            try:
                buf = first_line(fd)
            except OSError as e:
                raise _die(b"unable to read ", dirname, b"/", name, b": ", e=e) from None
            finally:
                os.close(fd)
        if buf:
            v = value(buf)
            buf = v + b"\0"
            out.append(name + b"=" + v)
        else:
            out.append(name)
    return out


def _main(argv: list[str]) -> int:
    if len(argv) < 3:
        raise Die(EXIT_TROUBLE, USAGE)
    dirname = os.fsencode(argv[1])
    try:
        orig = os.open(".", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _die(b"unable to switch to current directory: ", e=e) from None
    try:
        os.chdir(dirname)
    except OSError as e:
        raise _die(b"unable to switch to directory ", dirname, b": ", e=e) from None
    env = pathexec.changed_env(changes(dirname))
    try:
        os.fchdir(orig)
    except OSError as e:
        raise _die(b"unable to switch to starting directory: ", e=e) from None
    os.close(orig)
    child = [os.fsencode(a) for a in argv[2:]]
    err = pathexec.run(child, env)
    raise _die(b"unable to run ", child[0], b": ", e=err)


@program("envdir", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Run child in the environment d describes; return 111 only if it cannot."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()


