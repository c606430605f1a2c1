"""qmail-remote's TLS (issue 13.4): STARTTLS, tlshosts/notlshosts, SMTPS, DANE and MTA-STS, as
processes against TLS servers on 127.0.0.1 (Postfix's smtpd and a test server) and DNS/HTTPS
servers run by the tests. Certificates are made with the openssl command."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import IS_ROOT, QHome, expect, run
from remotekit import DnsServer
from tlskit import (AdDnsServer, Cert, PolicyServer, Postfix, TlsSmtpServer, make_ca, make_leaf,
                    server_context, spki_sha256)

from pyqmail.remote import dane, mtasts
from pyqmail.remote import smtpclient as sc

MX = "127.0.0.2"  # not one of this host's interface addresses (127.0.0.1 is: qmail would not use it)


@pytest.fixture(scope="module")
def pki() -> Iterator[dict[str, Cert]]:
    d = Path(tempfile.mkdtemp(prefix="pyqmail-tls-", dir="/tmp"))
    d.chmod(0o755)
    ca = make_ca(d, "testca")
    other = make_ca(d, "otherca")
    certs = {
        "ca": ca, "other": other,
        "pfx": make_leaf(d, "pfx", ca, ["pfx.example.test"]),
        "mx": make_leaf(d, "mx", ca, ["mx1.example.com"]),
        "mx_other": make_leaf(d, "mx_other", other, ["mx1.example.com"]),
        "sts": make_leaf(d, "sts", ca, ["mta-sts.example.com"]),
    }
    for c in certs.values():
        c.key.chmod(0o644)  # Postfix reads its copy as root; keys here are test keys
    yield certs
    shutil.rmtree(d, ignore_errors=True)


def remote(h: QHome, env: dict[str, str], host: str = "example.com", recip: str = "a@example.com",
           message: bytes = b"Subject: tls\n\nsecret\n") -> bytes:
    e = {"PATH": os.environ["PATH"], **env}
    return expect(run([h.bin("qmail-remote"), host, "s@x.org", recip], input=message, env=e), 0).stdout


def tlshosts(h: QHome, name: str, ca: Cert | None) -> None:
    d = h.path / "control" / "tlshosts"
    d.mkdir(exist_ok=True)
    if ca is not None:
        shutil.copy(ca.cert, d / f"{name}.pem")


def note(report: bytes) -> bytes:
    return report.split(b"\n")[-2] if report.endswith(b"\n\0") else b""


# --- a test server -------------------------------------------------------------------------------

def test_opportunistic_starttls(qhome: QHome, pki: dict[str, Cert]) -> None:
    with TlsSmtpServer(server_context(pki["pfx"])) as srv, DnsServer({}) as d:
        qhome.control("smtproutes", f"example.com:[127.0.0.1]:{srv.port}\n")
        out = remote(qhome, d.env)
    assert out.startswith(b"r\0K127.0.0.1 accepted message.\nRemote host said: 250 ok queued\nTLS: TLSv1.3 ")
    assert out.endswith(b", not verified.\n\0")
    s = srv.sessions[0]
    assert s.commands[:3] == [b"EHLO test.example.com", b"STARTTLS", b"EHLO test.example.com"]
    assert s.tls == "TLSv1.3" and s.data == b"Subject: tls\r\n\r\nsecret\r\n"


def test_starttls_refused_goes_on_in_plain_text(qhome: QHome, pki: dict[str, Cert]) -> None:
    with TlsSmtpServer(server_context(pki["pfx"]), starttls_reply=b"454 TLS not available\r\n") as srv, \
            DnsServer({}) as d:
        qhome.control("smtproutes", f"example.com:[127.0.0.1]:{srv.port}\n")
        out = remote(qhome, d.env)
    assert out == b"r\0K127.0.0.1 accepted message.\nRemote host said: 250 ok queued\n\0"
    assert srv.sessions[0].tls == ""


def test_notlshosts_keeps_qmail_103_conversation(qhome: QHome, pki: dict[str, Cert]) -> None:
    with TlsSmtpServer(server_context(pki["pfx"])) as srv, \
            DnsServer({("pfx.example.test", "A"): ["127.0.0.1"]}) as d:
        qhome.control("smtproutes", f"example.com:pfx.example.test:{srv.port}\n")
        (qhome.path / "control" / "notlshosts").mkdir()
        qhome.control("notlshosts/pfx.example.test", "")
        out = remote(qhome, d.env)
    assert out == b"r\0K127.0.0.1 accepted message.\nRemote host said: 250 ok queued\n\0"
    assert srv.sessions[0].commands[0] == b"HELO test.example.com"


def test_handshake_failure_defers(qhome: QHome) -> None:
    """The server says 220 to STARTTLS, then sends garbage: deferred as the patch does, no plain text."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    import threading

    def serve() -> None:
        c, _ = srv.accept()
        with c, contextlib.suppress(OSError):  # qmail-remote hangs up on the garbage
            c.sendall(b"220 x\r\n")
            f = c.makefile("rb")
            f.readline()
            c.sendall(b"250-x\r\n250 STARTTLS\r\n")
            f.readline()
            c.sendall(b"220 go\r\n")
            c.recv(4096)
            c.sendall(b"this is not TLS\r\n" * 10)
            c.recv(4096)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with DnsServer({}) as d:
        qhome.control("smtproutes", f"example.com:[127.0.0.1]:{srv.getsockname()[1]}\n")
        out = remote(qhome, d.env)
    t.join(10)
    srv.close()
    assert out.startswith(b"ZTLS connect failed: ") and out.endswith(b"; connected to 127.0.0.1.\n\0"), out


