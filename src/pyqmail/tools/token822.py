"""RFC 822 header tokens as qmail reads them (token822), for qreceipt and dot-forward.

`parse` splits a header line into atoms, quoted strings, domain literals,
comments and specials exactly as qmail does (an atom holding a control
character, ')' ']' or a backslash becomes a quoted string); `addresses`
walks an address list right to left as qmail does, calling back once per
address with its tokens in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ATOM = "atom"
QUOTE = "quote"
LITERAL = "literal"
COMMENT = "comment"
LEFT = "<"
RIGHT = ">"
AT = "@"
COMMA = ","
SEMI = ";"
COLON = ":"
DOT = "."

_SPECIALS = {ord("."): DOT, ord(","): COMMA, ord("@"): AT, ord("<"): LEFT, ord(">"): RIGHT,
             ord(":"): COLON, ord(";"): SEMI}
_SPACE = b" \t\r\n"
_NOT_ATOM = frozenset(b" \t\r\n([\"<>;:@,.")


class ParseError(Exception):
    """The line is not made of RFC 822 tokens (unbalanced quote, comment or bracket)."""


@dataclass(frozen=True, slots=True)
class Token:
    """One token: its type and, for words and comments, its unquoted text."""

    type: str
    text: bytes = b""


def parse(line: bytes) -> list[Token]:
    """Return the tokens of line; raise ParseError if it has a stray ')' or ']' or an unclosed group."""
    toks: list[Token] = []
    i = 0
    n = len(line)
    while i < n:
        c = line[i]
        if c in _SPECIALS:
            toks.append(Token(_SPECIALS[c]))
            i += 1
        elif c in _SPACE:
            i += 1
        elif c in b")]":
            raise ParseError("unbalanced close")
        elif c in b'("[':
            close = {ord("("): ord(")"), ord('"'): ord('"'), ord("["): ord("]")}[c]
            nests = c == ord("(")
            level = 1
            text = bytearray()
            while level:
                i += 1
                if i >= n:
                    raise ParseError("unclosed group")
                ch = line[i]
                # Nested parentheses count but, as in qmail, are not kept.
                if nests and ch == ord("("):
                    level += 1
                elif ch == close:
                    level -= 1
                elif ch == ord("\\"):
                    i += 1
                    if i >= n:
                        raise ParseError("backslash at end")
                    text.append(line[i])
                else:
                    text.append(ch)
            toks.append(Token({ord("("): COMMENT, ord('"'): QUOTE, ord("["): LITERAL}[c], bytes(text)))
            i += 1
        else:
            text = bytearray()
            while True:
                if line[i] == ord("\\"):
                    i += 1
                    if i >= n:
                        break
                text.append(line[i])
                i += 1
                if i >= n or line[i] in _NOT_ATOM:
                    break
            kind = ATOM
            if any(ch < 32 or ch > 126 or ch in b")]\\" for ch in text):
                kind = QUOTE
            toks.append(Token(kind, bytes(text)))
    return toks


def unquote(toks: list[Token]) -> bytes:
    """Return the address the tokens spell, quotes removed and comments dropped (token822_unquote)."""
    out = bytearray()
    for t in toks:
        if t.type in (ATOM, QUOTE):
            out += t.text
        elif t.type == LITERAL:
            out += b"[" + t.text + b"]"
        elif t.type != COMMENT:
            out += t.type.encode()
    return bytes(out)


def addresses(toks: list[Token], callback: Callable[[list[Token]], None], start: int = 0) -> None:
    """Call callback with each address of the list toks[start:], right to left (token822_addrlist).

    Group syntax is checked as qmail does; raise ParseError where qmail's
    parser gives up.
    """
    addr: list[Token] = []  # collected right to left

    def flush() -> None:
        if addr:
            callback(list(reversed(addr)))
            addr.clear()

    ingroup = False
    wordok = True
    t = len(toks) - 1
    while t >= start:
        tok = toks[t]
        kind = tok.type
        if kind == SEMI:
            flush()
            if ingroup:
                raise ParseError("nested group")
            ingroup = True
            wordok = True
            t -= 1
        elif kind == COLON:
            flush()
            if not ingroup:
                raise ParseError("colon outside a group")
            ingroup = False
            while t >= start and toks[t].type != COMMA:
                t -= 1
            if t >= start:
                t -= 1
            wordok = True
        elif kind == RIGHT:
            flush()
            t -= 1
            while t >= start and toks[t].type != LEFT:
                addr.append(toks[t])
                t -= 1
            # The address inside <> counts even when it is empty: <>.
            callback(list(reversed(addr)))
            addr.clear()
            if t < start:
                raise ParseError("unbalanced <")
            t -= 1
            while t >= start and toks[t].type in (COMMENT, ATOM, QUOTE, AT, DOT):
                t -= 1
            wordok = False
        elif kind in (ATOM, QUOTE, LITERAL):
            if not wordok:
                flush()
            wordok = False
            addr.append(tok)
            t -= 1
        elif kind == COMMENT:
            t -= 1
        elif kind == COMMA:
            flush()
            wordok = True
            t -= 1
        else:
            wordok = True
            addr.append(tok)
            t -= 1
    flush()
