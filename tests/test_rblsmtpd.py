"""rblsmtpd against ucspi-tcp 0.88's: $RBLSMTPD, RBL and anti-RBL lookups answered by a DNS
server on 127.0.0.1, the limited SMTP dialogue, its timeout, and pass-through."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest

from conftest import QHome, Result, run
from pyqmail.ucspi import dnsq
from pyqmail.ucspi.rblsmtpd import BOUNCE, REFUSE, Decision, answer, reverse
from ucspikit import DEADLINE, DNSServer, Served, ours, real, root_loopback_port53

DIALOGUE = b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nNOOP\r\nRSET\r\nEHLO y\r\nvrfy\r\n\r\nhelo\nQUIT\r\nNOOP\r\n"


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RBLSMTPD", "TCPREMOTEIP", "DNSCACHEIP")}
    env.update(extra)
    return env


def normal(res: Result) -> tuple[int, bytes, bytes]:
    return res.returncode, res.stdout, re.sub(rb" pid \d+: ", b" pid PID: ", res.stderr)


def both(args: list[str], env: dict[str, str], data: bytes = DIALOGUE) -> tuple[int, bytes, bytes]:
    """Run ucspi-tcp's rblsmtpd and ours alike; assert they agree; return ours (pids as PID)."""
    a = normal(run([real("rblsmtpd"), *args], input=data, env=env, timeout=DEADLINE * 3))
    b = normal(run([ours("rblsmtpd"), *args], input=data, env=env, timeout=DEADLINE * 3))
    assert b == a
    return b


REFUSAL = (b"220 rblsmtpd.local\r\n250 rblsmtpd.local\r\n250 rblsmtpd.local\r\n%s\r\n%s\r\n"
           b"250 rblsmtpd.local\r\n250 rblsmtpd.local\r\n250 rblsmtpd.local\r\n%s\r\n%s\r\n"
           b"250 rblsmtpd.local\r\n221 rblsmtpd.local\r\n")


@pytest.mark.parametrize("value,code,text", [
    ("Go away", b"451", b"Go away"),
    ("-Go away", b"553", b"Go away"),
    ("tab\there\x7f", b"451", b"tab?here?"),
    ("-", b"553", b""),
    ("x" * 300, b"451", b"x" * 200),
])
def test_rblsmtpd_variable_blocks(value: str, code: bytes, text: bytes) -> None:
    rc, out, err = both(["-t", "30", "echo", "passed"], base_env(TCPREMOTEIP="1.2.3.4", RBLSMTPD=value))
    msg = code + b" " + text
    assert (rc, out, err) == (0, REFUSAL % (msg, msg, msg, msg), b"rblsmtpd: 1.2.3.4 pid PID: " + msg + b"\n")


def test_rblsmtpd_empty_passes() -> None:
    assert both(["-r", "never.asked.invalid", "echo", "passed"], base_env(TCPREMOTEIP="1.2.3.4", RBLSMTPD="")) == (
        0, b"passed\n", b"")


def test_no_source_passes() -> None:
    """Without -r there is no default RBL (Debian's ucspi-tcp dropped rbl.maps.vix.com)."""
    assert both(["echo", "passed"], base_env(TCPREMOTEIP="1.2.3.4")) == (0, b"passed\n", b"")


@pytest.mark.parametrize("data", [
    b"quit\r\n", b"QuIt please\r\nNOOP\r\n", b"HELO\0x\r\n", b"helo\tx\r\n", b"\r\n\n",
    b"MAIL FROM:<" + b"a" * 200000 + b">\r\nQUIT\r\n", b"NOOP\r\nHELO partial", b"",
    b"   HELO x\r\n", b"RSET\rNOOP\r\n", b"noop\r\r\n",
])
def test_dialogue(data: bytes) -> None:
    both(["-t", "30", "echo", "passed"], base_env(TCPREMOTEIP="9.8.7.6", RBLSMTPD="-No"), data)


def test_timeout_zero_just_refuses() -> None:
    assert both(["-t", "0", "echo"], base_env(RBLSMTPD="Not now")) == (
        0, b"451 Not now\r\n", b"rblsmtpd:  pid PID: 451 Not now\n")


def test_timeout_ends_dialogue() -> None:
    """-t 1: a client that says nothing is dropped after a second, exit 0."""
    for binary in (real("rblsmtpd"), ours("rblsmtpd")):
        r, w = os.pipe()
        start = time.monotonic()
        p = subprocess.run([binary, "-t", "1", "echo"], stdin=r, capture_output=True,
                           env=base_env(RBLSMTPD="x"), timeout=DEADLINE)
        elapsed = time.monotonic() - start
        os.close(r)
        os.close(w)
        assert (p.returncode, p.stdout) == (0, b"220 rblsmtpd.local\r\n")
        assert 0.9 < elapsed < 5


@pytest.mark.parametrize("argv", [[], ["-x"], ["-t"], ["-t", "5"], ["-b", "-c"]])
def test_usage(argv: list[str]) -> None:
    assert both(argv, base_env(RBLSMTPD="x"), b"") [0] == 100


