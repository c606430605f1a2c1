"""qmail-start, qmail-send, qmail-lspawn, qmail-rspawn and qmail-clean together, as processes."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from conftest import expect, run
from queuefmt import files, messages
from sendkit import Running, Site, make_site, maildir_messages, qqueue, remove_site

FQDN = "test.example.com"
STATUS0 = b"status: local 0/10 remote 0/20"


@pytest.fixture
def site() -> Site:
    s = make_site(FQDN)
    # No test goes to the network: remote deliveries get qmail-rspawn's deferral.
    s.home.bin("qmail-remote").unlink(missing_ok=True)
    yield s
    remove_site(s)


def user(site: Site, name: str, dotqmail: dict[str, str] | None = None, maildir: bool = True,
         wild: bool = False) -> Path:
    """Give local part name to a home directory of the site's user; return the home."""
    home = site.mkdir(name)
    if maildir:
        site.maildir(f"{name}/Maildir")
    for ext, text in (dotqmail or {}).items():
        p = home / (".qmail" + ext)
        p.write_text(text)
        os.chown(p, site.uid, site.gid)
        p.chmod(0o644)
    return home


def assign(site: Site, *lines: str) -> None:
    site.assign(list(lines))


def inject(site: Site, message: bytes, *args: str) -> None:
    res = run([site.home.bin("qmail-inject"), *args], input=message, user=site.user,
              env=site.env(USER=site.user or "root"))
    expect(res)


def msgnums(lines: list[bytes], what: bytes = b"new msg ") -> list[int]:
    return [int(x[len(what):]) for x in lines if x.startswith(what)]


def test_seven_lines_of_the_book(site: Site) -> None:
    joe = user(site, "joe")
    assign(site, site.user_line("joe", joe))
    d = Running(site)
    try:
        d.wait_for(STATUS0 + b"")
        inject(site, b"Subject: hello\n\nHello, world.\n", "joe@" + FQDN)
        lines = d.wait_for(lambda ls: any(x.startswith(b"end msg ") for x in ls))
    finally:
        assert d.stop() == 0
    lines = d.lines()
    (msg,) = maildir_messages(joe / "Maildir")
    m = re.match(rb"Return-Path: <(.*)>\nDelivered-To: joe@test.example.com\n(Received: \(qmail (\d+) invoked by uid (\d+)\); .*)",
                 msg, re.S)
    assert m, msg
    sender, queued, qp, uid = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    assert uid == site.uid
    (num,) = msgnums(lines)
    assert lines == [
        STATUS0,
        b"new msg %d" % num,
        b"info msg %d: bytes %d from <%s> qp %d uid %d" % (num, len(queued), sender, qp, uid),
        b"starting delivery 1: msg %d to local joe@test.example.com" % num,
        b"status: local 1/10 remote 0/20",
        b"delivery 1: success: did_1+0+0/",
        STATUS0,
        b"end msg %d" % num,
        b"status: exiting",
    ]
    assert queued.endswith(b"Subject: hello\n\nHello, world.\n")
    assert messages(site.home.queue) == {}


def test_temporary_failure_is_retried_then_delivered(site: Site) -> None:
    home = user(site, "flaky", {"": "|test -e tried && exit 0; touch tried; echo not yet; exit 111\n./Maildir/\n"})
    assign(site, site.user_line("flaky", home))
    d = Running(site)
    try:
        d.wait_for(STATUS0)
        qqueue(site.home, b"s@x.example", [b"flaky@" + FQDN.encode()], b"Subject: r\n\nretry\n", user=site.user)
        d.wait_for(lambda ls: len(ls) >= 2 and ls[-2] == b"delivery 1: deferral: not_yet/" and ls[-1] == STATUS0)
        assert maildir_messages(home / "Maildir") == []
        assert len(files(site.home.queue)["local"]) == 1
        d.signal(signal.SIGALRM)
        d.wait_for(lambda ls: any(x.startswith(b"end msg") for x in ls))
    finally:
        assert d.stop() == 0
    lines = d.lines()
    (num,) = msgnums(lines)
    assert lines[lines.index(b"delivery 1: deferral: not_yet/"):] == [
        b"delivery 1: deferral: not_yet/",
        STATUS0,
        b"starting delivery 2: msg %d to local flaky@test.example.com" % num,
        b"status: local 1/10 remote 0/20",
        b"delivery 2: success: did_1+0+1/",
        STATUS0,
        b"end msg %d" % num,
        b"status: exiting",
    ]
    assert len(maildir_messages(home / "Maildir")) == 1


