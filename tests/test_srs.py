"""SRS (issue 16.6): qmail-local's forwards leave with an SRS0 sender; qmail-srs sends a bounce to it
back to the original sender; a forged, expired or malformed SRS address is refused. The addresses are
checked against Mail::SRS (Debian's libmail-srs-perl), an implementation no one here wrote."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from conftest import CI, QHome, Result
from smtpdkit import queued
from test_qmail_local import PATH, Home, local_args, make_home, qlocal

from pyqmail.filter import srs

SRSDOMAIN = b"srs.test.example.com"
SECRET = b"correct horse battery staple"
SENDER = b"Alice.Smith@b.example"
BOUNCE = (b"From: MAILER-DAEMON@far.example\nTo: SRS\nSubject: failure notice\n\n"
          b"Hi. This is the qmail-send program at far.example.\nI'm afraid I wasn't able to deliver ...\n")
SRS0 = re.compile(rb"SRS0=[A-Za-z0-9+/]{4}=[A-Z2-7]{2}=b\.example=Alice\.Smith@srs\.test\.example\.com")


@pytest.fixture
def home() -> Iterator[Home]:
    base, h = make_home()
    yield h
    shutil.rmtree(base, ignore_errors=True)


def configure(qhome: QHome, *secrets: bytes) -> None:
    qhome.control("srsdomain", SRSDOMAIN.decode() + "\n")
    qhome.control("srssecret", "".join(s.decode() + "\n" for s in (secrets or (SECRET,))))


def perl_srs(*code: str) -> bytes:
    """Run Perl with Mail::SRS (Secret SECRET, MaxAge 21); fail in CI, skip elsewhere, if it is missing."""
    if shutil.which("perl") is None or subprocess.run(["perl", "-MMail::SRS", "-e", "1"],
                                                       capture_output=True).returncode != 0:
        if CI:
            pytest.fail("Mail::SRS is missing: .ci/run installs libmail-srs-perl")
        pytest.skip("Mail::SRS (libmail-srs-perl) is not installed")
    prog = f"use Mail::SRS; my $srs = Mail::SRS->new(Secret => '{SECRET.decode()}', MaxAge => 21); " + " ".join(code)
    p = subprocess.run(["perl", "-e", prog], capture_output=True, timeout=60)
    assert p.returncode == 0, p
    return p.stdout


# The scheme.

def test_timestamp_is_base32_days_modulo_1024() -> None:
    assert srs.timestamp(0) == b"AA"
    assert srs.timestamp(86400 * 33) == b"BB"
    assert srs.timestamp(86400 * (1024 + 31) + 86399) == b"A7"


def test_forward_and_reverse() -> None:
    now = time.time()
    new = srs.forward(SENDER, SRSDOMAIN, SECRET, now)
    assert SRS0.fullmatch(new), new
    assert new.split(b"=")[2] == srs.timestamp(now)
    assert srs.reverse(new, [SECRET], now) == SENDER
    assert srs.reverse(new.lower(), [SECRET], now) == SENDER.lower()  # a host smashed case
    assert srs.reverse(new, [b"new secret", SECRET], now) == SENDER  # an old secret still reverses
    for unchanged in (b"", b"#@[]", b"no-at-sign", b"x@" + SRSDOMAIN, b"x@SRS.test.example.com"):
        assert srs.forward(unchanged, SRSDOMAIN, SECRET, now) == unchanged
    assert srs.forward(b"x" * 990 + b"@b.example", SRSDOMAIN, SECRET, now) == b"x" * 990 + b"@b.example"


@pytest.mark.parametrize("address,why", [
    (b"alice@b.example", "not an SRS0 address"),
    (b"SRS0=abcd=AA=b.example@srs", "malformed SRS address"),
    (b"SRS0=abc=AA=b.example=alice@srs", "malformed SRS address"),
    (b"SRS0=abcd=AA==alice@srs", "malformed SRS address"),
    (b"SRS1=abcd=other.example==SRS0=x=AA=b=c@srs", "not an SRS0 address"),
])
def test_malformed(address: bytes, why: str) -> None:
    with pytest.raises(srs.Invalid, match=why):
        srs.reverse(address, [SECRET], time.time())


def test_forged_and_expired() -> None:
    now = time.time()
    good = srs.forward(SENDER, SRSDOMAIN, SECRET, now)
    with pytest.raises(srs.Invalid, match="bad hash"):
        srs.reverse(good.replace(b"=b.example=", b"=evil.example="), [SECRET], now)
    with pytest.raises(srs.Invalid, match="bad hash"):
        srs.reverse(good, [b"another secret"], now)
    old = srs.forward(SENDER, SRSDOMAIN, SECRET, now - 22 * 86400)
    assert srs.reverse(old, [SECRET], now, max_age=22) == SENDER
    with pytest.raises(srs.Invalid, match="expired"):
        srs.reverse(old, [SECRET], now)


def test_mail_srs_agrees() -> None:
    """Mail::SRS reverses our address, and we reverse Mail::SRS's, with the same secret."""
    ours = srs.forward(SENDER, SRSDOMAIN, SECRET, time.time())
    assert perl_srs(f"print $srs->reverse('{ours.decode()}');") == SENDER
    theirs = perl_srs(f"print $srs->forward('{SENDER.decode()}', '{SRSDOMAIN.decode()}');")
    assert theirs == ours  # the same hash and timestamp: one scheme
    assert srs.reverse(theirs, [SECRET], time.time()) == SENDER


