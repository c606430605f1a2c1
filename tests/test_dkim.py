"""qmail-dkim (issue 16.3-5): DKIM signing and verifying, DMARC, ARC, `qmail dkim keygen`.

Cross-checked with an implementation no one here wrote: Perl's Mail::DKIM
(Debian's libmail-dkim-perl) verifies what qmail-dkim signs and signs what
qmail-dkim verifies, with the keys served by a DNS server on 127.0.0.1.
Debian 12's Mail::DKIM (1.20230212) has no Ed25519 (its Algorithm/ holds
rsa_sha1 and rsa_sha256 only), so Ed25519 is checked here with dkimpy's own
verifier, and the RSA signature beside it with Mail::DKIM.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import CI, IS_ROOT, VENV_BIN, QHome, expect, make_home, need_root_setup, run
from ucspikit import DNSServer

DOMAIN = "example.com"
SELECTOR = "default"
FROM_IP = "127.0.0.1"

MESSAGE = (b"Received: from client.example.com (HELO client.example.com) (127.0.0.1)\n"
           b"  by mx.test.example.com with SMTP; 1 Jan 2025 00:00:00 -0000\n"
           b"From: Alice <alice@example.com>\n"
           b"To: bob@test.example.com\n"
           b"Subject: hello\n"
           b"Date: Wed, 1 Jan 2025 00:00:00 +0000\n"
           b"Message-ID: <1@example.com>\n"
           b"MIME-Version: 1.0\n"
           b"Content-Type: text/plain; charset=us-ascii\n"
           b"List-Unsubscribe: <mailto:unsub@example.com>\n"
           b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\n"
           b"\n"
           b"Hello Bob.\n" + b"line of text\n" * 20)
ENVELOPE = b"Falice@example.com\0Tbob@test.example.com\0\0"

PERL_VERIFY = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::ARC::Verifier; use Net::DNS::Resolver;
my ($ip, $port, $what) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => [$ip], port => $port,
    udp_timeout => 5, tcp_timeout => 5, retry => 1, usevc => 0));
my $v = $what eq 'arc' ? Mail::DKIM::ARC::Verifier->new : Mail::DKIM::Verifier->new;
while (<STDIN>) { s/\015?\012$/\015\012/; $v->PRINT($_); }
$v->CLOSE;
print $v->result, "\n";
if ($what ne 'arc') { print join(' ', $_->domain, $_->algorithm, $_->result), "\n" for $v->signatures; }
"""

PERL_SIGN = r"""
use strict; use warnings;
use Mail::DKIM::Signer;
my ($key, $domain, $selector) = @ARGV;
my $s = Mail::DKIM::Signer->new(Algorithm => 'rsa-sha256', Method => 'relaxed', Domain => $domain,
    Selector => $selector, KeyFile => $key, Headers => 'from:to:subject:date:message-id');
my $msg = '';
while (<STDIN>) { $msg .= $_; s/\015?\012$/\015\012/; $s->PRINT($_); }
$s->CLOSE;
my $sig = $s->signature->as_string;
$sig =~ s/\015\012/\012/g;
print $sig, "\n", $msg;
"""


def perl() -> str:
    """Return perl with Mail::DKIM; fail in CI, skip elsewhere, without it."""
    found = shutil.which("perl")
    if found and subprocess.run([found, "-MMail::DKIM::Verifier", "-e", "1"], capture_output=True).returncode == 0:
        return found
    if CI:
        pytest.fail("Mail::DKIM missing: .ci/run installs package libmail-dkim-perl")
    pytest.skip("Mail::DKIM not installed (apt-get install libmail-dkim-perl)")


def mail_dkim(dns: DNSServer, message: bytes, what: str = "dkim") -> list[str]:
    """Return Mail::DKIM's verdict lines on message: the result, then one line per signature."""
    ip, port = dns.address
    res = expect(run([perl(), "-e", PERL_VERIFY, ip, str(port), what], input=message))
    return res.stdout.decode().splitlines()


