"""Fuzzing the cdb reader and writer: what the writer writes the reader finds; hostile files fail cleanly.

Hostile files: random bytes, valid files cut short or with bytes changed, and
headers whose table pointers and slot counts aim anywhere (out of range, at
the header itself, at slots that point back: loops). The reader's only
error is CDBError, and it ends: a lookup visits each slot at most once.
"""

from __future__ import annotations

import io
import struct

from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import bounded, tracing  # noqa: F401  (tracing: an autouse fixture)
from pyqmail import cdb

KEY = st.one_of(st.binary(max_size=8), st.sampled_from([b"", b"a", b"dup", b"\0\xff"]))
RECORDS = st.lists(st.tuples(KEY, st.binary(max_size=20)), max_size=60)


def _build(records: list[tuple[bytes, bytes]]) -> bytes:
    f = io.BytesIO()
    w = cdb.Writer(f)
    for k, v in records:
        w.add(k, v)
    w.finish()
    return f.getvalue()


def _lookups(r: cdb.Reader, keys: list[bytes]) -> None:
    """Every kind of read; raise only CDBError."""
    for k in keys:
        r.get(k)
        list(r.find_all(k))
        _ = k in r
    for _ in r.items():
        pass


@given(RECORDS, st.lists(KEY, max_size=10))
@bounded
def test_reader_finds_what_the_writer_wrote(records: list[tuple[bytes, bytes]], probes: list[bytes]) -> None:
    r = cdb.Reader(_build(records))
    assert list(r.items()) == records
    for k in {k for k, _ in records} | set(probes):
        want = [v for kk, v in records if kk == k]
        assert list(r.find_all(k)) == want
        assert r.get(k) == (want[0] if want else None)


@given(RECORDS, st.integers(0, 1 << 16), st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)),
                                                    max_size=8), st.lists(KEY, max_size=5))
@bounded
def test_damaged_files_fail_cleanly(records: list[tuple[bytes, bytes]], cut: int,
                                    changes: list[tuple[int, int]], probes: list[bytes]) -> None:
    data = bytearray(_build(records))
    for pos, value in changes:
        data[pos % len(data)] = value
    data = data[:cut % (len(data) + 1)]
    keys = [k for k, _ in records[:5]] + probes
    try:
        r = cdb.Reader(bytes(data))
    except cdb.CDBError:
        assert len(data) < cdb.HEADER_SIZE
    else:
        try:
            _lookups(r, keys)
        except cdb.CDBError:
            pass
    # As tcpserver reads a short rules file: lookups fail only with CDBError.
    short = cdb.Reader(bytes(data), allow_short=True)
    try:
        _lookups(short, keys)
    except cdb.CDBError:
        pass


POINTER = st.one_of(st.integers(0, 4096), st.sampled_from([0, 2040, 2048, 0xFFFFFFF8, 0xFFFFFFFF]),
                    st.integers(0, 0xFFFFFFFF))
SLOTS = st.one_of(st.integers(0, 16), st.sampled_from([0x7FFFFFFF, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))


@given(st.lists(st.tuples(POINTER, SLOTS), min_size=1, max_size=256),
       st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), POINTER), max_size=64),
       st.binary(max_size=300), st.lists(KEY, max_size=5))
@bounded
def test_hostile_pointers_fail_cleanly(header: list[tuple[int, int]], slots: list[tuple[int, int]],
                                       tail: bytes, probes: list[bytes]) -> None:
    # Every table pointer aims at the one block of slots after the header, or
    # anywhere; slots point at records, at the header, past the end, or back at slots.
    pairs = (header * (256 // len(header) + 1))[:256]
    data = b"".join(struct.pack("<LL", p, n) for p, n in pairs)
    data += b"".join(struct.pack("<LL", h, p) for h, p in slots) + tail
    keys = probes + [b"", b"a"]
    r = cdb.Reader(data)
    try:
        _lookups(r, keys)
    except cdb.CDBError:
        pass


@given(st.binary(min_size=cdb.HEADER_SIZE, max_size=cdb.HEADER_SIZE + 400), st.lists(KEY, max_size=5))
@bounded
def test_random_bytes_fail_cleanly(data: bytes, probes: list[bytes]) -> None:
    r = cdb.Reader(data)
    try:
        _lookups(r, probes + [b""])
    except cdb.CDBError:
        pass
