"""qmail-control(5): how control files are read."""

from __future__ import annotations

import os

import pytest

from conftest import IS_ROOT, TEST_USER, QHome
from pyqmail import cdb, control, home


@pytest.fixture
def ctl(qhome: QHome) -> QHome:
    home.set_default(str(qhome.path))
    os.environ.pop("QMAILHOME", None)
    return qhome


def test_me_and_defaults(ctl: QHome) -> None:
    assert control.me() == "test.example.com"
    assert control.read_default("bouncehost", None) == "test.example.com"
    assert control.read_default("bouncefrom", "MAILER-DAEMON", flag_me=False) == "MAILER-DAEMON"
    ctl.control("me", None)
    assert control.read_default("helohost", "fallback") == "fallback"


def test_trailing_blanks_and_first_line_only(ctl: QHome) -> None:
    ctl.control("smtpgreeting", "mail.example.com ESMTP  \t \nsecond line\n")
    assert control.read_line("smtpgreeting") == "mail.example.com ESMTP"
    ctl.control("me", "no.newline.example")
    assert control.me() == "no.newline.example"
    ctl.control("me", "")
    assert control.me() == ""


def test_comments_are_not_special_in_one_line_files(ctl: QHome) -> None:
    ctl.control("smtpgreeting", "# not a comment\n")
    assert control.read_line("smtpgreeting") == "# not a comment"


@pytest.mark.parametrize("text,value", [
    ("1234\n", 1234), ("  12\n", 30), ("12abc\n", 12), ("abc\n", 30), ("", 30), ("0\n", 0),
    ("99999999999999999999\n", 99999999999999999999),
])
def test_numbers(ctl: QHome, text: str, value: int) -> None:
    ctl.control("timeoutsmtpd", text)
    assert control.read_int("timeoutsmtpd", 30) == value


def test_missing_number_is_default(ctl: QHome) -> None:
    assert control.read_int("concurrencyremote", 20) == 20


def test_lists_skip_comments_and_blank_lines(ctl: QHome) -> None:
    ctl.control("rcpthosts", "# comment\nexample.com  \n\n.example.net\t\n#x\nlast")
    assert control.read_lines("rcpthosts") == ["example.com", ".example.net", "last"]
    assert control.read_lines("virtualdomains") is None
    assert control.read_lines("locals", flag_me=True) == ["test.example.com"]
    ctl.control("locals", None)
    assert control.read_lines("locals", flag_me=True) == ["test.example.com"]


def test_bytes_round_trip(ctl: QHome) -> None:
    (ctl.path / "control" / "smtpgreeting").write_bytes(b"caf\xc3\xa9 \xff\n")
    assert control.read_line("smtpgreeting").encode(control.ENCODING) == b"caf\xc3\xa9 \xff"


def test_unreadable_is_an_error(ctl: QHome) -> None:
    ctl.control("databytes", "5\n")
    (ctl.path / "control" / "databytes").chmod(0)
    pid = os.fork()
    if pid == 0:  # root reads any file: check as an ordinary user
        code = 3
        try:
            if IS_ROOT:
                import pwd
                from pyqmail.privs import Credentials, drop
                pw = pwd.getpwnam(TEST_USER)
                drop(Credentials(pw.pw_uid, pw.pw_gid))
            try:
                control.read_int("databytes", 0)
                code = 1
            except control.ControlError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_directory_in_place_of_file_is_an_error(ctl: QHome) -> None:
    (ctl.path / "control" / "databytes").mkdir()
    with pytest.raises(control.ControlError):
        control.read_int("databytes", 0)


def test_domain_set_wildcards_and_cdb(ctl: QHome) -> None:
    path = ctl.path / "control" / "morercpthosts.cdb"
    cdb.write_atomic(str(path), [(b"more.example", b""), (b".deep.example", b"")])
    ds = control.DomainSet(["Example.COM", ".example.net"], str(path))
    assert ds.match("example.com") and ds.match("EXAMPLE.com")
    assert not ds.match("sub.example.com")
    assert ds.match("a.example.net") and ds.match("a.b.example.net")
    assert not ds.match("example.net")
    assert ds.match("more.example") and ds.match("x.deep.example") and not ds.match("deep.example")
    assert not ds.match("") and not ds.match(".")
    assert control.DomainSet([], str(ctl.path / "control" / "nocdb")).match("x") is False


def test_qmailhome_overrides(ctl: QHome, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMAILHOME", "/nonexistent-home")
    home.reset()
    try:
        assert home.home() == "/nonexistent-home"
        assert control.me() is None
    finally:
        monkeypatch.delenv("QMAILHOME")
        home.reset()


def test_domain_set_folds_ascii_only() -> None:
    ds = control.DomainSet(["\xc4x.example"])
    assert ds.match("\xc4X.EXAMPLE")
    assert not ds.match("\xe4x.example"), "qmail's case_lowerb folds A-Z only"


def test_long_files_are_read_whole(ctl: QHome) -> None:
    """Reads start small and grow: a file of many chunks, a line across a chunk boundary, no newline at the end."""
    names = [f"host{i:06d}.example" for i in range(20000)]
    ctl.control("rcpthosts", "\n".join(names))
    assert control.read_lines("rcpthosts") == names
    ctl.control("smtpgreeting", "x" * 4095 + "yz\nsecond\n")
    assert control.read_line("smtpgreeting") == "x" * 4095 + "yz"
