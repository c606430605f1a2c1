"""qmail-smtpd's recipient validation interfaces (issue 15.2), qmail-smtpd run as a process.

$RCPTCHECK_LOCAL and control/rcptcheck (off by default), relay clients (their
local recipients checked, remote ones never), the $RCPTCHECK program's exit
codes (the RCPTCHECK patch), control/validrcptto.cdb made by qmail-newvrt (the
validrcptto.cdb patch), $BRTLIMIT. The homes belong to the test user and
qmail-smtpd runs as that user (single-user mode looks directly).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, QHome, expect, run
from sendkit import Site, make_site, remove_site

FQDN = "test.example.com"


@pytest.fixture
def site() -> Site:
    if not IS_ROOT:
        pytest.skip("the site belongs to the test user: needs root")
    s = make_site(FQDN)
    u = s.mkdir("users")
    s.mkdir("users/joe")
    s.maildir("users/joe/Maildir")
    (u / "joe" / ".qmail-box").write_text("./Maildir/\n")
    os.chown(u / "joe" / ".qmail-box", s.uid, s.gid)
    s.assign([f"=joe:{TEST_USER}:{s.uid}:{s.gid}:{u}/joe:::", f"+joe-:{TEST_USER}:{s.uid}:{s.gid}:{u}/joe:-::"])
    yield s
    remove_site(s)


def smtpd(site: Site, rcpts: list[str], env: dict[str, str] | None = None, sender: str = "a@b.example") -> list[bytes]:
    """Run qmail-smtpd as the site's user on pipes; return its reply lines (greeting first)."""
    lines = [b"HELO client.example", b"MAIL FROM:<" + sender.encode() + b">"]
    lines += [b"RCPT TO:<" + r.encode() + b">" for r in rcpts] + [b"QUIT"]
    pw = pwd.getpwnam(TEST_USER)
    p = subprocess.run([site.home.bin("qmail-smtpd")], input=b"".join(x + b"\r\n" for x in lines),
                       capture_output=True, timeout=60, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                       env={"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "127.0.0.1",
                            **(env or {})})
    return p.stdout.split(b"\r\n")[:-1]


def codes(replies: list[bytes]) -> list[int]:
    """The RCPT replies' codes (after the greeting, HELO and MAIL; without QUIT's 221)."""
    return [int(r[:3]) for r in replies[3:] if not r.startswith(b"221")]


def test_off_by_default_on_by_variable_or_control_file(site: Site) -> None:
    rcpts = [f"joe-box@{FQDN}", f"joe-nobox@{FQDN}"]
    assert codes(smtpd(site, rcpts)) == [250, 250]  # qmail's behaviour: accepted, bounced later
    got = smtpd(site, rcpts, {"RCPTCHECK_LOCAL": "1"})
    assert got[3:5] == [b"250 ok", b"550 sorry, no mailbox here by that name (#5.1.1)"]
    site.home.control("rcptcheck", "1\n")
    assert codes(smtpd(site, rcpts)) == [250, 550]
    assert codes(smtpd(site, rcpts, {"RCPTCHECK_LOCAL": "0"})) == [250, 250]  # the variable wins
    assert codes(smtpd(site, rcpts, {"RCPTCHECK_LOCAL": ""})) == [250, 550]  # set and not 0: on
    site.home.control("rcptcheck", "0\n")
    assert codes(smtpd(site, rcpts)) == [250, 250]


def test_relay_clients_local_recipients_checked_remote_never(site: Site) -> None:
    env = {"RCPTCHECK_LOCAL": "1", "RELAYCLIENT": ""}
    assert codes(smtpd(site, [f"joe-nobox@{FQDN}", "anyone@remote.example", f"joe-box@{FQDN}"], env)) == [550, 250, 250]
    # Not a relay client: the remote one is qmail's rcpthosts refusal, not a check.
    assert codes(smtpd(site, ["anyone@remote.example"], {"RCPTCHECK_LOCAL": "1"})) == [553]


def test_brtlimit_drops_the_connection(site: Site) -> None:
    got = smtpd(site, [f"x{i}@{FQDN}" for i in range(5)], {"RCPTCHECK_LOCAL": "1", "BRTLIMIT": "2"})
    assert got[3:] == [b"550 sorry, no mailbox here by that name (#5.1.1)",
                       b"421 too many invalid addresses, goodbye (#4.3.0)"]


def _program(site: Site) -> Path:
    prog = site.base / "check.sh"
    log = site.base / "check.log"
    prog.write_text(f"#!/bin/sh\necho \"$SENDER $RECIPIENT\" >> {log}\n"
                    "case \"$RECIPIENT\" in\n"
                    "  ok@*) exit 0 ;;\n  no@*) exit 100 ;;\n  temp@*) exit 111 ;;\n  odd@*) exit 120 ;;\n"
                    "  *) exit 3 ;;\nesac\n")
    prog.chmod(0o755)
    log.touch()
    os.chown(log, site.uid, site.gid)
    return prog


