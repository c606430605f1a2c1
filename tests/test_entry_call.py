"""pyqmail.entry.call: a program's main run as its stub runs it (STYLE principle 2).

Shared by every stub (entry.program) and by qmail-queued's served qmail-inject
(pyqmail.inject.served), which lets its own Gone through.
"""

from __future__ import annotations

import pytest

from pyqmail.entry import call


class Gone(Exception):
    pass


def _boom(argv: list[str]) -> int:
    raise ValueError("bad " + argv[0])


def test_exit_code_returned() -> None:
    assert call("prog", 111, lambda argv: len(argv), ["a", "b"]) == 2


@pytest.mark.parametrize(("code", "rc"), [(None, 0), (0, 0), (100, 100), ("text", 111)])
def test_system_exit_is_the_exit_code(code: object, rc: int) -> None:
    def main(argv: list[str]) -> int:
        raise SystemExit(code)

    assert call("prog", 111, main, []) == rc


def test_crash_is_the_temporary_code_said_on_descriptor_2(capfd: pytest.CaptureFixture[str]) -> None:
    seen: list[str] = []
    assert call("qmail-inject", 111, _boom, ["x"], seen.append) == 111
    reason = "qmail-inject: fatal: internal error: ValueError: bad x"
    assert seen == [reason]
    assert capfd.readouterr().err == reason + "\n"


def test_a_failing_on_crash_changes_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    def on_crash(reason: str) -> None:
        raise RuntimeError("no")

    assert call("prog", 75, _boom, ["y"], on_crash) == 75
    assert "internal error: ValueError: bad y" in capfd.readouterr().err


def test_let_through_is_raised_not_reported(capfd: pytest.CaptureFixture[str]) -> None:
    def main(argv: list[str]) -> int:
        raise Gone()

    seen: list[str] = []
    with pytest.raises(Gone):
        call("prog", 111, main, [], seen.append, let_through=(Gone,))
    assert seen == [] and capfd.readouterr().err == ""