def test_unable_to_run() -> None:
    for prog in ("/nonexistent/smtpd", "no-such-smtpd-program"):
        rc, out, err = both([prog], base_env())
        # "file does not exist", or "access denied" if a $PATH directory cannot be searched.
        assert rc == 111 and err.startswith(b"rblsmtpd: fatal: unable to run %s: " % prog.encode())


RECORDS: dict[str, dict[str, list[object]]] = {
    "4.3.2.1.rbl.test": {"TXT": [b"Listed: see http://x/?1.2.3.4", (b"two", b"\x01parts")],
                         "A": ["127.0.0.2"]},
    "4.3.2.1.long.test": {"TXT": [b"L" * 250, b"M" * 100]},
    "5.3.2.1.white.test": {"A": ["127.0.0.2"]},
    "4.3.2.1.white.test": {"A": ["127.0.0.2"]},
    "6.3.2.1.rbl.test": {"A": ["127.0.0.2"]},  # no TXT: not listed
    "rbl.test": {"TXT": [b"the base itself"]},
}
SERVFAIL = ["4.3.2.1.fail.test", "5.3.2.1.fail.test"]
# djbdns waits out its third round (11 s) on SERVFAIL: few such cases are run against it.

SCENARIOS = [
    (["-r", "rbl.test"], "1.2.3.4"),
    (["-r", "rbl.test"], "1.2.3.5"),
    (["-r", "rbl.test"], "1.2.3.6"),
    (["-a", "white.test", "-r", "rbl.test"], "1.2.3.4"),
    (["-r", "rbl.test", "-a", "white.test"], "1.2.3.4"),
    (["-b", "-r", "rbl.test"], "1.2.3.4"),
    (["-r", "rbl.test", "-b"], "1.2.3.4"),
    (["-r", "fail.test"], "1.2.3.4"),
    (["-c", "-r", "fail.test"], "1.2.3.4"),
    (["-r", "rbl.test"], None),
    (["-r", "rbl.test"], "1..2.3.4"),
    (["-r", "x" * 70 + ".test"], "1.2.3.4"),
    (["-c", "-r", "x" * 70 + ".test"], "1.2.3.4"),
    (["-r", "long.test"], "1.2.3.4"),
    (["-r", "nothing.test", "-r", "rbl.test"], "1.2.3.4"),
]


def scenario_env(ip: str | None, dnscacheip: str) -> dict[str, str]:
    env = base_env(DNSCACHEIP=dnscacheip)
    if ip is not None:
        env["TCPREMOTEIP"] = ip
    return env


@pytest.mark.parametrize("args,ip", SCENARIOS, ids=range(len(SCENARIOS)))
def test_lookups_as_ucspi_tcp(args: list[str], ip: str | None) -> None:
    """The same DNS answers, the same decisions: ucspi-tcp's rblsmtpd asks port 53 only,
    so the test's DNS server listens on port 53 of a loopback address (root)."""
    addr = root_loopback_port53()
    with DNSServer(RECORDS, ip=addr, port=53, servfail=SERVFAIL) as dns:
        both(["-t", "30", *args, "echo", "passed"], scenario_env(ip, dns.dnscacheip), b"HELO x\r\nDATA\r\nQUIT\r\n")


def test_lookups_on_any_port() -> None:
    """Our rblsmtpd with its cache on an ephemeral port ($DNSCACHEIP=IP:PORT)."""
    with DNSServer(RECORDS, servfail=SERVFAIL) as dns:
        def go(args: list[str], ip: str | None) -> tuple[int, bytes, bytes]:
            return normal(run([ours("rblsmtpd"), "-t", "30", *args, "echo", "passed"],
                              input=b"MAIL FROM:<>\r\nQUIT\r\n", env=scenario_env(ip, dns.dnscacheip)))
        listed = b"451 Listed: see http://x/?1.2.3.4two?parts"
        assert go(["-r", "rbl.test"], "1.2.3.4") == (
            0, b"220 rblsmtpd.local\r\n250 rblsmtpd.local\r\n221 rblsmtpd.local\r\n",
            b"rblsmtpd: 1.2.3.4 pid PID: " + listed + b"\n")
        assert go(["-r", "rbl.test"], "1.2.3.5") == (0, b"passed\n", b"")
        assert go(["-a", "white.test", "-r", "rbl.test"], "1.2.3.4") == (0, b"passed\n", b"")
        assert go(["-b", "-r", "rbl.test"], "1.2.3.4")[2].endswith(b": 553 Listed: see http://x/?1.2.3.4two?parts\n")
        assert go(["-r", "fail.test"], "1.2.3.4") == (0, b"passed\n", b"")
        assert go(["-c", "-r", "fail.test"], "1.2.3.4")[2].endswith(b": 451 temporary RBL lookup error\n")
        assert go(["-r", "long.test"], "1.2.3.4")[2].endswith(b": 451 " + b"L" * 200 + b"\n")
        # A failed lookup forbids 553 even when a later source lists with -b.
        assert go(["-r", "fail.test", "-b", "-r", "rbl.test"], "1.2.3.4")[2].endswith(b": " + listed + b"\n")
        assert go(["-a", "fail.test", "-r", "rbl.test"], "1.2.3.4") == (0, b"passed\n", b"")
        assert go(["-c", "-a", "fail.test", "-b", "-r", "rbl.test"], "1.2.3.4")[2].endswith(b": " + listed + b"\n")
        assert ("4.3.2.1.rbl.test", "TXT") in dns.queries and ("4.3.2.1.white.test", "A") in dns.queries


