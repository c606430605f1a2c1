"""qmail-smtpd over IPv6 (issue 18.1): swaks and smtplib over ::1 under our tcpserver and under
ucspi-tcp-ipv6's; the Received line of an IPv6 client; relaying decided by IPv6 tcprules
(a CIDR prefix); box@[IPv6:::1] as this host; the whole chain (SMTP in over ::1, qmail-send,
qmail-remote out over ::1) with IPv6 only."""

from __future__ import annotations

import re
import shutil
import smtplib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CI, QHome, expect, run
from queuefmt import files, parse_todo
from remotekit import SmtpServer
from sendkit import Running, Site, make_site, remove_site
from test_ipv6 import need_ipv6_loopback, real6

FQDN = "test.example.com"


class TcpServer6:
    """A tcpserver (ours, or binary) running qmail-smtpd on ::1, a port of its choice."""

    def __init__(self, home: QHome, *opts: str, binary: str | None = None, env: dict[str, str] | None = None,
                 qmail_smtpd: Path | None = None, **kw: object) -> None:
        self.proc = subprocess.Popen(
            [binary or home.bin("tcpserver"), "-1", "-HR", *opts, "-l", "mx." + FQDN, "::1", "0",
             qmail_smtpd or home.bin("qmail-smtpd")],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={"PATH": "/usr/bin:/bin", **(env or {})}, **kw)  # type: ignore[call-overload]
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> TcpServer6:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rules(home: QHome, text: str) -> Path:
    cdb = home.path / "control" / "tcp.smtp.cdb"
    expect(run([home.bin("tcprules"), cdb, f"{cdb}.tmp"], input=text.encode()))
    return cdb


def _queued(home: QHome) -> list[tuple[list[bytes], bytes]]:
    """(recipients, message) of every queued message."""
    out = []
    for name in files(home.queue)["todo"]:
        env = parse_todo((home.queue / "todo" / name).read_bytes())
        mess = (home.queue / "mess" / str(int(name) % 23) / name).read_bytes()
        out.append((env.recipients, mess))
    return out


def _swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        if CI:
            pytest.fail("swaks missing: .ci/run installs it")
        pytest.skip("swaks not installed")
    return path


@pytest.mark.parametrize("which", ["ours", "ucspi-tcp-ipv6"])
def test_smtplib_and_swaks_over_ipv6(qhome: QHome, which: str) -> None:
    """Both clients over ::1; the Received line names the IPv6 client as the IPv6 patch's does."""
    need_ipv6_loopback()
    binary = real6("tcpserver") if which != "ours" else None
    swaks = _swaks()
    with TcpServer6(qhome, binary=binary) as srv:
        with smtplib.SMTP("::1", srv.port, local_hostname="c6.example", timeout=30) as s:
            assert s.sendmail("a@c6.example", ["y@" + FQDN], "Subject: six\r\n\r\nover ::1\r\n") == {}
        r = subprocess.run([swaks, "-6", "--server", "::1", "--port", str(srv.port), "--helo", "s6.example",
                            "--from", "b@s6.example", "--to", "z@" + FQDN, "--body", "swaks over ::1"],
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r
        assert b"250 ok" in r.stdout
    got = sorted(_queued(qhome))
    assert [rcpts for rcpts, _ in got] == [[b"y@" + FQDN.encode()], [b"z@" + FQDN.encode()]]
    texts = b"".join(m for _, m in got)
    assert re.search(rb"Received: from unknown \(HELO c6.example\) \(::1\)\n  by mx.test.example.com with SMTP; ",
                     texts), texts
    assert b"Received: from unknown (HELO s6.example) (::1)\n" in texts


@pytest.mark.parametrize("rules,relays", [
    ('::/64:allow,RELAYCLIENT=""\n:allow\n', True),    # pyqmail's CIDR prefix
    ('::1:allow,RELAYCLIENT=""\n:allow\n', True),      # ucspi-tcp-ipv6's exact form
    ("2001:db8::/32:allow,RELAYCLIENT=\"\"\n::1:allow\n:deny\n", False),  # in, but not relaying
])
def test_ipv6_relay_decided_by_tcprules(qhome: QHome, rules: str, relays: bool) -> None:
    need_ipv6_loopback()
    cdb = _rules(qhome, rules)
    with TcpServer6(qhome, "-x", str(cdb)) as srv:
        with smtplib.SMTP("::1", srv.port, local_hostname="c6.example", timeout=30) as s:
            s.helo()
            s.mail("a@c6.example")
            code, text = s.rcpt("friend@elsewhere.example")
            if relays:
                assert code == 250
            else:
                assert (code, text) == (553, b"sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)")


def test_ipv6_literal_of_this_host_in_rcpt(qhome: QHome) -> None:
    """box@[IPv6:::1] is this host (::1 is one of its addresses): rewritten to control/localiphost,
    as box@[127.0.0.1] is; another host's IPv6 literal is a foreign domain (not in rcpthosts)."""
    need_ipv6_loopback()
    qhome.control("localiphost", FQDN + "\n")
    with TcpServer6(qhome) as srv:
        with smtplib.SMTP("::1", srv.port, local_hostname="c6.example", timeout=30) as s:
            s.helo()
            s.mail("a@c6.example")
            assert s.rcpt("box@[IPv6:::1]")[0] == 250
            assert s.rcpt("box@[ipv6:0:0:0:0:0:0:0:1]")[0] == 250
            assert s.rcpt("box@[127.0.0.1]")[0] == 250
            assert s.rcpt("box@[IPv6:2001:db8::1]")[0] == 553
            assert s.data(b"Subject: literal\r\n\r\nhi\r\n")[0] == 250
    ((rcpts, _),) = _queued(qhome)
    assert rcpts == [b"box@" + FQDN.encode()] * 3


@pytest.fixture
def site() -> Iterator[Site]:
    s = make_site(FQDN)
    yield s
    remove_site(s)


def test_whole_chain_over_ipv6_only(site: Site) -> None:
    """SMTP in over ::1 (tcpserver, qmail-smtpd, qmail-queue), qmail-send, qmail-rspawn, qmail-remote
    out over ::1 to a peer that listens on ::1 only, routed to [IPv6:::1]; no IPv4 address anywhere."""
    need_ipv6_loopback()
    with SmtpServer(host="::1") as peer:
        site.home.control("smtproutes", f"far.example:[IPv6:::1]:{peer.port}\n")
        kw: dict[str, object] = {}
        if site.user is not None:
            kw = {"user": site.uid, "group": site.gid, "extra_groups": []}
        smtpd = TcpServer6(site.home, env={"RELAYCLIENT": ""}, **kw)
        try:
            with smtplib.SMTP("::1", smtpd.port, local_hostname="client6.example", timeout=30) as s:
                assert s.sendmail("joe@" + FQDN, ["friend@far.example"], "Subject: v6\r\n\r\nall the way\r\n") == {}
        finally:
            smtpd.close()
        d = Running(site, env=site.env(DNSCACHEIP="[::1]:9"))
        try:
            lines = d.wait_for(lambda ls: any(x.startswith(b"end msg ") for x in ls))
        finally:
            assert d.stop() == 0
    deliveries = [x.split(b": ", 1)[1] for x in lines if x.startswith(b"delivery ")]
    assert deliveries == [b"success: ::1_accepted_message./Remote_host_said:_250_ok_12345_qp_1/"]
    (s,) = peer.sessions
    assert s.peer == "::1"
    assert b"RCPT TO:<friend@far.example>" in s.commands
    assert b"Received: from unknown (HELO client6.example) (::1)\r\n  by mx.test.example.com with SMTP; " in s.data