def run_filter(home: QHome, message: bytes, env: dict[str, str], envelope: bytes = ENVELOPE,
               fd6: bool = True) -> tuple[int, bytes, bytes]:
    """Run home's qmail-dkim with message on 0, envelope on 1 (and a pipe on 6); return (code, fd-6 text, stderr)."""
    from pyqmail import spawn

    mr, mw = os.pipe()
    er, ew = os.pipe()
    xr, xw = os.pipe()
    sr, sw = os.pipe()
    fds = {0: mr, 1: er, 2: xw}
    if fd6:
        fds[6] = sw
    prog = str(home.bin("qmail-dkim"))
    pid = spawn.spawn(prog, [prog], env={"PATH": "/usr/bin:/bin", **env}, fds=fds, fast=False)
    for fd in (mr, er, xw, sw):
        os.close(fd)
    os.write(mw, message) if len(message) < 60000 else None
    os.close(mw)
    os.write(ew, envelope)
    os.close(ew)
    err = b"".join(iter(lambda: os.read(xr, 65536), b""))
    text = b"".join(iter(lambda: os.read(sr, 65536), b""))
    os.close(xr)
    os.close(sr)
    return spawn.wait(pid), text, err


def catcher(tmp: Path, code: int = 0, text: str = "") -> tuple[str, Path]:
    """Return (a queue program keeping what it gets in tmp, the directory); it exits code after writing text on 6."""
    script = tmp / "catch"
    say = f"printf '%s' '{text}' >&6\n" if text else ""
    script.write_text(f"#!/bin/sh\ncat > '{tmp}/msg'\ncat <&1 > '{tmp}/env'\n{say}exit {code}\n")
    script.chmod(0o755)
    return str(script), tmp


def record(keygen_out: str) -> dict[str, dict[str, list[object]]]:
    """Return DNSServer records of the TXT lines keygen printed."""
    out: dict[str, dict[str, list[object]]] = {}
    for line in keygen_out.splitlines():
        m = re.match(r'^(\S+)\. IN TXT \( (.*) \)$', line)
        if m:
            strings = tuple(s.encode() for s in re.findall(r'"([^"]*)"', m.group(2)))
            out[m.group(1)] = {"TXT": [strings]}
    return out


@pytest.fixture(scope="module")
def keyed() -> tuple[QHome, dict[str, dict[str, list[object]]]]:
    """A single-user home (me: mx.test.example.com) with RSA default and Ed25519 default-ed25519 for example.com."""
    home = make_home("mx.test.example.com")
    res = expect(run([VENV_BIN / "qmail", "dkim", "keygen", "--home", home.path, "--both", DOMAIN, SELECTOR]))
    records = record(res.stdout.decode())
    yield home, records
    shutil.rmtree(home.path.parent, ignore_errors=True)


def sign(home: QHome, tmp: Path, message: bytes = MESSAGE, **env: str) -> bytes:
    prog, out = catcher(tmp)
    code, text, err = run_filter(home, message, {"DKIMQUEUE": prog, **env})
    assert code == 0, err
    return (out / "msg").read_bytes()


# keygen

def test_keygen_writes_keys_and_prints_records(keyed: tuple[QHome, dict]) -> None:
    home, records = keyed
    d = home.path / "control" / "domainkeys" / DOMAIN
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in (SELECTOR, SELECTOR + "-ed25519"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    assert (d / SELECTOR).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert len((d / (SELECTOR + "-ed25519")).read_bytes().strip()) == 44  # base64 of a 32-byte seed
    rsa = b"".join(records[f"{SELECTOR}._domainkey.{DOMAIN}"]["TXT"][0])  # type: ignore[arg-type]
    ed = b"".join(records[f"{SELECTOR}-ed25519._domainkey.{DOMAIN}"]["TXT"][0])  # type: ignore[arg-type]
    assert rsa.startswith(b"v=DKIM1; k=rsa; p=MIIBIjAN")  # a 2048-bit SubjectPublicKeyInfo
    assert re.fullmatch(rb"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", ed)
    again = run([VENV_BIN / "qmail", "dkim", "keygen", "--home", home.path, DOMAIN, SELECTOR])
    assert again.returncode == 111 and b"exists" in again.stderr
    assert run([VENV_BIN / "qmail", "dkim", "keygen", "--home", home.path, "bad_domain"]).returncode == 100


def test_keygen_root_modes() -> None:
    """As root the key is root:nofiles 0640 in a root:nofiles 0750 directory: qmaild can read it."""
    if not IS_ROOT:
        pytest.skip("root only")
    need_root_setup()
    import grp

    home = make_home(single=False)
    try:
        expect(run([VENV_BIN / "qmail", "dkim", "keygen", "--home", home.path, "--ed25519", DOMAIN]))
        d = home.path / "control" / "domainkeys" / DOMAIN
        nofiles = grp.getgrnam("nofiles").gr_gid
        for p, mode in ((d, 0o750), (d / "default", 0o640)):
            st = p.stat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, nofiles, mode)
        expect(run(["cat", d / "default"], user="qmaild"))
        assert run(["cat", d / "default"], user="pqtest").returncode != 0
    finally:
        shutil.rmtree(home.path.parent, ignore_errors=True)


