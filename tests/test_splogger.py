"""splogger(8): messages, stamps, priorities, folding."""

from __future__ import annotations

import os

from conftest import QHome, expect, run
from pyqmail.svc import splogger


def _log(data: bytes, times: list[float]) -> list[tuple[int, bytes]]:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    out: list[tuple[int, bytes]] = []
    clock = iter(times)
    try:
        splogger.run(r, lambda p, m: out.append((p, m)), clock=lambda: next(clock))
    finally:
        os.close(r)
    return out


def test_lines_become_stamped_messages_with_priorities() -> None:
    out = _log(b"new msg 1\nwarning: trouble\nalert: oh no\n\nlast", [10.5, 11.0, 12.25, 13.0, 14.0, 15.0])
    assert out == [
        (splogger.LOG_INFO, b"10.500000 new msg 1"),
        (splogger.LOG_WARNING, b"11.000000 warning: trouble"),
        (splogger.LOG_ALERT, b"12.250000 alert: oh no"),
        (splogger.LOG_INFO, b"14.000000 last"),
    ]


def test_unprintable_and_folding() -> None:
    out = _log(b"a\tb\x00c\xff\n" + b"x" * 1700 + b"\n", [1.0, 2.0, 3.0])
    assert out[0] == (splogger.LOG_INFO, b"1.000000 a?b?c?")
    assert [m[:10] for _, m in out[1:]] == [b"2.000000 x", b"2.000000+x", b"2.000000+x"]
    assert [len(m) - 9 for _, m in out[1:]] == [800, 800, 100]


def test_program_reads_all_input_and_exits_0(qhome: QHome) -> None:
    expect(run([qhome.bin("splogger"), "pyqmail-test", "2"], input=b"status: local 0/10 remote 0/20\n" * 3))
