"""Starting programs without paying for an interpreter (ARCHITECTURE decision 5).

`spawn` runs a program by path with argv, environment, descriptors, cwd,
credentials and umask. If the path is one of pyqmail's QMAILHOME/bin stubs it
forks and calls the program's `main` in the child; anything else (a user's
wrapper, /bin/sh for a |program line) is exec'd. Both paths set the child up
identically: the descriptors named in `fds` and no others, the environment
given and no other, signals as a new process sees them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import ModuleType
    from typing import NoReturn

from pyqmail import home as _home
from pyqmail import sig as signal
from pyqmail.privs import Credentials, drop
from pyqmail.proctitle import preload as _preload_title
from pyqmail.proctitle import set_title

# The stubs' text and reading: pyqmail.stubfile, re-exported under spawn's names.
from pyqmail.stubfile import STUB_MARKER as STUB_MARKER, Stub as Stub, read_stub as read_stub, stub_text as stub_text

_SPAWN_FAILED = 127
_MAX_FD = os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536


def _which(path: str, env: Mapping[str, str]) -> str:
    if "/" in path:
        return path
    for d in env.get("PATH", os.defpath).split(":"):
        cand = os.path.join(d or ".", path)
        if os.access(cand, os.X_OK) and not os.path.isdir(cand):
            return cand
    return path


def _arrange_fds(fds: Mapping[int, int]) -> None:
    floor = max(fds, default=2) + 1
    # Stage every source above all targets first, so that no dup2 clobbers
    # a source still to be moved.
    staged = {child: fcntl.fcntl(parent, fcntl.F_DUPFD_CLOEXEC, floor) for child, parent in fds.items()}
    for child, tmp in staged.items():
        os.dup2(tmp, child, inheritable=True)
    low = 0
    for fd in sorted(fds):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _MAX_FD)


def _reset_signals(fast: bool) -> None:
    # Handlers set in this process become SIG_DFL, as exec makes them;
    # ignored signals stay ignored, as exec leaves them.
    for signum in range(1, signal.NSIG):
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(signum)
        except (ValueError, OSError):
            continue
        if callable(handler) or handler is None:
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (ValueError, OSError):
                pass
    if fast:
        # What a new Python process has: SIGINT raises KeyboardInterrupt,
        # SIGPIPE and SIGXFSZ are ignored (writes fail with an error instead).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        # A daemon's signal wakeup descriptor (selectors loops) must not
        # follow the child: its number may name one of the child's files.
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass


class _LazyStd:
    """A standard stream a new process would have, made on first use.

    Most programs talk on their descriptors directly: building three text
    streams in every forked child would copy the pages they touch.
    """

    __slots__ = ("_fd", "_mode", "_errors", "_stream")

    def __init__(self, fd: int, mode: str, errors: str) -> None:
        self._fd = fd
        self._mode = mode
        self._errors = errors
        self._stream: object = None

    def _real(self) -> object:
        stream = self._stream
        if stream is None:
            import io

            raw = io.FileIO(self._fd, self._mode, closefd=False)
            buffered: io.BufferedReader | io.BufferedWriter
            buffered = io.BufferedReader(raw) if self._mode == "r" else io.BufferedWriter(raw)
            stream = self._stream = io.TextIOWrapper(
                buffered, encoding="utf-8", errors=self._errors,
                line_buffering=(self._fd == 2), write_through=(self._fd == 2))
        return stream

    def __getattr__(self, name: str) -> object:
        return getattr(self._real(), name)

    def __iter__(self) -> object:
        return iter(self._real())  # type: ignore[call-overload]

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        if self._stream is not None:
            self._stream.flush()  # type: ignore[attr-defined]


def _fresh_std_streams() -> None:
    """Give the child the sys.stdin/stdout/stderr a new process would have on fds 0-2."""

    def open_std(fd: int, mode: str, errors: str) -> _LazyStd | None:
        try:
            os.fstat(fd)
        except OSError:
            return None
        return _LazyStd(fd, mode, errors)

    def reusable(stream: object, original: object, fd: int) -> bool:
        # The interpreter's own writer on this descriptor number, flushed
        # before the fork, serves the child's new descriptor as well.
        try:
            return stream is original and stream is not None and stream.fileno() == fd  # type: ignore[attr-defined]
        except (OSError, ValueError, AttributeError):
            return False

    # stdin is always new: the parent's reader may hold read-ahead.
    sys.stdin = open_std(0, "r", "surrogateescape")  # type: ignore[assignment]
    if not reusable(sys.stdout, sys.__stdout__, 1):
        sys.stdout = open_std(1, "w", "surrogateescape")  # type: ignore[assignment]
    if not reusable(sys.stderr, sys.__stderr__, 2):
        sys.stderr = open_std(2, "w", "backslashreplace")  # type: ignore[assignment]


def _set_environ(env: Mapping[str, str]) -> None:
    """Make os.environ (and the C environment) exactly env, touching only what differs."""
    current = os.environ
    for key in [k for k in current if k not in env]:
        del current[key]
    for key, value in env.items():
        if current.get(key) != value:
            current[key] = value


def restore_environb(base: dict[bytes, bytes]) -> None:
    """Make the environment (posix.environ, which os.environb wraps, and the C one) exactly base,
    touching only what differs: tcpserver's workers put each connection's environment back."""
    import posix

    env = posix.environ
    for name in [k for k in env if k not in base]:
        os.unsetenv(name)
        del env[name]
    for name, value in base.items():
        if env.get(name) != value:
            os.putenv(name, value)
            env[name] = value


def _prepare(path: str, env: Mapping[str, str], fast: bool,
             preload: bool) -> tuple[str, Stub | None, ModuleType | None]:
    """Find path, decide fork-and-call or exec, flush our streams; import a stub's module."""
    target = _which(path, env)
    stub = read_stub(target) if fast else None
    if stub is not None and not os.access(target, os.X_OK):
        stub = None  # exec it, so that it fails exactly as exec fails (EACCES)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    mod = None
    if stub is not None:
        _preload_title()
        # Import in the parent, once: every later child inherits the module
        # and pays nothing for it. Modules have no import-time side effects.
        try:
            mod = sys.modules.get(stub.module) or __import__(stub.module, fromlist=["main"])
        except ImportError:
            if not preload:
                raise
    return target, stub, mod