def test_under_tcpserver(qhome: QHome) -> None:
    """tcpserver runs rblsmtpd (a stub: forked, its DNS library loaded once) which blocks a
    listed client and becomes the SMTP program for another."""
    records = {"1.0.0.127.rbl.test": {"TXT": [b"go away"]}}
    with DNSServer(records) as dns:
        env = base_env(DNSCACHEIP=dns.dnscacheip)
        env = {k: v for k, v in env.items() if not k.startswith("TCP")}
        argv = [ours("tcpserver"), "-1", "-v", "-HR", "-l", "x", "127.0.0.1", "0", str(qhome.bin("rblsmtpd")),
                "-r", "rbl.test", "sh", "-c", "echo 220 real smtpd $TCPREMOTEIP"]
        with Served(argv, env=env) as srv:
            out, _ = srv.connect(b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@b>\r\nQUIT\r\n")
            assert out == (b"220 rblsmtpd.local\r\n250 rblsmtpd.local\r\n250 rblsmtpd.local\r\n"
                           b"451 go away\r\n221 rblsmtpd.local\r\n")
            srv.wait_for(r"rblsmtpd: 127\.0\.0\.1 pid \d+: 451 go away")
            srv.wait_for(r"tcpserver: end \d+ status 0")
        records["1.0.0.127.rbl.test"] = {}
        with Served(argv, env=env) as srv:
            out, _ = srv.connect()
            assert out == b"220 real smtpd 127.0.0.1\n"


def test_client_gone_kills_with_sigpipe() -> None:
    """As C rblsmtpd, which leaves SIGPIPE alone: writing to a closed connection ends it by SIGPIPE."""
    for binary in (real("rblsmtpd"), ours("rblsmtpd")):
        r, w = os.pipe()
        os.close(r)
        p = subprocess.run([binary, "-t", "5", "echo"], stdin=subprocess.DEVNULL, stdout=w,
                           capture_output=False, stderr=subprocess.DEVNULL, env=base_env(RBLSMTPD="x"),
                           timeout=DEADLINE)
        os.close(w)
        assert p.returncode == -13


# Pure units.

def test_reverse() -> None:
    assert reverse(b"1.2.3.4") == b"4.3.2.1."
    assert reverse(b"") == b""
    assert reverse(b"1.2.3.4.") == b".4.3.2.1."
    assert reverse(b"::ffff:1.2.3.4") == b"4.3.2.1."
    assert reverse(b"2001:db8::1") == b"1.0.0.0." + b"0.0.0.0." * 5 + b"8.b.d.0.1.0.0.2."


def test_decision_units() -> None:
    listed = Decision(b"1.2.3.4", None)
    asked: list[bytes] = []
    listed.rbl(b"rbl", lambda name: asked.append(name) or b"why")  # type: ignore[func-returns-value]
    assert (listed.decision, listed.message(), asked) == (REFUSE, b"451 why", [b"4.3.2.1.rbl"])

    def fail(name: bytes) -> bytes:
        raise dnsq.Temporary("x")

    d = Decision(b"1.2.3.4", None)
    d.rbl(b"a", fail)
    d.bounce_listed = True
    d.rbl(b"b", lambda name: b"listed")
    assert (d.decision, d.message()) == (BOUNCE, b"451 listed")  # a failed lookup forbids 553
    assert Decision(b"", b"-\x00x").message() == b"553 ?x"
    assert answer(b"QUIT", b"451 x") == (b"221 rblsmtpd.local\r\n", True)
    assert answer(b"ehlo there", b"451 x") == (b"250 rblsmtpd.local\r\n", False)
    assert answer(b"DATA", b"451 x") == (b"451 x", False)


def test_dnscacheip_parsing() -> None:
    assert dnsq.parse_servers("127.0.0.1") == [("127.0.0.1", 53)]
    assert dnsq.parse_servers(" 10.0.0.1:5353, [::1]:53 ::2 junk") == [
        ("10.0.0.1", 5353), ("::1", 53), ("::2", 53)]
    assert dnsq.servers({"DNSCACHEIP": "127.0.0.9:99"}) == [("127.0.0.9", 99)]
    with pytest.raises(dnsq.Temporary):
        dnsq.labels(b"a" * 64 + b".b")
    assert dnsq.labels(b"a..b.") == [b"a", b"b"]


def test_dns_server_silent_is_temporary() -> None:
    """A cache that never answers is a temporary failure (djbdns's timeouts, shortened here)."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        saved = dnsq.TIMEOUTS
        dnsq.TIMEOUTS = (0.2,)
        with pytest.raises(dnsq.Temporary):
            dnsq.txt(b"x.test", [silent.getsockname()])
    finally:
        dnsq.TIMEOUTS = saved
        silent.close()
