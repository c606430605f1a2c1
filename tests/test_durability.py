"""A failed fsync is a failure (issue 12 A.2): no commit point reports success it cannot keep.

Each test makes a real program's fsync fail through pyqmail.durable's seam:
PYQMAIL_TEST_FSYNC_FAIL names a file whose lines are fnmatch patterns, and an
fsync of a descriptor whose path matches one fails with EIO. Removing the file
lifts the failure, so a running qmail-send is seen to retry.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import TEST_USER, QHome, Result, expect
from queuefmt import files, messages
from sendkit import Running, Site, make_site, maildir_messages, qqueue, remove_site
from test_qmail_local import Home, local_args, qlocal, user_home  # noqa: F401 - user_home is a fixture
from test_qmail_queue import envelope

FQDN = "test.example.com"
STATUS0 = b"status: local 0/10 remote 0/20"
SEAM = "PYQMAIL_TEST_FSYNC_FAIL"


def _control(base: Path, *patterns: str) -> Path:
    """Write the seam's file (readable by every user) asking fsyncs of paths matching patterns to fail."""
    p = base / "fsync-fail"
    p.write_text("".join(x + "\n" for x in patterns))
    p.chmod(0o644)
    return p


def _qq(home: QHome, message: bytes, env: bytes, ctl: Path, user: str | None = None) -> Result:
    r, w = os.pipe()
    os.write(w, env)
    os.close(w)
    kw: dict[str, object] = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    argv = [str(home.bin("qmail-queue"))]
    try:
        p = subprocess.run(argv, input=message, stdout=r, stderr=subprocess.PIPE, timeout=60,
                           env={"PATH": "/usr/bin:/bin", SEAM: str(ctl)}, **kw)  # type: ignore[call-overload]
    finally:
        os.close(r)
    return Result(argv, p.returncode, b"", p.stderr)


# --- qmail-queue ------------------------------------------------------------------------

# mess/N is written through the descriptor of pid/PID.TIME.SEQ, whose name the kernel keeps for it.
# intd/N is fsync'd after the todo link (that one fsync commits the link too: no fsync of todo/).
@pytest.mark.parametrize("pattern", ["*/queue/pid/*", "*/queue/intd/*"])
def test_qmail_queue_fsync_failure_is_temporary_and_leaves_no_todo(qhome: QHome, pattern: str) -> None:
    ctl = _control(qhome.path.parent, pattern)
    res = _qq(qhome, b"Subject: x\n\nbody\n", envelope(b"s@x", b"r@y"), ctl)
    assert res.returncode == 53, res.explain()  # "trouble writing to disk", temporary
    left = files(qhome.queue)
    assert left["todo"] == [] and left["pid"] == []
    if pattern == "*/queue/pid/*":
        assert left["mess"] == [] and left["intd"] == []  # S1 again
    else:
        # Taken back from S4: mess/N and intd/N stay for qmail-send's 36-hour cleanup, since a
        # qmail-send that saw todo/N in that instant may be preprocessing it.
        assert len(left["mess"]) == 1 and len(left["intd"]) == 1
    ctl.unlink()  # the disk is well again: the same command queues
    expect(_qq(qhome, b"Subject: x\n\nbody\n", envelope(b"s@x", b"r@y"), ctl))
    assert len(files(qhome.queue)["todo"]) == 1


# --- qmail-local: Maildir and mbox ---------------------------------------------------

@pytest.mark.parametrize("pattern", ["*/Maildir/new", "*/Maildir/tmp/*"])
def test_maildir_fsync_failure_is_111_and_nothing_in_new(qhome: QHome, user_home: Home, pattern: str) -> None:
    user_home.maildir()
    user_home.write(".qmail", b"./Maildir/\n")
    ctl = _control(user_home.path.parent, pattern)
    res = qlocal(qhome, local_args(user_home), env={"PATH": "/usr/bin:/bin", SEAM: str(ctl)}, user=user_home.user)
    assert res.returncode == 111 and res.stderr == b"Temporary error on maildir delivery. (#4.3.0)\n", res.explain()
    assert list((user_home.path / "Maildir" / "new").iterdir()) == []
    assert list((user_home.path / "Maildir" / "tmp").iterdir()) == []
    ctl.unlink()
    res = qlocal(qhome, local_args(user_home), env={"PATH": "/usr/bin:/bin", SEAM: str(ctl)}, user=user_home.user)
    assert res.returncode == 0, res.explain()
    assert len(list((user_home.path / "Maildir" / "new").iterdir())) == 1