@pytest.mark.skipif(not IS_ROOT, reason="port 465 needs root")
def test_smtproutes_port_465_is_tls_from_the_first_byte(qhome: QHome, pki: dict[str, Cert]) -> None:
    ip = "127.0.46.5"
    with TlsSmtpServer(server_context(pki["pfx"]), smtps=True, starttls=False, host=ip, port=465) as srv, \
            DnsServer({("pfx.example.test", "A"): [ip]}) as d:
        qhome.control("smtproutes", "example.com:pfx.example.test:465\n")
        tlshosts(qhome, "pfx.example.test", pki["ca"])
        out = remote(qhome, d.env)
    assert out.startswith(f"r\0K{ip} accepted message.".encode()), out
    assert note(out).endswith(b", verified (control/tlshosts/pfx.example.test.pem).")
    assert srv.sessions[0].commands[0] == b"EHLO test.example.com" and srv.sessions[0].tls
    assert srv.sessions[0].sni == "pfx.example.test"


def test_tlshosts_name_mismatch_defers(qhome: QHome, pki: dict[str, Cert]) -> None:
    """The CA matches but the certificate is for another name than the tlshosts file's."""
    with TlsSmtpServer(server_context(pki["mx"])) as srv, \
            DnsServer({("pfx.example.test", "A"): ["127.0.0.1"]}) as d:
        qhome.control("smtproutes", f"example.com:pfx.example.test:{srv.port}\n")
        tlshosts(qhome, "pfx.example.test", pki["ca"])
        out = remote(qhome, d.env)
    assert out == (b"ZTLS unable to verify server pfx.example.test: certificate contains no matching dNSNames;"
                   b" connected to 127.0.0.1.\n\0")


# --- Postfix ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def postfix(pki: dict[str, Cert]) -> Iterator[Postfix]:
    base = Path(tempfile.mkdtemp(prefix="pyqmail-postfix-", dir="/tmp"))
    base.chmod(0o755)
    pf = None
    try:
        pf = Postfix(base, pki["pfx"])
        yield pf
    finally:
        if pf is not None:
            pf.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def postfix_plain(pki: dict[str, Cert]) -> Iterator[Postfix]:
    base = Path(tempfile.mkdtemp(prefix="pyqmail-postfix-", dir="/tmp"))
    base.chmod(0o755)
    pf = None
    try:
        pf = Postfix(base, pki["pfx"], starttls=False)
        yield pf
    finally:
        if pf is not None:
            pf.stop()
        shutil.rmtree(base, ignore_errors=True)


def _pfx_dns() -> DnsServer:
    return DnsServer({("pfx.example.test", "A"): ["127.0.0.1"]})


def test_postfix_starttls_tlshosts_ca_matches(qhome: QHome, pki: dict[str, Cert], postfix: Postfix) -> None:
    with _pfx_dns() as d:
        qhome.control("smtproutes", f"example.com:pfx.example.test:{postfix.port}\n")
        tlshosts(qhome, "pfx.example.test", pki["ca"])
        out = remote(qhome, d.env, message=b"Subject: to postfix\n\nverified\n.dot\n")
    assert out.startswith(b"r\0K127.0.0.1 accepted message.\nRemote host said: 250 2.0.0 Ok: queued as "), out
    assert note(out).startswith(b"TLS: TLSv1.3 ") and \
        note(out).endswith(b", verified (control/tlshosts/pfx.example.test.pem).")
    queued_id = out.split(b"queued as ")[1].split(b"\n")[0].decode()
    log = postfix.logtext()
    assert "TLS connection established from" in log and queued_id in log, log
    assert any(b"verified\n.dot\n" in m and b"Subject: to postfix" in m for m in postfix.messages())


