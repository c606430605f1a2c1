"""TAI64N labels as daemontools writes and reads them (pure functions, no I/O).

A label is 12 bytes: 8 of TAI seconds (2^62 + 10 + unix seconds: daemontools
counts a fixed 10 leap seconds, not the real table) and 4 of nanoseconds,
written as '@' and 24 lowercase hex digits.
"""

from __future__ import annotations

import time

OFFSET = (1 << 62) + 10
LABEL_LEN = 25  # '@' + 24 hex digits
_HEX = {c: i for i, c in enumerate(b"0123456789abcdef")}
_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1


def label(unix_ns: int) -> bytes:
    """Return the 25-byte external TAI64N label '@...' for a time in unix nanoseconds."""
    secs, nano = divmod(unix_ns, 1_000_000_000)
    return b"@%016x%08x" % ((secs + OFFSET) & _MASK64, nano)


def parse(text: bytes) -> tuple[int, int, int]:
    """Read hex digits after an '@' as tai64nlocal does; return (unix seconds, nanoseconds, digits used).

    tai64nlocal shifts every lowercase hex digit into a 96-bit register (64
    bits of seconds, 32 of nanoseconds), however many there are; the first
    other byte ends the label.
    """
    reg = 0
    used = 0
    for byte in text:
        digit = _HEX.get(byte)
        if digit is None:
            break
        reg = ((reg << 4) | digit) & ((1 << 96) - 1)
        used += 1
    secs = (reg >> 32) & _MASK64
    nano = reg & _MASK32
    unix = secs - OFFSET
    if unix >= 1 << 63:  # the C code wraps into a signed time_t
        unix -= 1 << 64
    elif unix < -(1 << 63):
        unix += 1 << 64
    return unix, nano, used


def local(unix: int, nano: int) -> bytes | None:
    """Return 'YYYY-MM-DD HH:MM:SS.nnnnnnnnn' in local time, or None if localtime cannot say."""
    try:
        tm = time.localtime(unix)
    except (OverflowError, OSError, ValueError):
        return None
    # The C program prints the year as an unsigned long: years before 0 wrap.
    year = tm.tm_year % (1 << 64)
    return b"%d-%02d-%02d %02d:%02d:%02d.%09d" % (
        year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, nano)