def test_mbox_fsync_failure_is_111_and_the_file_is_as_before(qhome: QHome, user_home: Home) -> None:
    before = b"From a@b Thu Jan  1 00:00:00 2026\nSubject: old\n\nold\n\n"
    mbox = user_home.write("Mailbox", before, 0o600)
    user_home.write(".qmail", b"./Mailbox\n")
    ctl = _control(user_home.path.parent, "*/Mailbox")
    res = qlocal(qhome, local_args(user_home), env={"PATH": "/usr/bin:/bin", SEAM: str(ctl)}, user=user_home.user)
    assert res.returncode == 111 and b"Unable to write" in res.stderr, res.explain()
    assert mbox.read_bytes() == before  # truncated back to its old length
    ctl.unlink()
    res = qlocal(qhome, local_args(user_home), env={"PATH": "/usr/bin:/bin", SEAM: str(ctl)}, user=user_home.user)
    assert res.returncode == 0, res.explain()
    assert mbox.read_bytes().startswith(before) and mbox.read_bytes().endswith(b"From the body\n\n")


# --- qmail-send --------------------------------------------------------------------------

@pytest.fixture
def site() -> Site:
    s = make_site(FQDN)
    s.home.bin("qmail-remote").unlink(missing_ok=True)
    yield s
    remove_site(s)


def _user(site: Site, name: str, dotqmail: str | None = None) -> Path:
    home = site.mkdir(name)
    site.maildir(f"{name}/Maildir")
    if dotqmail is not None:
        p = home / ".qmail"
        p.write_text(dotqmail)
        os.chown(p, site.uid, site.gid)
        p.chmod(0o644)
    return home


def _pull_trigger(home: QHome) -> None:
    fd = os.open(home.queue / "lock" / "trigger", os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"\0")
    finally:
        os.close(fd)


@pytest.mark.parametrize("pattern", ["*/queue/info/*", "*/queue/local/*"])
def test_qmail_send_commit_fsync_failure_is_retried(site: Site, pattern: str) -> None:
    """A kept message that must wait is committed; info/N or local/N not durable: todo/N stays."""
    joe = site.mkdir("joe")  # no Maildir yet: the first delivery is deferred
    site.assign([site.user_line("joe", joe)])
    ctl = _control(site.base, pattern)
    d = Running(site, env=site.env(**{SEAM: str(ctl)}))
    try:
        d.wait_for(STATUS0)
        qqueue(site.home, b"s@x.example", [b"joe@" + FQDN.encode()], b"Subject: one\n\n1\n", user=site.user)
        d.wait_for(b"delivery 1: deferral: Unable_to_chdir_to_maildir._(#4.2.1)/")
        d.wait_for(lambda ls: any(x.startswith(b"warning: trouble fsyncing ") for x in ls))
        assert len(files(site.home.queue)["todo"]) == 1  # not committed: todo/N is still its record
        ctl.unlink()
        site.maildir("joe/Maildir")
        d.signal(signal.SIGALRM)
        d.wait_for(lambda ls: any(x.startswith(b"end msg ") for x in ls))
    finally:
        assert d.stop() == 0
    (msg,) = maildir_messages(joe / "Maildir")
    assert msg.endswith(b"Subject: one\n\n1\n")
    assert messages(site.home.queue) == {}