def test_postfix_opportunistic(qhome: QHome, postfix: Postfix) -> None:
    with DnsServer({}) as d:
        qhome.control("smtproutes", f"example.com:[127.0.0.1]:{postfix.port}\n")
        out = remote(qhome, d.env)
    assert out.startswith(b"r\0K127.0.0.1 accepted message.\nRemote host said: 250 2.0.0 Ok: queued as "), out
    assert note(out).endswith(b", not verified.")


def test_postfix_tlshosts_other_ca_defers(qhome: QHome, pki: dict[str, Cert], postfix: Postfix) -> None:
    with _pfx_dns() as d:
        qhome.control("smtproutes", f"example.com:pfx.example.test:{postfix.port}\n")
        tlshosts(qhome, "pfx.example.test", pki["other"])
        out = remote(qhome, d.env)
    assert out == (b"ZTLS unable to verify server with control/tlshosts/pfx.example.test.pem: "
                   b"unable to get local issuer certificate; connected to 127.0.0.1.\n\0")


def test_postfix_without_starttls_for_tlshosts_host_defers(qhome: QHome, pki: dict[str, Cert],
                                                            postfix_plain: Postfix) -> None:
    with _pfx_dns() as d:
        qhome.control("smtproutes", f"example.com:pfx.example.test:{postfix_plain.port}\n")
        tlshosts(qhome, "pfx.example.test", pki["ca"])
        out = remote(qhome, d.env)
    assert out == (b"ZNo TLS achieved while control/tlshosts/pfx.example.test.pem exists; "
                   b"connecting to 127.0.0.1.\n\0")
    assert "TLS connection established" not in postfix_plain.logtext()


# --- DANE ----------------------------------------------------------------------------------------

def _dane_dns(port: int, tlsa: list[str], secure: bool) -> AdDnsServer:
    base = f"_{port}._tcp.mx1.example.com"
    records = {("example.com", "MX"): ["10 mx1.example.com."], ("mx1.example.com", "A"): [MX]}
    if tlsa:
        records[(base, "TLSA")] = tlsa
    return AdDnsServer(records, secure={"example.com", "mx1.example.com", base} if secure else set())


def _dane(qhome: QHome, srv: TlsSmtpServer, tlsa: list[str], secure: bool = True) -> bytes:
    with _dane_dns(srv.port, tlsa, secure) as d:
        return remote(qhome, {**d.env, "PYQMAIL_SMTP_PORT": str(srv.port)})


def test_dane_ee_match_delivers(qhome: QHome, pki: dict[str, Cert]) -> None:
    with TlsSmtpServer(server_context(pki["mx"]), host=MX) as srv:
        out = _dane(qhome, srv, ["3 1 1 " + spki_sha256(pki["mx"])])
    assert out.startswith(f"r\0K{MX} accepted message.".encode()), out
    assert note(out).endswith(b", verified (DANE-EE).")
    assert srv.sessions[0].sni == "mx1.example.com"


def test_dane_ta_match_delivers(qhome: QHome, pki: dict[str, Cert]) -> None:
    ca_digest = hashlib.sha256(pki["ca"].der).hexdigest()
    with TlsSmtpServer(server_context(pki["mx"], [pki["ca"]]), host=MX) as srv:
        out = _dane(qhome, srv, ["2 0 1 " + ca_digest])
    assert out.startswith(f"r\0K{MX} accepted message.".encode()), out
    assert note(out).endswith(b", verified (DANE-TA).")


def test_dane_mismatch_defers(qhome: QHome, pki: dict[str, Cert]) -> None:
    with TlsSmtpServer(server_context(pki["mx"]), host=MX) as srv:
        out = _dane(qhome, srv, ["3 1 1 " + spki_sha256(pki["pfx"]), "2 0 1 " + "00" * 32])
    assert out == (b"ZTLS unable to verify server mx1.example.com with DANE: no TLSA record matches the "
                   b"certificate; connected to " + MX.encode() + b".\n\0")
    assert srv.sessions[0].data == b""