# signing, checked by Mail::DKIM

def test_our_rsa_signature_verifies_with_mail_dkim(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    home, records = keyed
    signed = sign(home, tmp_path)
    # Local injection (no TCPREMOTEIP): signed with both keys, Ed25519 and RSA.
    assert signed.count(b"DKIM-Signature:") == 2 and signed.endswith(MESSAGE)
    assert b"a=ed25519-sha256" in signed and b"a=rsa-sha256" in signed
    h = re.search(rb"a=rsa-sha256;.*?h=([^;]*);", signed, re.S)
    assert h is not None
    # Oversigned (filter.dkim.sign_headers): one more than present for the fields a reader trusts.
    assert b"".join(h.group(1).split()) == (b"from:from:to:to:cc:subject:subject:date:date:message-id:message-id:"
                                            b"reply-to:mime-version:mime-version:content-type:content-type:"
                                            b"list-unsubscribe:list-unsubscribe-post")
    with DNSServer(records) as dns:
        lines = mail_dkim(dns, signed)
        assert lines[0] == "pass", lines
        assert f"{DOMAIN} rsa-sha256 pass" in lines
        tampered = signed.replace(b"Hello Bob.", b"Hello Eve.")
        lines = mail_dkim(dns, tampered)
        assert lines[0] == "fail" and f"{DOMAIN} rsa-sha256 fail" in lines, lines


def test_ed25519_signature_verifies_and_tampering_fails(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    import dkim

    home, records = keyed
    signed = sign(home, tmp_path)
    with DNSServer(records) as dns:
        def txt(name: bytes, timeout: int = 5) -> bytes | None:
            import dns.resolver as r

            res = r.Resolver(configure=False)
            res.nameservers = [dns.address[0]]
            res.port = dns.address[1]
            try:
                ans = res.resolve(name.decode(), "TXT")
            except Exception:  # noqa: BLE001
                return None
            return b"".join(ans[0].strings)

        v = dkim.DKIM(signed)
        sigs = [i for i, (n, val) in enumerate(v.headers) if n.lower() == b"dkim-signature"]
        ed = [i for i, idx in enumerate(sigs) if b"ed25519" in v.headers[idx][1]][0]
        assert v.verify(idx=ed, dnsfunc=txt)
        with pytest.raises(dkim.ValidationError, match="body hash mismatch"):
            dkim.DKIM(signed.replace(b"Hello Bob.", b"Hello Eve.")).verify(idx=ed, dnsfunc=txt)
        forged = signed.replace(b"Subject: hello", b"Subject: hullo")
        assert not dkim.DKIM(forged).verify(idx=ed, dnsfunc=txt)


def test_explicit_key_missing_is_35_and_no_key_passes_unsigned(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    home, _ = keyed
    prog, out = catcher(tmp_path)
    code, _, err = run_filter(home, MESSAGE, {"DKIMQUEUE": prog, "DKIMSIGN": "/nonexistent/key"})
    assert code == 35 and b"does not exist" in err
    other = MESSAGE.replace(b"alice@example.com", b"alice@unkeyed.example")
    code, _, err = run_filter(home, other, {"DKIMQUEUE": prog})
    assert code == 0 and (out / "msg").read_bytes() == other


def test_dkimkeys_control_and_dkimsign_percent(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    home, _ = keyed
    key = home.path / "control" / "domainkeys" / DOMAIN / SELECTOR
    home.control("dkimkeys", f"other.example:{key}:chosen\n")
    try:
        signed = sign(home, tmp_path, MESSAGE.replace(b"alice@example.com", b"alice@other.example"))
        assert b"s=chosen;" in signed and b"d=other.example;" in signed
    finally:
        home.control("dkimkeys", None)
    signed = sign(home, tmp_path, DKIMSIGN=str(home.path / "control" / "domainkeys" / "%" / SELECTOR))
    assert signed.count(b"DKIM-Signature:") == 2 and b"s=default;" in signed


# verifying

def mail_dkim_signed(tmp: Path, keyed: tuple[QHome, dict]) -> bytes:
    home, _ = keyed
    key = home.path / "control" / "domainkeys" / DOMAIN / SELECTOR
    res = expect(run([perl(), "-e", PERL_SIGN, str(key), DOMAIN, SELECTOR], input=MESSAGE))
    assert res.stdout.startswith(b"DKIM-Signature:")
    return res.stdout


def inbound(**extra: str) -> dict[str, str]:
    return {"TCPREMOTEIP": FROM_IP, **extra}


def ar_of(message: bytes) -> str:
    m = re.match(rb"(Authentication-Results: .*?\n)(?=\S)", message, re.S)
    assert m is not None, message[:400]
    return m.group(1).decode()


def test_mail_dkim_signature_verifies_in_ours(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    home, records = keyed
    signed = mail_dkim_signed(tmp_path, keyed)
    b = re.search(rb"b=([A-Za-z0-9+/]{8})", signed.split(b"bh=", 1)[1].split(b";", 1)[1])
    assert b is not None
    prog, out = catcher(tmp_path)
    with DNSServer(records) as dns:
        code, _, err = run_filter(home, signed, inbound(DKIMQUEUE=prog, DNSCACHEIP=dns.dnscacheip))
        assert code == 0, err
        got = (out / "msg").read_bytes()
        assert got.endswith(signed)
        assert ar_of(got) == (
            "Authentication-Results: mx.test.example.com;\n"
            "\tspf=none smtp.mailfrom=alice@example.com;\n"
            f"\tdkim=pass header.d=example.com header.s=default header.a=rsa-sha256 header.b={b.group(1).decode()};\n"
            "\tdmarc=none header.from=example.com;\n"
            "\tarc=none\n")
        code, _, err = run_filter(home, signed.replace(b"Hello Bob.", b"Hello Eve."),
                                  inbound(DKIMQUEUE=prog, DNSCACHEIP=dns.dnscacheip))
        assert code == 0, err
        assert f"dkim=fail header.d=example.com header.s=default header.a=rsa-sha256 header.b={b.group(1).decode()};" \
            in ar_of((out / "msg").read_bytes())


def test_forged_authentication_results_of_this_host_are_removed(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    home, records = keyed
    forged = b"Authentication-Results: mx.test.example.com; dkim=pass header.d=bank.example\n" + MESSAGE
    kept = b"Authentication-Results: other.example; dkim=pass\n"
    prog, out = catcher(tmp_path)
    with DNSServer(records) as dns:
        code, _, err = run_filter(home, kept + forged, inbound(DKIMQUEUE=prog, DNSCACHEIP=dns.dnscacheip))
    assert code == 0, err
    got = (out / "msg").read_bytes()
    assert b"bank.example" not in got and kept in got and b"\tdkim=none;\n" in got


def test_dkimverify_letters_reject(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    home, records = keyed
    prog, out = catcher(tmp_path)
    with DNSServer(records) as dns:
        env = inbound(DKIMQUEUE=prog, DNSCACHEIP=dns.dnscacheip)
        assert run_filter(home, MESSAGE, {**env, "DKIMVERIFY": "S"})[:2] == (
            82, b"Dmessage has no DKIM signature (#5.7.20)")
        assert run_filter(home, MESSAGE, {**env, "DKIMVERIFY": "s"})[:2] == (
            82, b"Zmessage has no DKIM signature (#4.7.5)")
        assert run_filter(home, MESSAGE, {**env, "DKIMVERIFY": "S"}, fd6=False)[0] == 31
        assert run_filter(home, MESSAGE, {**env, "DKIMVERIFY": "IU"})[0] == 0


# DMARC

def dmarc_records(records: dict, policy: str) -> dict:
    return {**records,
            "example.com": {"TXT": [b"v=spf1 ip4:127.0.0.1 -all"]},
            "_dmarc.example.com": {"TXT": [policy.encode()]}}


@pytest.mark.parametrize("behavior", ["0", "1"])
def test_dmarc_fail_reject(keyed: tuple[QHome, dict], tmp_path: Path, behavior: str) -> None:
    """From example.com (p=reject), unsigned, from an address SPF fails: dmarc=fail; behavior 1 rejects."""
    home, records = keyed
    prog, out = catcher(tmp_path)
    home.control("dmarcbehavior", behavior + "\n")
    try:
        with DNSServer(dmarc_records(records, "v=DMARC1; p=reject; rua=mailto:d@example.com")) as dns:
            code, text, err = run_filter(home, MESSAGE, {"TCPREMOTEIP": "127.0.0.9", "DKIMQUEUE": prog,
                                                         "DNSCACHEIP": dns.dnscacheip})
    finally:
        home.control("dmarcbehavior", None)
    if behavior == "1":
        assert (code, text) == (82, b"DDMARC policy of example.com rejects this message (#5.7.1)"), err
        assert not (out / "msg").exists()
        return
    assert code == 0, err
    assert ar_of((out / "msg").read_bytes()) == (
        "Authentication-Results: mx.test.example.com;\n"
        "\tspf=fail smtp.mailfrom=alice@example.com;\n"
        "\tdkim=none;\n"
        "\tdmarc=fail (p=reject dis=reject) header.from=example.com;\n"
        "\tarc=none\n")


def test_dmarc_pass_by_spf_and_by_dkim(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    home, records = keyed
    prog, out = catcher(tmp_path)
    with DNSServer(dmarc_records(records, "v=DMARC1; p=reject; adkim=s")) as dns:
        env = {"DKIMQUEUE": prog, "DNSCACHEIP": dns.dnscacheip}
        code, _, err = run_filter(home, MESSAGE, {"TCPREMOTEIP": "127.0.0.1", **env})
        assert code == 0, err
        assert ar_of((out / "msg").read_bytes()) == (
            "Authentication-Results: mx.test.example.com;\n"
            "\tspf=pass smtp.mailfrom=alice@example.com;\n"
            "\tdkim=none;\n"
            "\tdmarc=pass (p=reject dis=none) header.from=example.com;\n"
            "\tarc=none\n")
        # DKIM-aligned, SPF failing (another client address, sender of another domain).
        signed = sign(home, tmp_path / "s" if (tmp_path / "s").mkdir() is None else tmp_path)
        code, _, err = run_filter(home, signed, {"TCPREMOTEIP": "127.0.0.9", **env},
                                  envelope=b"Fbounce@lists.example.net\0Tbob@test.example.com\0\0")
        assert code == 0, err
        ar = ar_of((out / "msg").read_bytes())
        assert "\tspf=none smtp.mailfrom=bounce@lists.example.net;\n" in ar
        assert ar.count("dkim=pass header.d=example.com") == 2
        assert "\tdmarc=pass (p=reject dis=none) header.from=example.com;\n" in ar


def test_dmarc_quarantine_behavior_2_and_subdomain_policy(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    home, records = keyed
    prog, out = catcher(tmp_path)
    home.control("dmarcbehavior", "2\n")
    try:
        sub = MESSAGE.replace(b"alice@example.com", b"alice@news.example.com")
        with DNSServer(dmarc_records(records, "v=DMARC1; p=reject; sp=quarantine")) as dns:
            code, _, err = run_filter(home, sub, {"TCPREMOTEIP": "127.0.0.9", "DKIMQUEUE": prog,
                                                  "DNSCACHEIP": dns.dnscacheip},
                                      envelope=b"Falice@news.example.com\0Tbob@test.example.com\0\0")
    finally:
        home.control("dmarcbehavior", None)
    assert code == 0, err
    got = (out / "msg").read_bytes()
    assert got.startswith(b"X-DMARC-Quarantine: p=quarantine header.from=news.example.com\n"
                          b"Authentication-Results: mx.test.example.com;\n")
    assert b"\tdmarc=fail (p=quarantine dis=quarantine) header.from=news.example.com;\n" in got


def test_dmarc_evaluate_pure() -> None:
    from pyqmail.filter import dmarc

    table = {"_dmarc.example.com": (0, ["v=DMARC1; p=reject; pct=50; aspf=s"])}

    def lookup(name: str) -> tuple[int, list[str]]:
        return table.get(name, (2, []))

    # pct: a failing message outside the sample gets the next milder disposition.
    assert dmarc.evaluate("example.com", "fail", "", [], lookup, lambda: 75).disposition == "quarantine"
    assert dmarc.evaluate("example.com", "fail", "", [], lookup, lambda: 10).disposition == "reject"
    # aspf=s: SPF of a subdomain is not aligned; adkim relaxed: a subdomain's signature is.
    assert dmarc.evaluate("example.com", "pass", "mail.example.com", [], lookup).result == "fail"
    assert dmarc.evaluate("example.com", "none", "", ["mail.example.com"], lookup).result == "pass"
    assert dmarc.evaluate("example.com", "none", "", ["example.co.uk"], lookup).result == "fail"
    assert dmarc.evaluate("other.example", "none", "", [], lookup).ar() == "dmarc=none header.from=other.example"
    assert dmarc.evaluate("x.example.com", "none", "", [], lambda n: (1, [])).result == "temperror"
    assert dmarc.org_domain("a.b.example.co.uk") == "example.co.uk"


# ARC

def test_arc_seal_then_verify_after_a_second_hop(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    """Hop 1 receives (verifies: AR), qmail-local forwards (seals i=1); hop 2 verifies: arc=pass."""
    home, records = keyed
    hop2 = make_home("mx.second.example")
    try:
        prog, out = catcher(tmp_path)
        with DNSServer(dmarc_records(records, "v=DMARC1; p=none")) as dns:
            signed = sign(home, tmp_path)
            code, _, err = run_filter(home, signed, inbound(DKIMQUEUE=prog, DNSCACHEIP=dns.dnscacheip))
            assert code == 0, err
            received = (out / "msg").read_bytes()
            # qmail-local's forward: its environment has RECIPIENT and DTLINE; example.com's key seals.
            code, _, err = run_filter(home, b"Delivered-To: bob@example.com\n" + received, {
                "DKIMQUEUE": prog, "DNSCACHEIP": dns.dnscacheip, "RECIPIENT": "bob@example.com",
                "DTLINE": "Delivered-To: bob@example.com\n"})
            assert code == 0, err
            sealed = (out / "msg").read_bytes()
            assert sealed.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=example.com; s=default;")
            assert b"ARC-Message-Signature: i=1;" in sealed
            assert b"ARC-Authentication-Results: i=1; mx.test.example.com;" in sealed
            assert mail_dkim(dns, sealed, "arc")[0] == "pass"
            code, _, err = run_filter(hop2, sealed, {"TCPREMOTEIP": "127.0.0.9", "DKIMQUEUE": prog,
                                                     "DNSCACHEIP": dns.dnscacheip},
                                      envelope=b"Fbob@example.com\0Tcarol@second.example\0\0")
            assert code == 0, err
            ar = ar_of((out / "msg").read_bytes())
            assert ar.startswith("Authentication-Results: mx.second.example;\n") and ar.endswith("\tarc=pass\n")
            broken = sealed.replace(b"Hello Bob.", b"Hello Eve.")
            code, _, err = run_filter(hop2, broken, {"TCPREMOTEIP": "127.0.0.9", "DKIMQUEUE": prog,
                                                     "DNSCACHEIP": dns.dnscacheip})
            assert ar_of((out / "msg").read_bytes()).endswith("\tarc=fail\n")
    finally:
        shutil.rmtree(hop2.path.parent, ignore_errors=True)


# the qmail-queue interface

@pytest.mark.parametrize("code,text", [(0, ""), (11, ""), (31, ""), (51, ""), (53, ""), (54, ""), (61, ""),
                                       (71, ""), (81, ""), (91, ""), (82, "Dno thanks (#5.7.1)"),
                                       (82, "Zlater (#4.3.0)")])
def test_exit_codes_and_fd6_pass_through(keyed: tuple[QHome, dict], tmp_path: Path, code: int, text: str) -> None:
    home, _ = keyed
    prog, out = catcher(tmp_path, code, text)
    got, said, err = run_filter(home, MESSAGE, {"DKIMQUEUE": prog})
    assert (got, said) == (code, text.encode()), err
    assert (out / "env").read_bytes() == ENVELOPE


def test_real_qmail_queue_gets_the_signed_message(keyed: tuple[QHome, dict]) -> None:
    """Default DKIMQUEUE: QMAILHOME/bin/qmail-queue queues the signed message and the envelope."""
    from smtpdkit import queued

    home, _ = keyed
    code, _, err = run_filter(home, MESSAGE, {})
    assert code == 0, err
    (mess, sender, recips), = queued(home.queue)[-1:]
    assert sender == b"alice@example.com" and recips == [b"bob@test.example.com"]
    assert mess.count(b"DKIM-Signature:") == 2 and mess.endswith(MESSAGE)


@pytest.mark.parametrize("envelope,code", [(b"Xa\0\0", 91), (b"F" + b"a" * 1100 + b"\0\0", 11), (b"Fa\0Tb", 54)])
def test_bad_envelope_exits_as_qmail_queue(keyed: tuple[QHome, dict], tmp_path: Path, envelope: bytes,
                                           code: int) -> None:
    home, _ = keyed
    prog, out = catcher(tmp_path)
    assert run_filter(home, MESSAGE, {"DKIMQUEUE": prog}, envelope=envelope)[0] == code
    assert not (out / "msg").exists()


def smtp(home: QHome, env: dict[str, str], data: bytes) -> list[bytes]:
    """One SMTP session with home's qmail-smtpd (QMAILQUEUE=qmail-dkim); return the replies after the greeting."""
    from smtpdkit import Conversation

    c = Conversation(home.bin("qmail-smtpd"), {"QMAILQUEUE": str(home.bin("qmail-dkim")), "TCPLOCALHOST": "mx",
                                               "TCPLOCALIP": "127.0.0.1", "TCPREMOTEIP": "127.0.0.9",
                                               "PROTO": "TCP", **env})
    try:
        c.line()
        c.send(b"HELO client.example.com\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@mx.test.example.com>\r\n"
               b"DATA\r\n" + data.replace(b"\n", b"\r\n") + b".\r\nQUIT\r\n")
        return c.lines(6)
    finally:
        c.close()


def test_smtp_dmarc_reject_and_relay_client_signing(keyed: tuple[QHome, dict]) -> None:
    """qmail-smtpd with QMAILQUEUE=qmail-dkim: a DMARC p=reject failure is a 554 with its reason; a relay
    client's message is queued signed."""
    from smtpdkit import queued

    home, records = keyed
    body = MESSAGE.split(b"\n", 2)[2]  # without the Received line: qmail-smtpd writes its own
    home.control("dmarcbehavior", "1\n")
    try:
        with DNSServer(dmarc_records(records, "v=DMARC1; p=reject")) as dns:
            before = len(queued(home.queue))
            got = smtp(home, {"DNSCACHEIP": dns.dnscacheip}, body)
            assert got[4] == b"554 DMARC policy of example.com rejects this message (#5.7.1)\r\n", got
            assert len(queued(home.queue)) == before
            got = smtp(home, {"DNSCACHEIP": dns.dnscacheip, "RELAYCLIENT": ""}, body)
            assert got[4].startswith(b"250 ok "), got
    finally:
        home.control("dmarcbehavior", None)
    mess, sender, _ = queued(home.queue)[-1]
    assert sender == b"alice@example.com" and mess.count(b"DKIM-Signature:") == 2
    with DNSServer(records) as dns:
        assert mail_dkim(dns, mess)[0] == "pass"


def test_qmail_local_forward_is_sealed(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    """A .qmail `&address` forward through qmail-local, with QMAILQUEUE=qmail-dkim in its environment
    (as qmail-start passes it on), leaves with an ARC set that Mail::DKIM verifies."""
    home, records = keyed
    prog, out = catcher(tmp_path)
    user_home = tmp_path / "bob"
    user_home.mkdir(mode=0o755)
    user_home.chmod(0o755)
    (user_home / ".qmail").write_text("&carol@second.example\n")
    with DNSServer(dmarc_records(records, "v=DMARC1; p=none")) as dns:
        signed = sign(home, tmp_path)
        code, _, err = run_filter(home, signed, inbound(DKIMQUEUE=prog, DNSCACHEIP=dns.dnscacheip))
        assert code == 0, err
        received = (out / "msg").read_bytes()
        (out / "msg").unlink()
        env = {"PATH": "/usr/bin:/bin", "QMAILQUEUE": str(home.bin("qmail-dkim")), "DKIMQUEUE": prog,
               "DNSCACHEIP": dns.dnscacheip}
        with open(tmp_path / "in", "wb") as f:
            f.write(received)
        with open(tmp_path / "in", "rb") as f:
            p = subprocess.run([str(home.bin("qmail-local")), "--", "bob", str(user_home), "bob", "", "",
                                DOMAIN, "alice@example.com", "./Mailbox"], stdin=f, capture_output=True,
                               env=env, timeout=60)
        assert p.returncode == 0, p
        sealed = (out / "msg").read_bytes()
        assert (out / "env").read_bytes() == b"Falice@example.com\0Tcarol@second.example\0\0"
        assert sealed.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=example.com; s=default;")
        assert b"\nDelivered-To: bob@example.com\n" in sealed
        assert mail_dkim(dns, sealed, "arc")[0] == "pass"


def test_helo_from_qmail_smtpd_received_line() -> None:
    """SPF's HELO name comes from qmail-smtpd's Received line: `(HELO NAME)` when given, else the host."""
    from pyqmail.filter.dkim import _helo, split_header

    def helo(line: bytes) -> str:
        return _helo(split_header(line + b"\n  by mx with SMTP; date\nSubject: s\n\nbody\n")[0])

    assert helo(b"Received: from a.example (HELO b.example) (1.2.3.4)") == "b.example"
    assert helo(b"Received: from unknown (HELO c.example) (1.2.3.4)") == "c.example"
    assert helo(b"Received: from a.example (1.2.3.4)") == "a.example"
    assert helo(b"Received: from unknown (1.2.3.4)") == ""


def test_root_mode_qmaild_signs_and_queues(tmp_path: Path) -> None:
    """Root mode: qmail-dkim as qmaild (qmail-smtpd's user) reads the root:nofiles key, signs, and its
    qmail-queue (in the same process) writes the maildrop when no qmail-queued runs."""
    if not IS_ROOT:
        pytest.skip("root only")
    need_root_setup()
    import pwd

    home = make_home(single=False)
    try:
        expect(run([VENV_BIN / "qmail", "dkim", "keygen", "--home", home.path, DOMAIN]))
        (tmp_path / "m").write_bytes(MESSAGE)
        (tmp_path / "e").write_bytes(ENVELOPE)
        tmp_path.chmod(0o755)
        pw = pwd.getpwnam("qmaild")
        with open(tmp_path / "m", "rb") as m, open(tmp_path / "e", "rb") as e:
            p = subprocess.run([str(home.bin("qmail-dkim"))], stdin=m, stdout=e, stderr=subprocess.PIPE,
                               env={"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "127.0.0.1", "RELAYCLIENT": ""},
                               user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], timeout=60)
        assert p.returncode == 0, p.stderr
        (dropped,) = (home.path / "maildrop").iterdir()
        data = dropped.read_bytes()
        assert data.count(b"DKIM-Signature:") == 1 and b" d=example.com;" in data and MESSAGE in data
    finally:
        shutil.rmtree(home.path.parent, ignore_errors=True)
