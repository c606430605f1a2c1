"""The entry shim every program runs through (STYLE principle 2).

A crash must never look like a permanent failure: qmail-lspawn and
qmail-rspawn read most exit codes as "bounce the mail". `program` wraps a
program's `main(argv) -> int` so that any uncaught exception becomes the
program's documented temporary failure, with the reason on stderr.
"""

from __future__ import annotations

import os
import sys
TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable

    Main = Callable[[list[str]], int]


def _flush_std() -> bool:
    """Flush sys.stdout and sys.stderr; return False if stdout could not be flushed."""
    ok = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            if stream is sys.stdout:
                ok = False
    return ok


def call(name: str, crash: int, fn: Main, argv: list[str], on_crash: Callable[[str], None] | None = None,
         let_through: tuple[type[BaseException], ...] = ()) -> int:
    """Run fn(argv) as a program's main: return its exit code, `crash` (after calling on_crash with
    the reason, and saying it on descriptor 2) for an uncaught exception but those of let_through."""
    try:
        rc = fn(argv)
    except let_through:
        raise
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else crash)
    except BaseException as e:  # noqa: BLE001 - the one place a crash is caught
        reason = f"{name}: fatal: internal error: {type(e).__name__}: {e}"
        if on_crash is not None:
            try:
                on_crash(reason)
            except BaseException:  # noqa: BLE001
                pass
        try:
            os.write(2, (reason + "\n").encode("utf-8", "backslashreplace"))
        except OSError:
            pass  # safe: stderr gone, nowhere left to say it; the exit code still says temporary
        rc = crash
    if not _flush_std():
        rc = crash if rc == 0 else rc
    return rc


def program(name: str, crash: int, on_crash: Callable[[str], None] | None = None) -> Callable[[Main], Callable[..., int]]:
    """Wrap main so that a crash exits `crash` (after calling on_crash with the reason)."""

    def wrap(fn: Main) -> Callable[..., int]:
        def main(argv: list[str] | None = None) -> int:
            return call(name, crash, fn, list(sys.argv) if argv is None else argv, on_crash)

        main.__name__ = fn.__name__
        main.__doc__ = fn.__doc__
        main.__wrapped__ = fn  # type: ignore[attr-defined]
        return main

    return wrap


def _undo_locale_coercion() -> None:
    """Remove the LC_CTYPE that Python's start-up added (PEP 538) but our caller did not pass.

    A program's environment is its interface: qmail-local hands it on to
    |program deliveries, so it must be exactly what the caller gave.
    """
    if "LC_CTYPE" not in os.environ:
        return
    try:
        with open("/proc/self/environ", "rb") as f:
            initial = f.read()
    except OSError:
        return
    if not initial.startswith(b"LC_CTYPE=") and b"\0LC_CTYPE=" not in initial:
        del os.environ["LC_CTYPE"]


def stub(module: str, home: str) -> None:
    """Run a QMAILHOME/bin stub: import module, call its main, exit with its code."""
    from pyqmail import home as _home

    from pyqmail.proctitle import set_title

    _undo_locale_coercion()
    _home.set_default(home)
    # exec of a script shows `python3 -IS PATH ARGS`; qmail's programs show their argv.
    set_title(sys.argv[0], sys.argv)
    mod = __import__(module, fromlist=["main"])
    rc = mod.main(list(sys.argv))
    _flush_std()
    os._exit(rc & 0xFF)
