"""RFC 822 header text as qmail reads it (qmail's token822 and quote): tokens, address lists, output.

qmail does not parse RFC 822 strictly. It splits a field into tokens
(atoms, quoted strings, domain literals, comments and the specials
``, @ . < > ; :``), finds the addresses in the token list by reading it from
right to left, lets a callback see (and qmail-inject rewrite) each address,
and prints the tokens again with its own spacing, folding lines at commas.
This module reproduces those rules exactly, byte for byte, for qmail-inject,
qreceipt, dot-forward and qmail-local; it does no I/O.

A token is a pair (kind, text). Only words (ATOM, QUOTE, LITERAL, COMMENT)
carry text; the text of a QUOTE, LITERAL or COMMENT is its unescaped content,
without the delimiters.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable

    Token = tuple[int, bytes]
    Rewrite = Callable[[list[Token]], None]

ATOM = 1
QUOTE = 2
LITERAL = 3
COMMENT = 4
COMMA = 5
AT = 6
DOT = 7
LEFT = 8
RIGHT = 9
SEMI = 10
COLON = 11

WORDS = frozenset((ATOM, QUOTE, LITERAL, COMMENT))

_PUNCT_KIND = {ord("."): DOT, ord(","): COMMA, ord("@"): AT, ord("<"): LEFT, ord(">"): RIGHT,
               ord(":"): COLON, ord(";"): SEMI}
_PUNCT_TEXT = {DOT: b".", COMMA: b",", AT: b"@", LEFT: b"<", RIGHT: b">", COLON: b":", SEMI: b";"}
_BLANKS = frozenset(b" \t\r\n")
# Bytes that end an atom (an escaped one does not).
_ATOM_STOP = frozenset(b" \t\r\n([\"<>;:@,.")
# An atom holding one of these is printed as a quoted string instead.
_NOT_ATOMIC = frozenset(list(range(32)) + list(range(127, 256)) + list(b")]\\"))
# Bytes printed with a backslash inside any word.
_ESCAPED = b'"[]()\\\r\n'

_BACKSLASH = 0x5C

COMMA_TOKEN: Token = (COMMA, b"")


def punct(kind: int) -> Token:
    """Return the token for a special character kind (COMMA, AT, ...)."""
    return (kind, b"")


def _delimited(data: bytes, i: int, close: int, nests: int) -> tuple[bytes, int] | None:
    """Read a comment, quoted string or literal whose body starts at i.

    Return (content, index after the closing byte), or None if the input ends
    first. For comments (nests != -1) inner parentheses count levels and are
    dropped from the content, as qmail does.
    """
    n = len(data)
    out = bytearray()
    level = 1
    while True:
        if i >= n:
            return None
        c = data[i]
        if c == nests:
            level += 1
        elif c == close:
            level -= 1
            if level == 0:
                return bytes(out), i + 1
        elif c == _BACKSLASH:
            i += 1
            if i >= n:
                return None
            out.append(data[i])
        else:
            out.append(c)
        i += 1


def tokenize(data: bytes, utf8: bool = False) -> list[Token] | None:
    """Split header text into tokens; None if it cannot be parsed.

    Parsing fails on an unterminated comment, quoted string or literal, on a
    backslash at the end inside one of them, and on a word starting with
    ')' or ']'.
    """
    toks: list[Token] = []
    append = toks.append
    i = 0
    n = len(data)
    while i < n:
        c = data[i]
        kind = _PUNCT_KIND.get(c)
        if kind is not None:
            append((kind, b""))
            i += 1
            continue
        if c in _BLANKS:
            i += 1
            continue
        if c == 0x29 or c == 0x5D:  # ')' ']'
            return None
        if c == 0x28:  # '('
            got = _delimited(data, i + 1, 0x29, 0x28)
            kind = COMMENT
        elif c == 0x22:  # '"'
            got = _delimited(data, i + 1, 0x22, -1)
            kind = QUOTE
        elif c == 0x5B:  # '['
            got = _delimited(data, i + 1, 0x5D, -1)
            kind = LITERAL
        else:
            word = bytearray()
            while True:
                if data[i] == _BACKSLASH:
                    i += 1
                    if i >= n:
                        break  # a trailing backslash is dropped
                word.append(data[i])
                i += 1
                if i >= n or data[i] in _ATOM_STOP:
                    break
            text = bytes(word)
            append((QUOTE if any(b in _NOT_ATOMIC for b in text) and not (utf8 and utf8_word(text)) else ATOM,
                    text))
            continue
        if got is None:
            return None
        append((kind, got[0]))
        i = got[1]
    return toks


def addrlist(toks: list[Token], rewrite: Rewrite, start: int = 2) -> list[Token] | None:
    """Find the addresses of a field's token list and rewrite each one.

    toks[:start] (a field's name and its colon) are kept as they are. The
    rest is read from right to left, as qmail does: an address is the run of
    tokens between separators, or everything inside <...>; two words side by
    side ("djb fred") are two addresses and get a comma between them;
    comments outside <...> are kept in place but leave the address; groups
    ("name: a, b;") keep their name. rewrite is called with each address
    (in forward order, possibly empty for <>) from the rightmost to the
    leftmost and may change the list in place. Return the new token list, or
    None if the list is malformed (unbalanced group, '>' without '<').
    """
    out: list[Token] = []  # built from the right, reversed at the end
    pending: list[Token] = []  # the address being collected, reversed
    ingroup = False
    wordok = True
    j = len(toks) - 1

    def flush(comma: bool) -> None:
        if pending:
            addr = pending[::-1]
            pending.clear()
            rewrite(addr)
            out.extend(reversed(addr))
            if comma:
                out.append(COMMA_TOKEN)

    while j >= start:
        kind = toks[j][0]
        if kind == SEMI:
            flush(True)
            if ingroup:
                return None
            ingroup = True
            wordok = True
        elif kind == COLON:
            flush(False)
            if not ingroup:
                return None
            ingroup = False
            # The group's name runs left to the previous comma, which is kept too.
            while j >= start and toks[j][0] != COMMA:
                out.append(toks[j])
                j -= 1
            if j >= start:
                out.append(toks[j])
                j -= 1
            wordok = True
            continue
        elif kind == RIGHT:
            flush(True)
            out.append(toks[j])
            j -= 1
            while j >= start and toks[j][0] != LEFT:
                pending.append(toks[j])
                j -= 1
            # <> is an address too: the rewrite sees it even though it is empty.
            addr = pending[::-1]
            pending.clear()
            rewrite(addr)
            out.extend(reversed(addr))
            if j < start:
                return None
            out.append(toks[j])
            j -= 1
            while j >= start and toks[j][0] in PHRASE:
                out.append(toks[j])
                j -= 1
            wordok = False
            continue
        elif kind == ATOM or kind == QUOTE or kind == LITERAL:
            if not wordok:
                flush(True)
            wordok = False
            pending.append(toks[j])
            j -= 1
            continue
        elif kind == COMMENT:
            pass  # lexically a space: leaves wordok alone
        elif kind == COMMA:
            flush(False)
            wordok = True
        else:
            wordok = True
            pending.append(toks[j])
            j -= 1
            continue
        out.append(toks[j])
        j -= 1
    flush(False)
    out.reverse()
    return toks[:start] + out


# What may stand before '<' as a name ("Joe Q. Public <...>").
PHRASE = frozenset((COMMENT, ATOM, QUOTE, AT, DOT))


def _needspace(last: int, new: int) -> bool:
    if not last:
        return False
    if last == COLON or last == COMMA:
        return True
    if new == LEFT:
        return True
    return last in WORDS and new in WORDS


def _escape(text: bytes) -> bytes:
    for ch in _ESCAPED:
        if ch in text:
            break
    else:
        return text
    out = bytearray()
    for b in text:
        if b in _ESCAPED:
            out.append(_BACKSLASH)
        out.append(b)
    return bytes(out)


_OPEN = {QUOTE: b'"', LITERAL: b"[", COMMENT: b"("}
_CLOSE = {QUOTE: b'"', LITERAL: b"]", COMMENT: b")"}


def unparse(toks: list[Token], linelen: int = 80) -> bytes:
    """Print tokens as qmail does, ending with a newline.

    Words are separated by one space, and a space follows every colon and
    comma. After each comma a line break is put in, and taken out again when
    the line up to the next comma still fits in linelen bytes (0: no limit);
    continuation lines start with two spaces.
    """
    buf = bytearray()
    lineb = 0  # where the current line starts
    linee = -1  # where the last tentative "\n " sits, if any

    def newline_space() -> None:
        nonlocal lineb, linee
        s = len(buf)
        if linee >= 0 and (not linelen or s - lineb <= linelen):
            del buf[linee:linee + 2]  # the previous break was not needed
            buf.extend(b"\n ")
            linee = len(buf) - 2
        else:
            if linee >= 0:
                lineb = linee + 1
            linee = s
            buf.extend(b"\n ")

    last = 0
    for kind, text in toks:
        if _needspace(last, kind):
            buf.append(0x20)
        last = kind
        if kind == COMMA:
            buf.append(0x2C)
            newline_space()
        elif kind in WORDS:
            if kind == ATOM:
                buf += _escape(text)
            else:
                buf += _OPEN[kind]
                buf += _escape(text)
                buf += _CLOSE[kind]
        else:
            buf += _PUNCT_TEXT[kind]
    newline_space()
    del buf[-1]
    return bytes(buf)


def unquote(toks: list[Token]) -> bytes:
    """Return the address tokens as an envelope address: no quoting, no comments."""
    out = bytearray()
    for kind, text in toks:
        if kind == ATOM or kind == QUOTE:
            out += text
        elif kind == LITERAL:
            out += b"[" + text + b"]"
        elif kind != COMMENT:
            out += _PUNCT_TEXT[kind]
    return bytes(out)


# --- quoting a local part (qmail's quote.c rules) ----------------------------

# Bytes that may appear unquoted in a local part.
_BOX_OK = frozenset(set(range(33, 127)) - set(b'"(),:;<>@[\\]'))


def utf8_word(text: bytes) -> bool:
    """Whether an atom with bytes past 126 is one RFC 6532 allows: UTF-8 and no control or special byte."""
    if any(b < 32 or b == 127 or b in b")]\\" for b in text):
        return False
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def quote_need(box: bytes, utf8: bool = False) -> bool:
    """Return True if box must be quoted to be used as a local part (utf8: non-ASCII bytes are atext, RFC 6531)."""
    if not box:
        return True
    for b in box:
        if b not in _BOX_OK and not (utf8 and b >= 128):
            return True
    return box[:1] == b"." or box[-1:] == b"." or b".." in box


def quote(box: bytes, utf8: bool = False) -> bytes:
    """Return box quoted as a local part if it needs to be, else unchanged."""
    if not quote_need(box, utf8):
        return box
    out = bytearray(b'"')
    for b in box:
        if b in b'\r\n"\\':
            out.append(_BACKSLASH)
        out.append(b)
    out.append(0x22)
    return bytes(out)


def quote2(addr: bytes, utf8: bool = False) -> bytes:
    """Return addr with its local part (before the last '@') quoted if needed."""
    if not addr:
        return addr
    j = addr.rfind(b"@")
    if j < 0:
        return quote(addr, utf8)
    return quote(addr[:j], utf8) + addr[j:]