def _enter(target: str, argv: Sequence[str], env: Mapping[str, str], cwd: str | None,
           creds: Credentials | None, umask: int | None, stub: Stub | None, set_env: bool) -> None:
    """Set this process up as exec would (descriptors already arranged); exec unless stub."""
    if umask is not None:
        os.umask(umask)
    if creds is not None:
        drop(creds, allow_root=True)
    if cwd is not None:
        os.chdir(cwd)
    _reset_signals(stub is not None)
    if stub is None:
        os.execve(target, list(argv), env)
    if set_env:
        _set_environ(env)
    _home.set_default(stub.home)
    # As exec of a script does: the interpreter's argv[0] is the script's path.
    sys.argv = [target, *argv[1:]]
    # As exec of a program shows it: its argv in ps, its file name as comm.
    set_title(target, argv)
    _fresh_std_streams()


def _call_main(mod: ModuleType, target: str, argv: Sequence[str]) -> int:
    """Call the program's main in this process; return its exit code (0-255), our streams flushed."""
    rc: int = 111
    try:
        rc = mod.main([target, *argv[1:]])
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except BaseException:  # noqa: BLE001
                pass
    return rc & 0xFF


def _run_main(mod: ModuleType, target: str, argv: Sequence[str]) -> NoReturn:
    """Call the program's main in this process and end the process with its code (111 if it raised)."""
    rc = 111
    try:
        rc = _call_main(mod, target, argv)
    finally:
        os._exit(rc)