# Through qmail-local and qmail-srs.

def forward_through(qhome: QHome, home: Home) -> bytes:
    """Deliver to joe-fwd, whose .qmail forwards; return the sender the forward was queued from."""
    home.write(".qmail-fwd", b"&friend@far.example\n")
    res = qlocal(qhome, local_args(home, b"joe-fwd", b"-", b"fwd", sender=SENDER), env={"PATH": PATH})
    assert res.returncode == 0 and res.stdout.startswith(b"did 0+1+0\nqp "), res.explain()
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert rcpts == [b"friend@far.example"]
    assert mess.split(b"\n", 1)[1].startswith(b"Delivered-To: joe-fwd@test.example.com\nSubject: test\n")
    return sender


def test_forward_leaves_with_srs_sender(qhome: QHome, home: Home) -> None:
    """A .qmail `&address` line: the forward is queued from SRS0=...@srsdomain, which Mail::SRS reverses."""
    configure(qhome)
    sender = forward_through(qhome, home)
    assert SRS0.fullmatch(sender), sender
    assert perl_srs(f"print $srs->reverse('{sender.decode()}');") == SENDER


def test_without_srsdomain_the_sender_is_kept(qhome: QHome, home: Home) -> None:
    assert forward_through(qhome, home) == SENDER


def test_srsdomain_without_secret_defers(qhome: QHome, home: Home) -> None:
    qhome.control("srsdomain", SRSDOMAIN.decode() + "\n")
    home.write(".qmail-fwd", b"&friend@far.example\n")
    res = qlocal(qhome, local_args(home, b"joe-fwd", b"-", b"fwd"), env={"PATH": PATH})
    assert res.returncode == 111, res.explain()
    assert b"control/srssecret has no secret" in res.stdout + res.stderr
    assert queued(qhome.queue) == []


def bounce_to(qhome: QHome, alias: Home, srs_local: bytes, sender: bytes = b"") -> Result:
    """Deliver a bounce to alias-srs-SRS_LOCAL@srsdomain as qmail-send would with
    `srsdomain:alias-srs` in control/virtualdomains, ~alias/.qmail-srs-default running qmail-srs."""
    alias.write(".qmail-srs-default", b"|" + bytes(qhome.bin("qmail-srs")) + b"\n")
    return qlocal(qhome, local_args(alias, b"alias-srs-" + srs_local, b"-", b"srs-" + srs_local, sender=sender,
                                    user=b"alias", host=SRSDOMAIN), message=BOUNCE, env={"PATH": PATH})


