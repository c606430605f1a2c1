"""supervise's status file, daemontools 0.76's 18-byte format, and svstat's reading of it.

The file `s/supervise/status` holds: a 12-byte TAI64N stamp of the last
change of pid (big-endian seconds + 2^62 + 10, then nanoseconds), the pid in
4 bytes little-endian (0: down), a paused byte (nonzero only while up) and
the wanted state: 'u', 'd', or 0 for "once" (svc -o).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from pyqmail.errors import describe
from pyqmail.svc.tai64 import OFFSET

SIZE = 18
NAME = "supervise/status"
NEW = "supervise/status.new"
OK = "supervise/ok"
DOWN = "down"
_MASK64 = (1 << 64) - 1


class StatusError(Exception):
    """The status of a service cannot be read; str() is svstat's wording ('unable to ...')."""


class ReadFailed(StatusError):
    """Reading the status file failed (svstat 0.76 then shows whatever its buffer held)."""

    def __init__(self, normally_up: bool, e: OSError) -> None:
        super().__init__("unable to read supervise/status: " + describe(e))
        self.normally_up = normally_up


class NotRunning(StatusError):
    """No supervise is running for the service."""

    def __init__(self) -> None:
        super().__init__("supervise not running")


@dataclass(frozen=True, slots=True)
class Status:
    """A service's state as its status file and its `down` file tell it."""

    pid: int            # 0 when the service is down
    stamp: int          # unix seconds of the last change of pid (TAI64 label - 2^62 - 10)
    nano: int
    paused: bool
    want: str           # 'u', 'd', or '' (no wish: svc -o)
    normally_up: bool   # no `down` file

    def seconds(self, now: int) -> int:
        """Return how long the state has lasted at unix time now (0 if the stamp is ahead)."""
        # svstat prints a double made from the unsigned TAI difference.
        return int(float(max(0, now - self.stamp)))

    def describe(self, now: int) -> str:
        """Return svstat's text after 'dir: ' for this state at unix time now."""
        if self.pid:
            text = f"up (pid {self.pid}) {self.seconds(now)} seconds"
            if not self.normally_up:
                text += ", normally down"
            if self.paused:
                text += ", paused"
            if self.want == "d":
                text += ", want down"
        else:
            text = f"down {self.seconds(now)} seconds"
            if self.normally_up:
                text += ", normally up"
            if self.want == "u":
                text += ", want up"
        return text


def pack(unix_ns: int, pid: int, paused: bool, want: str) -> bytes:
    """Return the 18 status bytes for a change at unix_ns (daemontools' stamp: microseconds + 500 ns)."""
    secs, nano = divmod(unix_ns, 1_000_000_000)
    # taia_now reads gettimeofday: microseconds, reported as 1000*usec + 500 ns.
    nano = nano // 1000 * 1000 + 500
    return ((secs + OFFSET) & _MASK64).to_bytes(8, "big") + nano.to_bytes(4, "big") \
        + (pid & 0xFFFFFFFF).to_bytes(4, "little") \
        + bytes([1 if (pid and paused) else 0]) + (want.encode("latin-1") or b"\0")[:1]


def unpack(data: bytes, normally_up: bool) -> Status:
    """Return the Status that 18 status bytes say; raise ValueError if data is shorter."""
    if len(data) < SIZE:
        raise ValueError("bad format")
    # Unwrapped: stamp + OFFSET gives back the unsigned TAI seconds svstat subtracts.
    unix = int.from_bytes(data[0:8], "big") - OFFSET
    want = data[17]
    return Status(pid=int.from_bytes(data[12:16], "little"), stamp=unix,
                  nano=int.from_bytes(data[8:12], "big"), paused=data[16] != 0,
                  want=chr(want) if want else "", normally_up=normally_up)


def _open_dir(service_dir: str) -> int:
    """Open service_dir for lookups, failing as chdir(2) would (ENOENT, ENOTDIR, EACCES...)."""
    fd = os.open(service_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # A lookup in the directory needs search permission, as chdir does.
        os.stat(".", dir_fd=fd)
    except OSError:
        os.close(fd)
        raise
    return fd


def probe(service_dir: str) -> tuple[bool, bytes]:
    """Return (normally up, the bytes one read of the status file gave, perhaps short).

    Raise NotRunning, ReadFailed if the read itself failed, or StatusError
    (svstat's words) for any other trouble.
    """
    try:
        dfd = _open_dir(service_dir)
    except OSError as e:
        raise StatusError("unable to chdir: " + describe(e)) from None
    try:
        try:
            os.stat(DOWN, dir_fd=dfd)
            normally_up = False
        except FileNotFoundError:
            normally_up = True
        except OSError as e:
            raise StatusError("unable to stat down: " + describe(e)) from None
        try:
            # A FIFO with no reader refuses a non-blocking writer (ENXIO): no supervise.
            os.close(os.open(OK, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd))
        except OSError as e:
            if e.errno == errno.ENXIO:
                raise NotRunning() from None
            raise StatusError("unable to open supervise/ok: " + describe(e)) from None
        try:
            fd = os.open(NAME, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            raise StatusError("unable to open supervise/status: " + describe(e)) from None
        try:
            return normally_up, os.read(fd, SIZE)  # one read, as svstat does
        except OSError as e:
            raise ReadFailed(normally_up, e) from None
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def read(service_dir: str) -> Status:
    """Return the state of the service in service_dir; raise NotRunning or StatusError (svstat's words)."""
    normally_up, data = probe(service_dir)
    try:
        return unpack(data, normally_up)
    except ValueError:
        raise StatusError("unable to read supervise/status: bad format") from None