def spawn(path: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
          fds: Mapping[int, int] | None = None, cwd: str | None = None,
          creds: Credentials | None = None, umask: int | None = None,
          fast: bool = True) -> int:
    """Start path as a new process and return its pid.

    fds maps each child descriptor to a parent descriptor (default: 0, 1, 2
    as they are); every other descriptor is closed in the child. env defaults
    to os.environ. Raise OSError if the program cannot be started (no such
    file, not executable, cwd or credentials refused), as exec would.
    """
    env = dict(os.environ if env is None else env)
    fds = {0: 0, 1: 1, 2: 2} if fds is None else dict(fds)
    target, stub, mod = _prepare(path, env, fast, preload=True)
    rpipe, wpipe = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        try:
            fds_with_pipe = dict(fds)
            # Keep the error pipe through the fd shuffle at a descriptor the
            # child does not use; it is close-on-exec, so exec closes it.
            # Above every target and every source, so that it clobbers none of them.
            report = max([*fds_with_pipe, *fds_with_pipe.values(), wpipe, 2]) + 1
            os.dup2(wpipe, report, inheritable=False)
            fds_with_pipe[report] = report
            _arrange_fds(fds_with_pipe)
            os.set_inheritable(report, False)
            _enter(target, argv, env, cwd, creds, umask, stub, set_env=True)
            assert stub is not None  # _enter returns only for a stub
            if mod is None:
                mod = __import__(stub.module, fromlist=["main"])
            os.close(report)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            code = e.errno if isinstance(e, OSError) and e.errno else errno.ENOEXEC
            try:
                os.write(report, code.to_bytes(4, "little") + str(e).encode("utf-8", "replace")[:400])
            finally:
                os._exit(_SPAWN_FAILED)
        _run_main(mod, target, argv)
    os.close(wpipe)
    try:
        data = b""
        while True:
            chunk = os.read(rpipe, 512)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(rpipe)
    if data:
        os.waitpid(pid, 0)
        code = int.from_bytes(data[:4], "little")
        raise OSError(code, os.strerror(code) + ": " + data[4:].decode("utf-8", "replace"), path)
    return pid


def become(path: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
           fds: Mapping[int, int] | None = None, cwd: str | None = None,
           creds: Credentials | None = None, umask: int | None = None,
           fast: bool = True) -> NoReturn:
    """Turn this process into path, as exec does; never return, raise OSError if it cannot start.

    The process is set up exactly as spawn() sets up its child (descriptors,
    credentials, cwd, signals, environment); a stub's program then runs in
    this process and its exit code ends it. Descriptors and credentials may
    already be changed when OSError is raised: the caller should only exit.
    env defaults to os.environ, left as it is.
    """
    keep_env = env is None
    env = os.environ if env is None else dict(env)
    fds = {0: 0, 1: 1, 2: 2} if fds is None else dict(fds)
    target, stub, mod = _prepare(path, env, fast, preload=False)
    _arrange_fds(fds)
    _enter(target, argv, env, cwd, creds, umask, stub, set_env=not keep_env)
    assert mod is not None and stub is not None  # _enter returns only for a stub
    _run_main(mod, target, argv)


def reusable(path: str) -> bool:
    """Whether path is a stub whose program may run again in the process it returned in (REUSABLE)."""
    try:
        target, stub, mod = _prepare(path, os.environ, True, preload=True)
    except OSError:
        return False
    return stub is not None and mod is not None and getattr(mod, "REUSABLE", False) is True


def call(path: str, argv: Sequence[str]) -> int | None:
    """Run a REUSABLE stub's program in this process, as become() would, and return its exit code.

    For a worker that serves one connection after another (tcpserver): the
    caller has put the descriptors in place and set the environment; this
    sets up signals, the home, argv, the title and fresh standard streams as
    become() does, calls main and returns its code (0-255) instead of
    exiting. None, before anything is changed, when path is not such a
    program: the caller then uses become(). ImportError and OSError as
    become() raises them.
    """
    target, stub, mod = _prepare(path, os.environ, True, preload=False)
    if stub is None or mod is None or getattr(mod, "REUSABLE", False) is not True:
        return None
    _enter(target, argv, os.environ, None, None, None, stub, set_env=False)
    return _call_main(mod, target, argv)


def exit_code(status: int) -> int:
    """Return the exit code of a wait status; -N for death by signal N."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def wait(pid: int) -> int:
    """Wait for pid; return its exit code, or -N if signal N killed it."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return exit_code(status)
        except InterruptedError:
            continue


def run(path: str, argv: Sequence[str], **kw: object) -> int:
    """spawn() and wait(); return the exit code (-N for signal N)."""
    return wait(spawn(path, argv, **kw))  # type: ignore[arg-type]
