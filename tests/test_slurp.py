"""slurp.read_all: the bounded whole-descriptor reader of qmail-local, qmail-newu and qmail-pw2u."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyqmail import slurp


def _open_with(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "f"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


@pytest.mark.parametrize("data", [b"", b"x", b"a\nb", b"y" * (slurp.CHUNK * 2 + 7)])
def test_reads_to_the_end(tmp_path: Path, data: bytes) -> None:
    fd = _open_with(tmp_path, data)
    try:
        assert slurp.read_all(fd, len(data)) == data
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [4, slurp.CHUNK + 1])
def test_one_byte_over_the_limit_is_none(tmp_path: Path, size: int) -> None:
    fd = _open_with(tmp_path, b"z" * size)
    try:
        assert slurp.read_all(fd, size - 1) is None
    finally:
        os.close(fd)


def test_a_read_error_raises() -> None:
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(IsADirectoryError):
            slurp.read_all(fd, 100)
    finally:
        os.close(fd)
