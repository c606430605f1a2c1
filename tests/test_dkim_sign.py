"""pyqmail.filter.dkimsign against dkimpy: the same DKIM-Signature, byte for byte.

qmail-dkim signs with its own relaxed/relaxed canonicalization, hashlib,
OpenSSL's RSA and PyNaCl's Ed25519 (pyqmail.filter.dkimsign) and falls back
to dkimpy for what that declines. Both signature algorithms are
deterministic, so for the same t= the two must print the same bytes: this
compares them over generated messages (LF and CRLF line ends, folded and
repeated fields, tabs, runs of spaces, bare CRs, trailing blank lines and
whitespace, no body, long domains and selectors that move the folds), and
checks that a header dkimsign declines is one dkimpy refuses too. The signed
output verifies with OpenDKIM and Mail::DKIM in test_dkim_opendkim.py and
test_dkim.py (qmail-dkim signs through this path).
"""

from __future__ import annotations

import base64
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyqmail.filter import dkim as qdkim
from pyqmail.filter import dkimsign

NOW = 1735689600
NAMES = [b"From", b"from", b"FROM", b"To", b"Subject", b"Date", b"Message-ID", b"Cc", b"MIME-Version",
         b"Content-Type", b"List-Unsubscribe", b"List-Unsubscribe-Post", b"Received", b"X-Mailer",
         b"Reply-To", b"References", b"DKIM-Signature"]
PIECES = [b"a", b"word", b"alice@example.com", b" ", b"\t", b"   ", b" \t ", b"x" * 80, b";", b":", b"=",
          b"\xc3\xa9", b"\r", b"<id@host>"]
BODY_PIECES = [b"text", b" ", b"\t", b"  \t", b"", b"\r", b"x" * 100, b"caf\xc3\xa9"]
DOMAINS = ["example.com", "mail." + "a" * 40 + ".example", "x" * 63 + ".example.org"]
SELECTORS = ["default", "default-ed25519", "s" * 50]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[bytes, bytes]:
    """An RSA-2048 PEM key made by openssl, and an Ed25519 seed (dkimpy's base64 form)."""
    path: Path = tmp_path_factory.mktemp("keys") / "rsa"
    subprocess.run(["openssl", "genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:2048",
                    "-out", str(path)], check=True, capture_output=True)
    return {b"rsa-sha256": path.read_bytes(), b"ed25519-sha256": base64.b64encode(bytes(range(32)))}


@st.composite
def messages(draw: st.DrawFn, bad: bool = False) -> bytes:
    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    text = st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join)
    fields = []
    for name in [b"From"] + draw(st.lists(st.sampled_from(NAMES), max_size=10)):
        value = draw(text)
        for _ in range(draw(st.integers(0, 2))):
            value += eol + draw(st.sampled_from([b" ", b"\t", b"  "])) + draw(text)
        fields.append(name + draw(st.sampled_from([b": ", b":", b":\t"])) + value + eol)
    fields = draw(st.permutations(fields))
    if bad:
        fields.insert(draw(st.integers(0, len(fields))),
                      draw(st.sampled_from([b"no colon here", b"Bad Name: x", b" continued first",
                                            b"\r", b"From alice Thu Jan  1 00:00:00 2025"])) + eol)
    head = b"".join(fields)
    if not draw(st.booleans()):
        return head
    lines = draw(st.lists(st.lists(st.sampled_from(BODY_PIECES), max_size=8).map(b"".join), max_size=20))
    return head + eol + eol.join(lines) + draw(st.sampled_from([b"", eol, eol * 3, b" " + eol + eol]))


def both(message: bytes, key: qdkim.Key, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, bytes | None]:
    """Return (qmail-dkim's signature of message by key, dkimpy's), both made at NOW."""
    monkeypatch.setattr(time, "time", lambda: float(NOW))
    fields, _ = qdkim.split_header(message)
    include = qdkim.sign_headers([name for name, _raw in fields])
    ours = qdkim.sign_message(message, [key], fields)
    return ours, qdkim._sign_dkimpy(message, key, include)