def bounce_setup(site: Site) -> tuple[Path, Path]:
    joe = user(site, "joe")
    nope = user(site, "nope", {"": "|echo 'Sorry, no such thing here.'; exit 100\n"}, maildir=False)
    assign(site, site.user_line("joe", joe), site.user_line("nope", nope))
    return joe, nope


def test_permanent_failure_bounces_with_qmails_text(site: Site) -> None:
    joe, _ = bounce_setup(site)
    original = b"Subject: doomed\n\nThis will bounce.\n"
    d = Running(site)
    try:
        d.wait_for(STATUS0)
        qqueue(site.home, b"joe@" + FQDN.encode(), [b"nope@" + FQDN.encode()], original, user=site.user)
        d.wait_for(lambda ls: len(msgnums(ls, b"end msg ")) == 2)
    finally:
        assert d.stop() == 0
    lines = d.lines()
    num, bnum = msgnums(lines)
    i = lines.index(b"delivery 1: failure: Sorry,_no_such_thing_here./")
    assert lines[i + 1] == STATUS0
    assert re.fullmatch(rb"bounce msg %d qp \d+" % num, lines[i + 2])
    assert lines[i + 3] == b"end msg %d" % num
    assert lines[i + 4] == b"new msg %d" % bnum
    qp = int(lines[i + 2].split()[-1])
    (bounced,) = maildir_messages(joe / "Maildir")
    m = re.match(rb"Return-Path: <>\nDelivered-To: joe@test.example.com\n"
                 rb"Received: \(qmail (\d+) invoked by uid \d+\); ([^\n]+)\n", bounced)
    assert m and int(m.group(1)) == qp, bounced[:300]
    body = bounced[m.end():]
    date = body.split(b"\n", 1)[0]
    assert re.fullmatch(rb"Date: \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000", date), date
    copy_start = body.index(b"Return-Path: <joe@test.example.com>\n") + len(b"Return-Path: <joe@test.example.com>\n")
    copy = body[copy_start:]
    assert copy.startswith(b"Received: (qmail ") and copy.endswith(original)
    assert body[:copy_start] == date + b"\n" + (
        b"From: MAILER-DAEMON@test.example.com\n"
        b"To: joe@test.example.com\n"
        b"Subject: failure notice\n"
        b"\n"
        b"Hi. This is the qmail-send program at test.example.com.\n"
        b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        b"This is a permanent error; I've given up. Sorry it didn't work out.\n"
        b"\n"
        b"<nope@test.example.com>:\n"
        b"Sorry, no such thing here.\n"
        b"\n"
        b"--- Below this line is a copy of the message.\n"
        b"\n"
        b"Return-Path: <joe@test.example.com>\n")
    assert messages(site.home.queue) == {}