def test_rcptcheck_program_exit_codes(site: Site) -> None:
    env = {"RCPTCHECK": str(_program(site))}
    got = smtpd(site, [f"ok@{FQDN}", f"no@{FQDN}", f"other@{FQDN}"], env, sender="s@x.example")
    assert got[3:6] == [b"250 ok", b"553 sorry, no mailbox here by that name. (#5.1.1)", b"250 ok"]
    assert (site.base / "check.log").read_text().split("\n")[:3] == [
        f"s@x.example ok@{FQDN}", f"s@x.example no@{FQDN}", f"s@x.example other@{FQDN}"]
    got = smtpd(site, [f"temp@{FQDN}", f"ok@{FQDN}"], env)
    assert got[3:] == [b"421 unable to verify recipient (#4.3.0)"]  # and the end of the connection
    got = smtpd(site, [f"odd@{FQDN}", f"ok@{FQDN}"], env)
    assert got[3:] == [b"421 unable to execute recipient check (#4.3.0)"]
    got = smtpd(site, [f"ok@{FQDN}"], {"RCPTCHECK": str(site.base / "missing")})
    assert got[3:] == [b"421 unable to execute recipient check (#4.3.0)"]
    # As the patch: not run for relay clients.
    before = (site.base / "check.log").read_text()
    assert codes(smtpd(site, [f"no@{FQDN}"], dict(env, RELAYCLIENT=""))) == [250]
    assert (site.base / "check.log").read_text() == before


def test_validrcptto_cdb_from_qmail_newvrt(site: Site) -> None:
    site.home.control("validrcptto", f"# valid\nJoe-Box@{FQDN}\n-joe-bad@{FQDN}\n@other.example\n-@{FQDN}\n")
    expect(run([site.home.bin("qmail-newvrt")], user=TEST_USER))
    assert (site.home.path / "control" / "validrcptto.cdb").exists()
    site.home.control("rcpthosts", f"{FQDN}\nother.example\nthird.example\n")
    got = smtpd(site, [f"joe-box@{FQDN}", f"joe-bad@{FQDN}", "any@other.example", f"zz@{FQDN}",
                       "x@third.example"])
    vrt = b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)"
    assert got[3:8] == [b"250 ok", vrt, b"250 ok", vrt, b"250 ok"]  # third.example: not mentioned
    # Relay clients are not checked against it (as the patch).
    assert codes(smtpd(site, [f"zz@{FQDN}"], {"RELAYCLIENT": ""})) == [250]
    # Not mentioned, and the built-in check on: the built-in check decides.
    assert codes(smtpd(site, ["x@third.example"], {"RCPTCHECK_LOCAL": "1"})) == [250]  # not local: never checked


ASK = """
import sys
from pyqmail.local import qmail_rcptcheckd
for local in sys.argv[2:]:
    a = qmail_rcptcheckd.ask(sys.argv[1], local.encode())
    print(a.code, a.why)
"""


def test_rcptcheckd_answers_root_and_qmaild_only_and_never_guesses(root_home: QHome) -> None:
    """qmail-rcptcheckd: K/D/Z as the user sees the home; other peers refused; trouble is Z (451), never D."""
    import sys
    import time

    from conftest import ROOT

    pq = pwd.getpwnam(TEST_USER)
    users = root_home.path.parent / "users"
    for d in (users, users / "joe", users / "shut"):
        d.mkdir()
        os.chown(d, pq.pw_uid, pq.pw_gid)
    (users / "shut").chmod(0o700)
    (users / "joe" / ".qmail-box").write_text("./Maildir/\n")
    (users / "joe" / ".qmail-locked").write_text("./Maildir/\n")
    (users / "joe" / ".qmail-locked").chmod(0o000)  # root could read it; the user cannot
    os.chown(users / "joe" / ".qmail-locked", 0, 0)
    (root_home.path / "users" / "assign").write_text(
        f"+joe-:{TEST_USER}:{pq.pw_uid}:{pq.pw_gid}:{users}/joe:-::\n"
        f"+shut-:{TEST_USER}:{pq.pw_uid}:{pq.pw_gid}:{users}/shut/inner:-::\n"
        f"+boss-:root:0:0:/root:-::\n.\n")
    expect(run([root_home.bin("qmail-newu")]))
    env = {"PATH": "/usr/bin:/bin"}
    d = subprocess.Popen([root_home.bin("qmail-rcptcheckd")], env=env, cwd=root_home.path, stderr=subprocess.PIPE)
    try:
        sock = root_home.path / "run" / "qmail-rcptcheck.sock"
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)

        def ask(user: str | None, *locals_: str) -> list[str]:
            r = run([sys.executable, "-c", ASK, str(root_home.path), *locals_], user=user,
                    env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src")})
            expect(r)
            return r.stdout.decode().splitlines()

        got = ask("qmaild", "joe-box", "joe-none", "joe-locked", "shut-x", "boss-x")
        assert [g[:1] for g in got] == ["K", "D", "Z", "Z", "K"], got
        assert "unable to open .qmail-locked" in got[2] and "unable to switch to" in got[3], got
        assert ask(None, "joe-box")[0][:1] == "K"  # root
        assert ask(TEST_USER, "joe-box")[0][:1] == "Z"  # anyone else: no answer
    finally:
        d.terminate()
        _, err = d.communicate(timeout=30)
    assert d.returncode == 0, err
    assert not (root_home.path / "run" / "qmail-rcptcheck.sock").exists()