def test_qmail_send_kept_message_needs_no_fsync(site: Site) -> None:
    """Delivered at once, a message is finished with todo/N as its only record: no fsync of info/ or local/."""
    joe = _user(site, "joe")
    site.assign([site.user_line("joe", joe)])
    ctl = _control(site.base, "*/queue/info/*", "*/queue/local/*", "*/queue/info", "*/queue/local")
    d = Running(site, env=site.env(**{SEAM: str(ctl)}))
    try:
        d.wait_for(STATUS0)
        qqueue(site.home, b"s@x.example", [b"joe@" + FQDN.encode()], b"Subject: k\n\nk\n", user=site.user)
        d.wait_for(lambda ls: any(x.startswith(b"end msg ") for x in ls))
    finally:
        assert d.stop() == 0
    assert not any(x.startswith(b"warning: ") for x in d.lines()), d.lines()
    (msg,) = maildir_messages(joe / "Maildir")
    assert msg.endswith(b"Subject: k\n\nk\n")
    assert messages(site.home.queue) == {}


def test_qmail_send_maildir_fsync_failure_is_deferred_then_delivered_once(site: Site) -> None:
    joe = _user(site, "joe")
    site.assign([site.user_line("joe", joe)])
    ctl = _control(site.base, "*/joe/Maildir/new")
    d = Running(site, env=site.env(**{SEAM: str(ctl)}))
    try:
        d.wait_for(STATUS0)
        qqueue(site.home, b"s@x.example", [b"joe@" + FQDN.encode()], b"Subject: two\n\n2\n", user=site.user)
        d.wait_for(b"delivery 1: deferral: Temporary_error_on_maildir_delivery._(#4.3.0)/")
        assert maildir_messages(joe / "Maildir") == []
        ctl.unlink()
        d.signal(signal.SIGALRM)
        d.wait_for(lambda ls: any(x.startswith(b"end msg ") for x in ls))
    finally:
        assert d.stop() == 0
    assert b"delivery 2: success: did_1+0+0/" in d.lines()
    (msg,) = maildir_messages(joe / "Maildir")
    assert msg.endswith(b"Subject: two\n\n2\n")


def test_qmail_send_bounce_note_fsync_failure_waits_then_bounces(site: Site) -> None:
    joe = _user(site, "joe")
    nope = _user(site, "nope", "|echo 'Sorry, no.'; exit 100\n")
    site.assign([site.user_line("joe", joe), site.user_line("nope", nope)])
    ctl = _control(site.base, "*/queue/bounce/*")
    d = Running(site, env=site.env(**{SEAM: str(ctl)}))
    try:
        d.wait_for(STATUS0)
        qqueue(site.home, b"joe@" + FQDN.encode(), [b"nope@" + FQDN.encode()], b"Subject: b\n\nb\n", user=site.user)
        d.wait_for(b"alert: unable to append to bounce message; HELP! sleeping...")
        ctl.unlink()  # qmail-send tries again after its alert sleep
        d.wait_for(lambda ls: len([x for x in ls if x.startswith(b"end msg ")]) == 2, timeout=90)
    finally:
        assert d.stop() == 0
    (bounced,) = maildir_messages(joe / "Maildir")
    assert b"<nope@test.example.com>:\nSorry, no.\n" in bounced
    assert messages(site.home.queue) == {}


# --- the maildrop client (root mode) ------------------------------------------------

@pytest.mark.parametrize("pattern", ["*/maildrop/t*", "*/maildrop/m*"])
def test_maildrop_fsync_failure_is_temporary_and_leaves_no_file(root_home: QHome, pattern: str) -> None:
    ctl = _control(root_home.path.parent, pattern)
    res = _qq(root_home, b"Subject: d\n\nd\n", envelope(b"s@x", b"r@y"), ctl, user=TEST_USER)
    assert res.returncode == 53, res.explain()
    assert os.listdir(root_home.path / "maildrop") == []
    ctl.unlink()
    expect(_qq(root_home, b"Subject: d\n\nd\n", envelope(b"s@x", b"r@y"), ctl, user=TEST_USER))
    (name,) = os.listdir(root_home.path / "maildrop")
    assert re.fullmatch(r"m\d+\.\d+\.[0-9a-f]{32}", name)


def test_seam_is_inert_without_its_file(qhome: QHome) -> None:
    """The variable alone changes nothing: only patterns in an existing file fail fsyncs."""
    expect(_qq(qhome, b"x\n", envelope(b"s", b"r"), qhome.path.parent / "absent"))
    assert len(files(qhome.queue)["todo"]) == 1
