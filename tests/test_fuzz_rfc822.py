"""Fuzzing the RFC 822 header code: qmail's tokenizer, address lists, printing, quoting, qmail-inject's header.

Properties: tokenize, addrlist and unparse raise nothing (a malformed text is
None); what unparse prints tokenizes back to the same tokens; a quoted local
part reads back as itself; qmail-inject's Header raises only ParseError and
InvalidField, its documented errors, and its output is a header: lines ending
in LF, every field kept or dropped as qmail-header(5) says.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import bounded, tracing  # noqa: F401  (tracing: an autouse fixture)
from pyqmail import rfc822
from pyqmail.inject import header as hdr

SPECIAL_TEXT = st.sampled_from([b"(", b")", b"[", b"]", b'"', b"\\", b"<", b">", b",", b";", b":", b"@", b".",
                                b" ", b"\t", b"\n", b"\r", b"\0", b"a", b"bc", b"\xe9", b"x" * 50])
HEADER_TEXT = st.one_of(st.binary(max_size=300), st.lists(SPECIAL_TEXT, max_size=40).map(b"".join))
ATEXT = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
# What tokenize itself makes: atoms of atext, anything in quotes, literals and comments.
TOKEN = st.one_of(
    st.binary(min_size=1, max_size=12).map(lambda b: bytes(ATEXT[c % len(ATEXT)] for c in b))
    .map(lambda t: (rfc822.ATOM, t)),
    st.binary(max_size=12).map(lambda t: (rfc822.QUOTE, t)),
    st.binary(max_size=12).map(lambda t: (rfc822.LITERAL, t)),
    st.binary(max_size=12).map(lambda t: (rfc822.COMMENT, t.replace(b"(", b"").replace(b")", b""))),
    st.sampled_from([rfc822.COMMA, rfc822.AT, rfc822.DOT, rfc822.LEFT, rfc822.RIGHT, rfc822.SEMI, rfc822.COLON])
    .map(rfc822.punct),
)


@given(HEADER_TEXT)
@bounded
def test_tokenize_addrlist_unparse_any_text(text: bytes) -> None:
    toks = rfc822.tokenize(text)
    if toks is None:
        return
    seen: list[list[rfc822.Token]] = []
    new = rfc822.addrlist(toks, seen.append, start=0)
    if new is None:
        return
    printed = rfc822.unparse(new)
    assert printed.endswith(b"\n")
    assert rfc822.tokenize(printed) is not None
    for addr in seen:
        rfc822.unquote(addr)


@given(st.lists(TOKEN, max_size=30), st.sampled_from([0, 1, 20, 80]))
@bounded
def test_unparse_tokenizes_back(toks: list[rfc822.Token], linelen: int) -> None:
    printed = rfc822.unparse(toks, linelen)
    assert rfc822.tokenize(printed) == toks


@given(st.binary(max_size=200))
@bounded
def test_quote_reads_back(box: bytes) -> None:
    toks = rfc822.tokenize(rfc822.quote(box))
    assert toks is not None
    assert rfc822.unquote(toks) == box


FIELD_NAME = st.sampled_from([b"To", b"cc", b"BCC", b"From", b"Sender", b"Reply-To", b"Return-Path",
                              b"Resent-To", b"Resent-Cc", b"Resent-Bcc", b"Resent-From", b"Apparently-To",
                              b"Errors-To", b"Return-Receipt-To", b"Subject", b"Date", b"Message-ID",
                              b"Content-Length", b"Mail-Followup-To", b"X-Any", b"", b"bad name", b"\x01"])
FIELD = st.tuples(FIELD_NAME, st.sampled_from([b":", b" :", b""]), HEADER_TEXT,
                  st.sampled_from([b"\n", b"\n cont\n", b""])).map(b"".join)


def _header(mft: bool) -> hdr.Header:
    rw = hdr.Rewriter(hdr.parse_fixed(b"@defaulthost.example"), hdr.parse_fixed(b".defaultdomain"),
                      hdr.parse_fixed(b".plusdomain"))
    s = hdr.Settings()
    s.mailhost = b"host.example"
    s.fullname = b"Some (One) \"Name\""
    s.mft = frozenset({b"list@defaulthost.example"}) if mft else None
    return hdr.Header(rw, s)


@given(st.lists(FIELD, max_size=12), st.booleans(), st.booleans())
@bounded
def test_inject_header_any_fields(fields: list[bytes], mft: bool, show_return_path: bool) -> None:
    h = _header(mft)
    kept = 0
    for f in fields:
        try:
            h.field(f)
        except (hdr.ParseError, hdr.InvalidField):
            continue
        if hdr.field_type(f) not in hdr.DROPPED:
            kept += 1
    assert len(h.saved) == kept
    out = h.finish(show_return_path)
    assert h.sender is not None
    for r in h.recipients():
        assert isinstance(r, bytes)
    # The fields qmail-inject adds come first, each ending with its newline; then the kept fields.
    rest = b"".join(h.saved)
    assert out.endswith(rest)
    added = out[:len(out) - len(rest)]
    assert added.endswith(b"\n")
