"""home.install() is read once per home: a fork-and-call child keeps its parent's record (issue 17)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail import home


def _write(top: Path, split: int) -> None:
    (top / "conf").mkdir(parents=True)
    (top / "conf" / "install").write_text(f"mode single\nsplit {split}\n")


def test_same_home_keeps_the_record_another_home_reads_its_own(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QMAILHOME", raising=False)
    for name in ("_default", "_home", "_install", "_install_home"):
        monkeypatch.setattr(home, name, getattr(home, name))  # restored after the test
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, 7)
    _write(b, 11)
    home.set_default(str(a))
    assert home.install().split == 7
    (a / "conf" / "install").unlink()  # read once: the record stays without the file
    home.set_default(str(a))  # what spawn does in a child started by fork-and-call
    assert home.install().split == 7
    home.set_default(str(b))
    assert home.install().split == 11
    monkeypatch.setenv("QMAILHOME", str(a))  # $QMAILHOME wins, and it is another home
    home.set_default(str(b))
    assert home.install().split == 23  # a has no conf/install any more: the default record
    (a / "conf" / "install").write_text("mode single\nsplit 5\n")  # ... which is not kept: a conf/install written since is read
    home.set_default(str(b))
    assert home.install().split == 5
