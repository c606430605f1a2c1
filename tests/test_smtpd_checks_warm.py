"""qmail-smtpd's checks under tcpserver, whose parent runs them first (the warm-up of issue 15's speed floor).

tcpserver's parent calls qmail-smtpd's preload(), which loads the checks with no
client: SPF then runs whole checks against a responder of its own, greylisting
its triplet check on an SQLite database in memory, recipient validation its
lookup (docs/DESIGN.md "Speed (bench/smtpd.py --checks)"). None of that may
show in a session: the greylist file is not made or opened by the parent, a
new triplet is still greylisted, unknown recipients are still refused, SPF
still refuses a failing sender, and the DNS server named by $DNSCACHEIP is the
one asked.
"""

from __future__ import annotations

import os
import pwd
import smtplib
import subprocess
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER
from sendkit import Site, make_site, remove_site
from ucspikit import DNSServer

FQDN = "test.example.com"
CLIENT = "127.0.0.2"  # not 127.0.0.1, which SPF passes as local without asking DNS


@pytest.fixture
def site() -> Site:
    if not IS_ROOT:
        pytest.skip("the site belongs to the test user and tcpserver runs as that user: needs root")
    s = make_site(FQDN)
    u = s.mkdir("users")
    s.mkdir("users/joe")
    s.maildir("users/joe/Maildir")
    (u / "joe" / ".qmail-box").write_text("./Maildir/\n")
    os.chown(u / "joe" / ".qmail-box", s.uid, s.gid)
    s.assign([f"=joe:{TEST_USER}:{s.uid}:{s.gid}:{u}/joe:::", f"+joe-:{TEST_USER}:{s.uid}:{s.gid}:{u}/joe:-::"])
    yield s
    remove_site(s)


def _tcpserver(site: Site, dnscacheip: str) -> tuple[subprocess.Popen[bytes], int]:
    pw = pwd.getpwnam(TEST_USER)
    p = subprocess.Popen([str(site.home.bin("tcpserver")), "-1", "-HR", "-u", str(pw.pw_uid), "-g", str(pw.pw_gid),
                          "-l", FQDN, "127.0.0.1", "0", str(site.home.bin("qmail-smtpd"))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={"PATH": "/usr/bin:/bin", "DNSCACHEIP": dnscacheip})
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip().isdigit(), (line, p.poll())
    return p, int(line)


def test_checks_after_the_parents_warm_up(site: Site) -> None:
    home = site.home
    home.control("spfbehavior", "3\n")
    home.control("greylist", "300\n")
    home.control("rcptcheck", "1\n")
    site.mkdir("qmail/greylist", 0o700)
    db = home.path / "greylist" / "triplets.sqlite"
    records: dict[str, dict[str, list[object]]] = {
        "pass.example": {"TXT": [b"v=spf1 ip4:" + CLIENT.encode() + b" -all"]},
        "fail.example": {"TXT": [b"v=spf1 -all"]},
    }
    with DNSServer(records) as dns:
        p, port = _tcpserver(site, dns.dnscacheip)
        try:
            assert not db.exists(), "tcpserver's parent made or opened the greylist file"
            for attempt in range(2):
                with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=30,
                                  source_address=(CLIENT, 0)) as s:
                    assert s.mail("a@pass.example")[0] == 250
                    assert s.rcpt(f"joe-nobox@{FQDN}") == (550, b"sorry, no mailbox here by that name (#5.1.1)")
                    code, text = s.rcpt(f"joe-box@{FQDN}")
                    assert code == 451 and text.startswith(b"greylisted, try again in "), (attempt, code, text)
                    s.rset()
                    assert s.mail("b@fail.example")[0] == 250
                    code, text = s.rcpt(f"joe-box@{FQDN}")
                    assert code == 550 and text.startswith(b"See http://spf.pobox.com/why.html?sender=b%40fail.example"), \
                        (code, text)
            assert db.exists()
            asked = {name for name, _ in dns.queries}
            assert {"pass.example", "fail.example"} <= asked, dns.queries
        finally:
            p.terminate()
            _, err = p.communicate(timeout=30)
    assert b"not greylisting" not in err, err