def test_bounce_comes_back_to_the_original_sender(qhome: QHome, home: Home) -> None:
    """The forward's SRS sender, bounced: qmail-srs queues the bounce, still from <>, to the original sender."""
    configure(qhome)
    sender = forward_through(qhome, home)
    for f in (qhome.queue / "todo").iterdir():  # the forward left: only the bounce is looked at below
        f.unlink()
    base, alias = make_home()
    try:
        res = bounce_to(qhome, alias, sender.rpartition(b"@")[0])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert res.returncode == 0, res.explain()
    assert re.fullmatch(rb"qmail-srs: sent back to Alice\.Smith@b\.example qp \d+\ndid 0\+0\+1\n",
                        res.stdout), res.explain()
    ((mess, bsender, rcpts),) = queued(qhome.queue)
    assert (bsender, rcpts) == (b"", [SENDER])
    assert mess.endswith(BOUNCE)


@pytest.mark.parametrize("forge,why", [
    (lambda a: a.replace(b"=b.example=", b"=victim.example="), b"SRS address has a bad hash: it was not made here"),
    (lambda a: a[:5] + (b"AAAA" if a[5:9] != b"AAAA" else b"BBBB") + a[9:], b"SRS address has a bad hash"),
    (lambda a: b"SRS0=zzzz=AA", b"malformed SRS address"),
])
def test_forged_srs_address_is_refused(qhome: QHome, forge: object, why: bytes) -> None:
    """qmail-srs exits 100 with a text saying why: qmail-local bounces it (to postmaster, for a bounce); nothing queued."""
    configure(qhome)
    good = srs.forward(SENDER, SRSDOMAIN, SECRET, time.time()).rpartition(b"@")[0]
    assert callable(forge)
    base, alias = make_home()
    try:
        res = bounce_to(qhome, alias, forge(good))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert res.returncode == 100, res.explain()
    assert b"Sorry, " + why in res.stdout + res.stderr, res.explain()
    assert queued(qhome.queue) == []


def test_expired_srs_address_is_refused(qhome: QHome) -> None:
    configure(qhome)
    qhome.control("srsmaxage", "5\n")
    old = srs.forward(SENDER, SRSDOMAIN, SECRET, time.time() - 6 * 86400).rpartition(b"@")[0]
    base, alias = make_home()
    try:
        res = bounce_to(qhome, alias, old)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert res.returncode == 100 and b"Sorry, SRS address has expired" in res.stdout + res.stderr
    assert queued(qhome.queue) == []


def test_routing_by_virtualdomains_reaches_qmail_srs(qhome: QHome, home: Home) -> None:
    """qmail-send's rewrite (virtualdomains srsdomain:alias-srs) and qmail-getpw's rules give qmail-local the
    local part and extension under which ~alias/.qmail-srs-default runs qmail-srs, case kept; it sends the bounce back."""
    from pyqmail.local import users
    from pyqmail.send.schedule import LOCAL, Rewriter

    configure(qhome)
    sender = forward_through(qhome, home)
    for f in (qhome.queue / "todo").iterdir():
        f.unlink()
    rw = Rewriter(b"test.example.com", [b"test.example.com"], virtualdomains=[b"srs.test.example.com:alias-srs"])
    kind, addr = rw.rewrite(sender)
    assert (kind, addr) == (LOCAL, b"alias-srs-" + sender)
    base, alias = make_home()
    try:
        entry = users.PwEntry(b"alias", 7790, 7790, bytes(alias.path))
        got = users.getpw(addr.rpartition(b"@")[0], getpwnam=lambda n: entry if n == b"alias" else None,
                          home_owner=lambda d: 7790)
        assert (got.user, got.dash, got.ext) == (b"alias", b"-", b"srs-" + sender.rpartition(b"@")[0])
        alias.write(".qmail-srs-default", b"|" + bytes(qhome.bin("qmail-srs")) + b"\n")
        res = qlocal(qhome, [b"--", b"alias", bytes(alias.path), addr.rpartition(b"@")[0], got.dash, got.ext,
                             SRSDOMAIN, b"", b"./Mailbox"], message=BOUNCE, env={"PATH": PATH})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert res.returncode == 0, res.explain()
    ((mess, bsender, rcpts),) = queued(qhome.queue)
    assert (bsender, rcpts) == (b"", [SENDER])
