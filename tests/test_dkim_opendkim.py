"""qmail-dkim against OpenDKIM (issue 16): Ed25519 and RSA, both directions.

OpenDKIM (Debian's opendkim 2.11, built with OpenSSL 3: ed25519-sha256 and
rsa-sha256) is an implementation no one here wrote, in C over OpenSSL:
neither dkimpy nor PyNaCl. Debian 12's Mail::DKIM has no Ed25519, so this is
the outside check of RFC 8463 here. opendkim runs in its test mode (`-t`:
the milter callbacks fed from a file, the headers it would add printed as
`### INSHEADER` lines): verifying prints its Authentication-Results,
signing its DKIM-Signature. Its resolver is libunbound, configured
(ResolverConfiguration) to forward every query to the DNS server the test
runs on 127.0.0.1, which serves the public keys.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CI, QHome, expect, run
from test_dkim import DOMAIN, MESSAGE, SELECTOR, ar_of, catcher, inbound, keyed, run_filter, sign  # noqa: F401
from ucspikit import DNSServer

INSHEADER = re.compile(r"^### INSHEADER: idx=\d+ hname='([^']*)' hvalue='(.*?)'$", re.S | re.M)


def opendkim() -> str:
    """Return the opendkim program; fail in CI, skip elsewhere, without it."""
    found = shutil.which("opendkim", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found:
        return found
    if CI:
        pytest.fail("opendkim missing: .ci/run installs package opendkim")
    pytest.skip("opendkim not installed (apt-get install opendkim)")


def configure(tmp: Path, dns: DNSServer, lines: str) -> Path:
    """Write an opendkim.conf (and libunbound's, forwarding to dns) in tmp; return its path."""
    ip, port = dns.address
    unbound = tmp / "unbound.conf"
    unbound.write_text("server:\n\tdo-not-query-localhost: no\n\tverbosity: 0\n"
                       f"forward-zone:\n\tname: \".\"\n\tforward-addr: {ip}@{port}\n")
    conf = tmp / "opendkim.conf"
    # RequireSafeKeys: the key sits under /tmp, which other users can write.
    conf.write_text(f"Syslog no\nResolverConfiguration {unbound}\nRequireSafeKeys false\nDNSTimeout 5\n"
                    "AuthservID opendkim.test\nAlwaysAddARHeader yes\n" + lines)
    return conf


def headers_added(conf: Path, message: bytes, name: str) -> list[str]:
    """Return the value of each name header opendkim's test mode adds to message (asserting one at least)."""
    res = expect(run([opendkim(), "-x", str(conf), "-vv", "-t", "-"], input=message))
    values = [v for n, v in INSHEADER.findall(res.stdout.decode()) if n == name]
    assert values, res.explain()
    return values


def opendkim_verdicts(tmp: Path, dns: DNSServer, message: bytes) -> list[str]:
    """Return OpenDKIM's `dkim=RESULT ... header.a=ALG` results for message, one per signature."""
    conf = configure(tmp, dns, "Mode v\nMinimumKeyBits 1024\n")
    ars = headers_added(conf, message, "Authentication-Results")
    assert len(ars) == 1, ars
    value = re.sub(r"\([^()]*\)", "", ars[0])  # comments, such as (2048-bit key; unprotected key)
    return [" ".join(part.split()) for part in value.split(";")[1:] if part.strip().startswith("dkim=")]


def opendkim_sign(tmp: Path, dns: DNSServer, message: bytes, key: Path, selector: str, algorithm: str) -> bytes:
    """Return message with OpenDKIM's DKIM-Signature (relaxed/relaxed, key, selector, algorithm) on top."""
    conf = configure(tmp, dns, f"Mode s\nDomain {DOMAIN}\nKeyFile {key}\nSelector {selector}\n"
                               f"SignatureAlgorithm {algorithm}\nCanonicalization relaxed/relaxed\n")
    sigs = headers_added(conf, message, "DKIM-Signature")
    assert len(sigs) == 1, sigs
    return b"DKIM-Signature: " + sigs[0].encode() + b"\n" + message


def openssl_key(tmp: Path, name: str, algorithm: str) -> tuple[Path, bytes]:
    """Make a PEM private key with the openssl program; return its path and its DNS p= value."""
    path = tmp / name
    opts = ["-pkeyopt", "rsa_keygen_bits:2048"] if algorithm == "rsa" else []
    subprocess.run(["openssl", "genpkey", "-algorithm", algorithm, *opts, "-out", str(path)],
                   check=True, capture_output=True)
    der = subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    # RFC 8463 3: an Ed25519 p= is the bare 32-byte public key, not its SubjectPublicKeyInfo.
    return path, base64.b64encode(der[-32:] if algorithm == "ed25519" else der)


def test_our_ed25519_and_rsa_signatures_verify_with_opendkim(keyed: tuple[QHome, dict], tmp_path: Path) -> None:
    home, records = keyed
    signed = sign(home, tmp_path)
    assert signed.count(b"DKIM-Signature:") == 2
    with DNSServer(records) as dns:
        verdicts = opendkim_verdicts(tmp_path, dns, signed)
        assert sorted(re.sub(r" .* header\.a=(\S+) .*", r" \1", v) for v in verdicts) == [
            "dkim=pass ed25519-sha256", "dkim=pass rsa-sha256"], verdicts
        assert all(f"header.d={DOMAIN}" in v for v in verdicts)
        assert any(f"header.s={SELECTOR}-ed25519" in v for v in verdicts)
        assert (f"{SELECTOR}-ed25519._domainkey.{DOMAIN}", "TXT") in dns.queries
        tampered = signed.replace(b"Hello Bob.", b"Hello Eve.")
        verdicts = opendkim_verdicts(tmp_path, dns, tampered)
        assert len(verdicts) == 2 and all(v.startswith("dkim=fail") for v in verdicts), verdicts
        forged = signed.replace(b"Subject: hello", b"Subject: hullo")
        verdicts = opendkim_verdicts(tmp_path, dns, forged)
        assert len(verdicts) == 2 and all(v.startswith("dkim=fail") for v in verdicts), verdicts


@pytest.mark.parametrize("algorithm", ["ed25519", "rsa"])
def test_opendkim_signatures_verify_in_ours(keyed: tuple[QHome, dict], tmp_path: Path, algorithm: str) -> None:
    home, records = keyed
    selector = f"od-{algorithm}"
    key, public = openssl_key(tmp_path, selector, algorithm)
    text = b"v=DKIM1; k=" + algorithm.encode() + b"; p=" + public
    records = {**records, f"{selector}._domainkey.{DOMAIN}": {
        "TXT": [tuple(text[i:i + 255] for i in range(0, len(text), 255))]}}
    a = "ed25519-sha256" if algorithm == "ed25519" else "rsa-sha256"
    prog, out = catcher(tmp_path)
    with DNSServer(records) as dns:
        signed = opendkim_sign(tmp_path, dns, MESSAGE, key, selector, a)
        assert f"a={a};".encode() in signed and f"s={selector};".encode() in signed
        b = re.search(rb"\bb=([A-Za-z0-9+/]{8})", signed.split(b"bh=", 1)[1].split(b";", 1)[1])
        assert b is not None
        code, _, err = run_filter(home, signed, inbound(DKIMQUEUE=prog, DNSCACHEIP=dns.dnscacheip))
        assert code == 0, err
        got = (out / "msg").read_bytes()
        assert got.endswith(signed)
        assert (f"\tdkim=pass header.d={DOMAIN} header.s={selector} header.a={a} header.b={b.group(1).decode()};\n"
                in ar_of(got)), ar_of(got)
        code, _, err = run_filter(home, signed.replace(b"Hello Bob.", b"Hello Eve."),
                                  inbound(DKIMQUEUE=prog, DNSCACHEIP=dns.dnscacheip))
        assert code == 0, err
        assert f"\tdkim=fail header.d={DOMAIN} header.s={selector} header.a={a}" in ar_of((out / "msg").read_bytes())
        # And OpenDKIM agrees with itself on both, so a pass above is not a key both got wrong.
        assert opendkim_verdicts(tmp_path, dns, signed)[0].startswith("dkim=pass")