def test_double_bounce_goes_to_doublebounceto_and_a_triple_is_discarded(site: Site) -> None:
    joe, _ = bounce_setup(site)
    site.home.control("doublebounceto", "joe\n")
    site.home.control("bouncefrom", "bouncer\n")
    site.home.control("bouncehost", "bounces.example\n")
    d = Running(site)
    try:
        d.wait_for(STATUS0)
        qqueue(site.home, b"", [b"nope@" + FQDN.encode()], b"Subject: a bounce\n\n", user=site.user)
        d.wait_for(lambda ls: len(msgnums(ls, b"end msg ")) == 2)
        qqueue(site.home, b"#@[]", [b"nope@" + FQDN.encode()], b"Subject: a double bounce\n\n", user=site.user)
        d.wait_for(lambda ls: len(msgnums(ls, b"end msg ")) == 3)
    finally:
        assert d.stop() == 0
    lines = d.lines()
    first, double, triple = msgnums(lines)
    assert any(re.fullmatch(rb"bounce msg %d qp \d+" % first, x) for x in lines)
    assert re.search(rb"info msg %d: bytes \d+ from <#@\[\]> qp" % double, b"\n".join(lines))
    i = lines.index(b"triple bounce: discarding bounce/%d" % triple)
    assert lines[i + 1:] == [b"end msg %d" % triple, b"status: exiting"]
    (msg,) = maildir_messages(joe / "Maildir")
    assert msg.startswith(b"Return-Path: <#@[]>\nDelivered-To: joe@test.example.com\n")
    assert (b"From: bouncer@bounces.example\nTo: joe@test.example.com\nSubject: failure notice\n\n"
            b"Hi. This is the qmail-send program at bounces.example.\n"
            b"I tried to deliver a bounce message to this address, but the bounce bounced!\n\n"
            b"<nope@test.example.com>:\nSorry, no such thing here.\n\n"
            b"--- Below this line is the original bounce.\n\n"
            b"Return-Path: <>\nReceived: (qmail ") in msg
    assert msg.endswith(b"Subject: a bounce\n\n")
    assert messages(site.home.queue) == {}


def test_verp_sender_per_recipient(site: Site) -> None:
    joe = user(site, "joe")
    assign(site, site.user_line("joe", joe))
    d = Running(site)
    try:
        d.wait_for(STATUS0)
        qqueue(site.home, b"owner-@lists.example-@[]", [b"joe@" + FQDN.encode()], b"Subject: v\n\n", user=site.user)
        d.wait_for(lambda ls: bool(msgnums(ls, b"end msg ")))
    finally:
        d.stop()
    (msg,) = maildir_messages(joe / "Maildir")
    assert msg.startswith(b"Return-Path: <owner-joe=test.example.com@lists.example>\n")
    assert b"info msg %d: bytes" % msgnums(d.lines())[0] in d.log
    assert b"from <owner-@lists.example-@[]>" in d.log


def test_virtualdomains_and_hup(site: Site) -> None:
    joe = user(site, "joe", {"-default": "./Maildir/\n"})
    assign(site, site.user_line("joe", joe), site.user_line("joe-", joe, wild=True))
    d = Running(site)
    try:
        d.wait_for(STATUS0)
        qqueue(site.home, b"s@x", [b"Info@Virt.Example"], b"Subject: 1\n\n", user=site.user)
        d.wait_for(lambda ls: any(b"to remote Info@Virt.Example" in x for x in ls))
        site.home.control("virtualdomains", "virt.example:joe\n")
        # The HUP is handled at the top of qmail-send's next turn: long before
        # a qmail-queue started after it has queued anything.
        d.signal(signal.SIGHUP)
        qqueue(site.home, b"s@x", [b"Info@Virt.Example"], b"Subject: 2\n\n", user=site.user)
        d.wait_for(lambda ls: bool(msgnums(ls, b"end msg ")))
    finally:
        d.stop()
    assert b"to local joe-Info@Virt.Example" in d.log
    (msg,) = maildir_messages(joe / "Maildir")
    assert msg.startswith(b"Return-Path: <s@x>\nDelivered-To: joe-Info@Virt.Example\n")


def test_remote_recipient_is_deferred_and_its_retry_time_saved(site: Site) -> None:
    d = Running(site)
    try:
        d.wait_for(STATUS0)
        qqueue(site.home, b"s@x", [b"r@far.example"], b"Subject: far\n\n", user=site.user)
        lines = d.wait_for(lambda ls: any(b": deferral: " in x for x in ls))
    finally:
        assert d.stop() == 0
    (num,) = msgnums(lines)
    assert b"starting delivery 1: msg %d to remote r@far.example" % num in lines
    assert b"delivery 1: deferral: Sorry,_remote_delivery_is_not_available_yet._(#4.3.0)/" in lines
    remote = site.home.queue / "remote" / str(num % 23) / str(num)
    info = site.home.queue / "info" / str(num % 23) / str(num)
    assert remote.read_bytes() == b"Tr@far.example\0"
    assert int(remote.stat().st_mtime) == int(info.stat().st_mtime) + 400