def test_dane_unauthenticated_records_are_ignored(qhome: QHome, pki: dict[str, Cert]) -> None:
    with TlsSmtpServer(server_context(pki["mx"]), host=MX) as srv:
        out = _dane(qhome, srv, ["3 1 1 " + spki_sha256(pki["pfx"])], secure=False)
    assert out.startswith(f"r\0K{MX} accepted message.".encode()) and note(out).endswith(b", not verified.")


def test_dane_host_without_starttls_gets_no_plain_text(qhome: QHome, pki: dict[str, Cert]) -> None:
    with TlsSmtpServer(None, starttls=False, host=MX) as srv:
        out = _dane(qhome, srv, ["3 1 1 " + spki_sha256(pki["mx"])])
    assert out == b"ZNo TLS achieved while TLSA records exist; connecting to " + MX.encode() + b".\n\0"


# --- MTA-STS -------------------------------------------------------------------------------------

POLICY = "version: STSv1\r\nmode: {mode}\r\nmx: *.example.com\r\nmax_age: 86400\r\n"


def _sts_dns(mx_name: str) -> DnsServer:
    return DnsServer({("example.com", "MX"): [f"10 {mx_name}."], (mx_name, "A"): [MX],
                      ("_mta-sts.example.com", "TXT"): ['"v=STSv1; id=20260101T000000"'],
                      ("mta-sts.example.com", "A"): ["127.0.0.1"]})


def _sts_env(d: DnsServer, pol: PolicyServer, pki: dict[str, Cert], smtp_port: int = 9) -> dict[str, str]:
    return {**d.env, "PYQMAIL_MTASTS_PORT": str(pol.port), "PYQMAIL_SMTP_PORT": str(smtp_port),
            "SSL_CERT_FILE": str(pki["ca"].cert)}


def test_mta_sts_enforce_refuses_mx_outside_policy(qhome: QHome, pki: dict[str, Cert]) -> None:
    with PolicyServer(server_context(pki["sts"]), POLICY.format(mode="enforce")) as pol, \
            _sts_dns("mx.elsewhere.net") as d, TlsSmtpServer(server_context(pki["mx"]), host=MX) as srv:
        out = remote(qhome, _sts_env(d, pol, pki, srv.port))
    assert out == sc.sts_no_mx(b"example.com") + b"\0"
    assert pol.requests == ["mta-sts.example.com /.well-known/mta-sts.txt"] and srv.sessions == []
    cache = qhome.queue / "mtasts" / "example.com"
    assert cache.stat().st_mode & 0o777 == 0o600
    # The policy server is gone: the cached policy (same TXT id, not expired) still refuses.
    with _sts_dns("mx.elsewhere.net") as d:
        out = remote(qhome, {**d.env, "PYQMAIL_MTASTS_PORT": "9", "SSL_CERT_FILE": str(pki["ca"].cert)})
    assert out == sc.sts_no_mx(b"example.com") + b"\0"


def test_mta_sts_enforce_delivers_to_listed_mx_with_valid_certificate(qhome: QHome, pki: dict[str, Cert]) -> None:
    with PolicyServer(server_context(pki["sts"]), POLICY.format(mode="enforce")) as pol, \
            _sts_dns("mx1.example.com") as d, TlsSmtpServer(server_context(pki["mx"]), host=MX) as srv:
        out = remote(qhome, _sts_env(d, pol, pki, srv.port))
    assert out.startswith(f"r\0K{MX} accepted message.".encode()), out
    assert note(out).endswith(b", verified (MTA-STS).")


def test_mta_sts_enforce_refuses_invalid_certificate(qhome: QHome, pki: dict[str, Cert]) -> None:
    with PolicyServer(server_context(pki["sts"]), POLICY.format(mode="enforce")) as pol, \
            _sts_dns("mx1.example.com") as d, TlsSmtpServer(server_context(pki["mx_other"]), host=MX) as srv:
        out = remote(qhome, _sts_env(d, pol, pki, srv.port))
    assert out == (b"ZTLS unable to verify server mx1.example.com with MTA-STS: unable to get local issuer "
                   b"certificate; connected to " + MX.encode() + b".\n\0")


