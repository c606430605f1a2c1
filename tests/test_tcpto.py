"""lock/tcpto: the timeout table's format and rules, qmail-tcpto(8) and qmail-tcpok(8)."""

from __future__ import annotations

import os

from conftest import QHome, expect, run

from pyqmail.remote import tcpto
from pyqmail.remote.qmail_tcpto import listing

IP = b"\x0a\x00\x00\x01"
T0 = 1_700_000_000


def apply(buf: bytes, change: tuple[int, bytes] | None) -> bytes:
    if change is None:
        return buf
    i, rec = change
    return buf[:i * 16] + rec + buf[(i + 1) * 16:]


def record(ip: bytes, count: int, when: int) -> bytes:
    return ip + bytes([count]) + bytes(3) + when.to_bytes(4, "little") + bytes(4)


def test_first_timeout_makes_a_record() -> None:
    buf = bytes(1024)
    assert tcpto.skip(buf, IP, T0, 0) == (False, False)
    buf = apply(buf, tcpto.update(buf, IP, True, False, T0))
    assert buf[:16] == record(IP, 1, T0) and buf[16:] == bytes(1008)


def test_two_timeouts_two_minutes_apart_skip_for_an_hour() -> None:
    buf = record(IP, 1, T0) + bytes(1008)
    assert tcpto.update(buf, IP, True, True, T0 + 119) is None  # within two minutes: not counted
    buf = apply(buf, tcpto.update(buf, IP, True, True, T0 + 120))
    assert buf[:16] == record(IP, 2, T0 + 120)
    assert tcpto.skip(buf, IP, T0 + 121, pid=0) == (True, True)
    assert tcpto.skip(buf, IP, T0 + 120 + 60 * 64 - 1, pid=0) == (True, True)
    assert tcpto.skip(buf, IP, T0 + 120 + 60 * 64, pid=0) == (False, True)
    assert tcpto.skip(buf, IP, T0 + 120 + 60 * 64, pid=31) == (True, True)  # 64 * (60 + pid % 32)


def test_count_stops_at_ten_and_success_clears() -> None:
    buf = record(IP, 10, T0) + bytes(1008)
    buf = apply(buf, tcpto.update(buf, IP, True, True, T0 + 500))
    assert buf[4] == 10
    buf = apply(buf, tcpto.update(buf, IP, False, True, T0 + 600))
    assert buf[:16] == record(IP, 0, T0 + 500)  # the count goes, the time stays
    assert tcpto.update(bytes(1024), IP, False, False, T0) is None


def test_full_table_replaces_the_record_expiring_first() -> None:
    recs = [record(bytes([10, 0, 1, i]), 1 + (i % 3), T0 + 1000 - i) for i in range(64)]
    buf = b"".join(recs)
    i, rec = tcpto.update(buf, IP, True, False, T0 + 2000) or (None, b"")
    # when + count * 1024 is smallest for count 1 and the latest index of those (earliest time)
    assert i == 63 and rec == record(IP, 1, T0 + 2000)


def test_short_and_odd_files() -> None:
    assert tcpto.records(b"\x01" * 20) == 1
    assert tcpto.skip(b"", IP, T0, 0) == (False, False)
    assert tcpto.entries(record(IP, 200, T0) + record(IP, 3, T0)) == [(IP, 3, T0)]  # signed char


def test_listing_format() -> None:
    buf = record(IP, 2, T0) + record(b"\x7f\0\0\x01", 0, T0) + record(b"\xc0\xa8\x00\x09", 1, T0 + 10)
    assert listing(buf, T0 + 42) == (b"10.0.0.1 timed out 42 seconds ago; # recent timeouts: 2\n"
                                     b"192.168.0.9 timed out 32 seconds ago; # recent timeouts: 1\n")
    assert listing(record(IP, 1, T0 + 5), T0) == (
        b"10.0.0.1 timed out 18446744073709551611 seconds ago; # recent timeouts: 1\n")


def test_qmail_tcpto_and_tcpok_programs(qhome: QHome) -> None:
    path = qhome.queue / "lock" / "tcpto"
    assert path.read_bytes() == bytes(1024)
    assert expect(run([qhome.bin("qmail-tcpto")]), 0).stdout == b""
    path.write_bytes(record(IP, 3, 1) + bytes(1008))
    out = expect(run([qhome.bin("qmail-tcpto")]), 0).stdout
    assert out.startswith(b"10.0.0.1 timed out ") and out.endswith(b" seconds ago; # recent timeouts: 3\n")
    res = expect(run([qhome.bin("qmail-tcpok")]), 0)
    assert res.stdout == b"" and res.stderr == b""
    assert path.read_bytes() == bytes(1024)


def test_tcpok_writes_zeros_without_truncating(qhome: QHome) -> None:
    path = qhome.queue / "lock" / "tcpto"
    path.write_bytes(b"\x01" * 2000)
    expect(run([qhome.bin("qmail-tcpok")]), 0)
    assert path.read_bytes() == bytes(1024) + b"\x01" * 976


def test_missing_table(qhome: QHome) -> None:
    path = qhome.queue / "lock" / "tcpto"
    path.unlink()
    res = expect(run([qhome.bin("qmail-tcpto")]), 111)
    assert res.stdout == b"fatal: unable to open tcpto: file does not exist\n"
    res = expect(run([qhome.bin("qmail-tcpok")]), 111)
    assert res.stderr == f"qmail-tcpok: fatal: unable to write {qhome.path}/queue/lock/tcpto: file does not exist\n".encode()


def test_missing_queue_lock(qhome: QHome) -> None:
    (qhome.queue / "lock" / "tcpto").unlink()
    for name in os.listdir(qhome.queue / "lock"):
        os.unlink(qhome.queue / "lock" / name)
    os.rmdir(qhome.queue / "lock")
    res = expect(run([qhome.bin("qmail-tcpto")]), 111)
    assert res.stdout == b"fatal: unable to chdir: file does not exist\n"
    res = expect(run([qhome.bin("qmail-tcpok")]), 111)
    assert res.stderr == f"qmail-tcpok: fatal: unable to chdir to {qhome.path}/queue/lock: file does not exist\n".encode()