def test_term_waits_for_running_deliveries(site: Site) -> None:
    slow = user(site, "slow", {"": "|while [ ! -e go ]; do sleep 0.02; done\n./Maildir/\n"})
    assign(site, site.user_line("slow", slow))
    d = Running(site)
    d.wait_for(STATUS0)
    qqueue(site.home, b"s@x", [b"slow@" + FQDN.encode()], b"Subject: slow\n\n", user=site.user)
    d.wait_for(b"status: local 1/10 remote 0/20")
    d.signal(signal.SIGTERM)
    (slow / "go").touch()
    assert d.stop() == 0
    lines = d.lines()
    (num,) = msgnums(lines)
    # As qmail's loop: the turn that reads the last report also finishes the message.
    assert lines[-4:] == [b"delivery 1: success: did_1+0+1/", b"status: local 0/10 remote 0/20 exitasap",
                          b"end msg %d" % num, b"status: exiting"]
    assert len(maildir_messages(slow / "Maildir")) == 1
    assert messages(site.home.queue) == {}


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _pipe_inode(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def _daemon(send: int, fd_of_send: int, fd_of_child: int) -> int:
    """Return the child of qmail-send whose fd_of_child is qmail-send's fd_of_send."""
    want = _pipe_inode(send, fd_of_send)
    for child in _children(send):
        try:
            if _pipe_inode(child, fd_of_child) == want:
                return child
        except OSError:
            continue
    raise AssertionError("daemon not found")


def test_lost_spawn_connection(site: Site) -> None:
    d = Running(site)
    d.wait_for(STATUS0)
    lspawn = _daemon(d.proc.pid, 1, 0)
    os.kill(lspawn, signal.SIGKILL)
    assert d.wait() == 0  # qmail-send exits by itself
    assert d.lines()[-2:] == [b"alert: oh no! lost spawn connection! dying...", b"status: exiting"]


def test_lost_qmail_clean_connection(site: Site) -> None:
    d = Running(site)
    d.wait_for(STATUS0)
    clean = _daemon(d.proc.pid, 5, 0)
    os.kill(clean, signal.SIGKILL)
    # qmail-send notices at its next use of qmail-clean: preprocessing a message.
    qqueue(site.home, b"s@x", [b"r@far.example"], b"Subject: far\n\n", user=site.user)
    assert d.wait() == 0
    assert b"alert: oh no! lost qmail-clean connection! dying..." in d.lines()
    assert d.lines()[-1] == b"status: exiting"


def test_second_qmail_send_refuses_to_start(site: Site) -> None:
    d = Running(site)
    try:
        d.wait_for(STATUS0)
        e = Running(site)
        assert e.wait() == 111
        assert e.lines() == [b"alert: cannot start: qmail-send is already running"]
    finally:
        d.stop()


def test_no_locals_and_no_me_refuses_to_start(site: Site) -> None:
    site.home.control("locals", None)
    site.home.control("me", None)
    e = Running(site)
    assert e.wait() == 111
    assert e.lines() == [b"alert: cannot start: unable to read controls"]


def test_logger_gets_the_activity_record(site: Site) -> None:
    d = Running(site, ["./Maildir/", "sed", "-u", "s/^/L: /"])
    d.wait_for(b"L: " + STATUS0)
    assert d.stop() == 0
    assert d.lines() == [b"L: " + STATUS0, b"L: status: exiting"]


def test_qmail_start_is_qmail_send(site: Site) -> None:
    d = Running(site)
    try:
        d.wait_for(STATUS0)
        # qmail-lspawn, qmail-rspawn, qmail-clean; qmail-todo and its qmail-clean (ext-todo).
        assert len(_children(d.proc.pid)) == 5
        for fd in range(9):
            assert os.path.exists(f"/proc/{d.proc.pid}/fd/{fd}")
    finally:
        d.stop()