def test_mta_sts_testing_only_notes(qhome: QHome, pki: dict[str, Cert]) -> None:
    with PolicyServer(server_context(pki["sts"]), POLICY.format(mode="testing")) as pol, \
            _sts_dns("mx1.example.com") as d, TlsSmtpServer(server_context(pki["mx_other"]), host=MX) as srv:
        out = remote(qhome, _sts_env(d, pol, pki, srv.port))
    assert out.startswith(f"r\0K{MX} accepted message.".encode()), out
    assert out.endswith(b", not verified.\nMTA-STS testing: certificate not valid for mx1.example.com: "
                        b"unable to get local issuer certificate.\n\0")
    with PolicyServer(server_context(pki["sts"]), POLICY.format(mode="testing")) as pol, \
            _sts_dns("mx.elsewhere.net") as d, TlsSmtpServer(server_context(pki["mx"]), host=MX) as srv:
        out = remote(qhome, _sts_env(d, pol, pki, srv.port))
    assert out.startswith(f"r\0K{MX} accepted message.".encode()), out
    assert out.endswith(b", not verified.\nMTA-STS testing: mx.elsewhere.net is not an MX host of the policy; "
                        b"certificate not valid for mx.elsewhere.net: hostname mismatch.\n\0")


# --- pure parts ----------------------------------------------------------------------------------

def test_dane_records_and_spki(pki: dict[str, Cert]) -> None:
    assert dane.parse("3 1 1 AB cd") == dane.Tlsa(3, 1, 1, b"\xab\xcd")
    assert dane.parse("3 1 x ab") is None and dane.parse("3 1 1 zz") is None
    assert not dane.Tlsa(1, 1, 1, b"").usable and not dane.Tlsa(3, 2, 1, b"").usable
    assert hashlib.sha256(dane.spki(pki["mx"].der)).hexdigest() == spki_sha256(pki["mx"])
    with pytest.raises(ValueError):
        dane.spki(b"\x30\x05junk")


def test_mta_sts_policy_parsing() -> None:
    assert mtasts.parse("version: STSv1\nmode: enforce\nmx: a.example.com\nmax_age: 99999999999\n") is None
    assert mtasts.parse("version: STSv1\nmode: enforce\nmx: a.example.com\nmax_age: 9999999999\n").max_age == \
        mtasts.MAX_AGE_LIMIT  # type: ignore[union-attr]
    p = mtasts.parse("version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 604800\n")
    assert p is not None and p.mode == "enforce" and p.max_age == 604800
    assert p.allows("MAIL.example.com.") and p.allows("a.example.net")
    assert not p.allows("a.b.example.net") and not p.allows("example.net") and not p.allows("mail.example.org")
    assert mtasts.parse("version: STSv1\nmode: enforce\nmax_age: 5\n") is None  # no mx
    assert mtasts.parse("version: STSv2\nmode: none\nmax_age: 5\n") is None
    assert mtasts.txt_id(["v=STSv1; id=abc123;"]) == "abc123"
    assert mtasts.txt_id(["v=STSv1; id=abc123", "v=STSv1; id=x"]) is None
    assert mtasts.txt_id(["v=spf1 -all"]) is None and mtasts.txt_id(["v=STSv1; id=bad-id"]) is None


# --- through qmail-send --------------------------------------------------------------------------

def test_qmail_send_log_line_says_tls(pki: dict[str, Cert]) -> None:
    from sendkit import Running, make_site, qqueue, remove_site

    site = make_site("test.example.com")
    try:
        with TlsSmtpServer(server_context(pki["pfx"])) as srv:
            site.home.control("smtproutes", f":pfx.example.test:{srv.port}\n")
            tlshosts(site.home, "pfx.example.test", pki["ca"])
            with DnsServer({("pfx.example.test", "A"): ["127.0.0.1"]}) as d:
                run_ = Running(site, env=site.env(**d.env))
                try:
                    run_.wait_for(b"status: local 0/10 remote 0/20")
                    qqueue(site.home, b"s@x.example", [b"ok@far.example"], b"Subject: far\n\nremote\n",
                           user=site.user)
                    lines = run_.wait_for(lambda ls: any(x.startswith(b"end msg ") for x in ls))
                finally:
                    assert run_.stop() == 0
    finally:
        remove_site(site)
    (done,) = [x.split(b": ", 1)[1] for x in lines if x.startswith(b"delivery ")]
    assert done.startswith(b"success: 127.0.0.1_accepted_message./Remote_host_said:_250_ok_queued/TLS:_TLSv1.3_")
    assert done.endswith(b",_verified_(control/tlshosts/pfx.example.test.pem)./")
    assert srv.sessions[0].tls == "TLSv1.3"


def test_root_home_has_private_mta_sts_cache(root_home: QHome) -> None:
    import pwd
    import stat

    st = (root_home.queue / "mtasts").stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and pwd.getpwuid(st.st_uid).pw_name == "qmailr"