SETTINGS = settings(max_examples=150, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("algorithm", [b"rsa-sha256", b"ed25519-sha256"])
@SETTINGS
@given(message=messages(), domain=st.sampled_from(DOMAINS), selector=st.sampled_from(SELECTORS))
def test_same_bytes_as_dkimpy(keys: dict[bytes, bytes], monkeypatch: pytest.MonkeyPatch, algorithm: bytes,
                              message: bytes, domain: str, selector: str) -> None:
    key = qdkim.Key(domain, selector, keys[algorithm])
    assert key.algorithm == algorithm
    assert dkimsign.parse(message) is not None
    ours, theirs = both(message, key, monkeypatch)
    assert theirs is not None and ours == theirs


@SETTINGS
@given(message=messages(bad=True))
def test_a_header_dkimsign_declines_is_one_dkimpy_refuses(keys: dict[bytes, bytes], monkeypatch: pytest.MonkeyPatch,
                                                          message: bytes) -> None:
    key = qdkim.Key("example.com", "default", keys[b"ed25519-sha256"])
    fields, _ = qdkim.split_header(message)
    if b"from" not in {name for name, _raw in fields}:
        return  # qmail-dkim signs only a message with a From field (filter_message)
    if dkimsign.parse(message) is not None:
        ours, theirs = both(message, key, monkeypatch)  # an mbox From line ends the header for both
        assert ours == theirs
        return
    try:
        import dkim

        dkim.DKIM(message)
    except (dkim.DKIMException, IndexError):
        pass  # dkimpy refuses it too; qmail-dkim then passes it on unsigned (test_dkim.py)
    else:
        # dkimpy reads it: qmail-dkim's fallback signs with dkimpy, and that is what comes out.
        ours, theirs = both(message, key, monkeypatch)
        assert ours == (theirs or b"")


def test_fold_and_canonical_forms() -> None:
    assert dkimsign.relaxed_value(b" a \t b\r\n\tc  \r\n") == b"a b c"
    assert dkimsign.relaxed_body(b"") == b""
    assert dkimsign.relaxed_body(b"\n\n") == b""
    assert dkimsign.relaxed_body(b"a \t b \t\nc\n\n\n") == b"a b\r\nc\r\n"
    assert dkimsign.relaxed_body(b"abc\r\r\n") == b"abc\r\r\n"
    assert dkimsign.relaxed_body(b"no newline") == b"no newline\r\n"
    assert dkimsign.fold(b"x" * 58, 14, b"\n") == b"x" * 58
    assert dkimsign.fold(b"a " * 40, 14, b"\n") == (b"a " * 29).rstrip() + b"\n " + (b"a " * 11)
    assert dkimsign.fold(b"y" * 100, 14, b"\n") == b"y" * 58 + b"\n " + b"y" * 42


def test_key_openssl_cannot_load_falls_back_to_dkimpy(monkeypatch: pytest.MonkeyPatch) -> None:
    key = qdkim.Key("example.com", "default", b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    message = b"From: a@example.com\n\nbody\n"
    fields, _ = qdkim.split_header(message)
    with pytest.raises(qdkim.Fatal) as e:
        qdkim.sign_message(message, [key], fields)
    assert e.value.code == qdkim.EXIT_CONFIG


FROM_PIECES = [b"Alice", b" ", b"  ", b"\t", b"<", b">", b"alice", b"@", b"example.com", b"Example.COM.", b".", b"J.",
               b"x", b"-", b"+tag", b"=?utf-8?q?A?=", b"\xc3\xa9", b"'", b"!", b"%"]


@settings(max_examples=500, derandomize=True, deadline=None)
@given(st.one_of(
    st.lists(st.sampled_from(FROM_PIECES), min_size=1, max_size=12).map(b"".join),
    st.tuples(st.lists(st.sampled_from(FROM_PIECES), max_size=4).map(b"".join), st.sampled_from([b"", b" ", b"\t"]),
              st.sampled_from([b"alice", b"a.b", b"x+y", b"J."]), st.sampled_from([b"example.com", b"Example.COM.",
                                                                                  b"b", b"."]),
              st.booleans()).map(lambda t: t[0] + t[1] + (b"<%s@%s>" if t[4] else b"%s@%s") % (t[2], t[3]))))
def test_from_domain_without_email_utils_agrees_with_getaddresses(value: bytes) -> None:
    from email.utils import getaddresses

    if qdkim._simple_address(value) is None:
        return
    expected = None
    for _display, addr in getaddresses([value.decode("utf-8", "replace")]):
        if "@" in addr:
            expected = addr.rpartition("@")[2].strip().lower().rstrip(".") or None
            break
    assert qdkim.from_domain([(b"from", b"From: " + value + b"\n")]) == expected


def test_from_domain_simple_and_not() -> None:
    assert qdkim._simple_address(b"Alice <alice@Example.COM.>") == b"alice@Example.COM."
    assert qdkim.from_domain([(b"from", b"From: Alice <alice@Example.COM.>\n")]) == "example.com"
    assert qdkim._simple_address(b'"Bob, Jr" <bob@example.org>') is None  # getaddresses reads that
    assert qdkim.from_domain([(b"from", b'From: "Bob, Jr" <bob@example.org>\n')]) == "example.org"
    assert qdkim.from_domain([(b"from", b"From: undisclosed\n")]) is None


@pytest.mark.parametrize("env, verifies", [({"RELAYCLIENT": ""}, False), ({"DKIMSIGN": "/nonexistent/%"}, False),
                                           ({}, True), ({"RELAYCLIENT": "", "DKIMVERIFY": ""}, True)])
def test_preload_of_a_server_that_only_signs_leaves_the_verifier_out(tmp_path: Path, env: dict[str, str],
                                                                     verifies: bool) -> None:
    import os
    import sys

    code = ("import sys; from pyqmail.filter import dkim; dkim.preload(); "
            "print(sorted(m for m in ('dkim', 'dns.resolver', 'spf') if m in sys.modules)); "
            "print('dkimsign' in str(sorted(sys.modules)), 'nacl.signing' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                         env={"PATH": os.environ["PATH"], "QMAILHOME": str(tmp_path), **env})
    lines = res.stdout.decode().splitlines()
    assert lines[0] == ("['dkim', 'dns.resolver', 'spf']" if verifies else "[]"), res
    assert lines[1] == "True True", res
