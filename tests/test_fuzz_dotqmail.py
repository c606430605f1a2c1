"""Fuzzing dot-qmail(5): the lines of a .qmail file, and the .qmail names an address leads to.

Properties: parse never raises and gives one instruction per line, of the
kind the line's first byte says, with its target cut at a NUL; candidates
never names a file outside the .qmail<dash> family (no '.' after the dash
part, whatever the extension) and sets DEFAULT to what the 'default' stood for.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fuzzkit import bounded, tracing  # noqa: F401  (tracing: an autouse fixture)
from pyqmail.local import dotqmail

PIECE = st.sampled_from([b"\n", b"#", b".", b"/", b"|", b"+", b"&", b"list", b" ", b"\t", b"\0", b"a",
                         b"./Maildir/", b"user@example.com", b"\xff", b"-"])
TEXT = st.one_of(st.binary(max_size=400), st.lists(PIECE, max_size=60).map(b"".join))


def _kind(line: bytes) -> str:
    first = line[:1]
    if first in (b"", b"\0"):
        return dotqmail.BLANK
    if first == b"#":
        return dotqmail.COMMENT
    if first in (b".", b"/"):
        return dotqmail.MAILDIR if line.endswith(b"/") else dotqmail.MBOX
    if first == b"|":
        return dotqmail.PROGRAM
    if first == b"+":
        return dotqmail.LIST if line[1:].split(b"\0")[0] == b"list" else dotqmail.IGNORED
    return dotqmail.FORWARD


@given(TEXT)
@bounded
def test_parse_any_file(text: bytes) -> None:
    got = dotqmail.parse(text)
    lines = (text if text.endswith(b"\n") else text + b"\n")[:-1].split(b"\n")
    assert len(got) == len(lines)
    for ins, raw in zip(got, lines):
        line = raw.rstrip(b" \t")
        assert ins.kind == _kind(line)
        assert b"\0" not in ins.target and b"\n" not in ins.target
        assert ins.shown.startswith(ins.target) or ins.kind in (dotqmail.BLANK, dotqmail.COMMENT)
        assert line.endswith(ins.shown)


EXT = st.one_of(st.binary(max_size=60),
                st.lists(st.sampled_from([b"-", b".", b"..", b"/", b"default", b"DEFAULT", b"A", b"x"]),
                         max_size=12).map(b"".join))


@given(st.sampled_from([b"", b"-", b"-user-"]), EXT)
@bounded
def test_candidates_stay_in_the_family(dash: bytes, ext: bytes) -> None:
    got = dotqmail.candidates(dash, ext)
    base = dotqmail.QMAIL + dash
    safe = dotqmail.safe_ext(ext)
    assert len(safe) == len(ext)
    assert got[0].name == base + safe
    assert len(got) == 2 + safe.count(b"-")
    for c in got:
        assert c.name.startswith(base)
        assert b"." not in c.name[len(base):]
        assert c.name.lower() == c.name or dash.lower() != dash
    for c in got[1:]:
        prefix = c.name[len(base):-len(dotqmail.DEFAULT)]
        assert c.name.endswith(dotqmail.DEFAULT)
        assert safe.startswith(prefix) and (prefix == b"" or prefix.endswith(b"-"))
        assert c.default == ext[len(prefix):]
    for owner in dotqmail.owner_names(dash, ext):
        assert owner.startswith(base) and b"." not in owner[len(base):]
    dotqmail.ext_parts(ext)
    dotqmail.host_parts(ext)
