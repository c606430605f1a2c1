"""Bounce texts, free of I/O: what qmail-send appends to bounce/N and the notice it queues.

A bounce notice is: head(), then the contents of bounce/N, then middle(),
then the whole of mess/N. The daemon streams the two files; everything it
says around them is here, in qmail 1.03's words.
"""

from __future__ import annotations

from pyqmail.rfc822 import quote, quote2

DOUBLE_BOUNCE_SENDER = b"#@[]"

SINGLE_INTRO = (b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
                b"This is a permanent error; I've given up. Sorry it didn't work out.\n\n")
DOUBLE_INTRO = b"I tried to deliver a bounce message to this address, but the bounce bounced!\n\n"
UTF8_MIME = b"MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n"
SINGLE_BELOW = b"--- Below this line is a copy of the message.\n\n"
DOUBLE_BELOW = b"--- Below this line is the original bounce.\n\n"

def paragraph(recip: bytes, report: bytes) -> bytes:
    """Return what a permanent failure of recip appends to bounce/N.

    '<recip>:', the report (given a final newline if it lacks one), and a
    blank line; newlines in recip become '_', and a blank line inside the
    report becomes '/' so that paragraphs stay apart.
    """
    nul = report.find(b"\0")
    if nul != -1:
        report = report[:nul]
    text = bytearray(b"<" + recip.replace(b"\n", b"_").split(b"\0", 1)[0] + b">:\n" + report)
    if report and not report.endswith(b"\n"):
        text += b"\n"
    for pos in range(len(text) - 2, 0, -1):
        if text[pos] == 0x0A and text[pos - 1] == 0x0A:
            text[pos] = ord("/")
    text += b"\n"
    return bytes(text)


def vanilla_sender(sender: bytes) -> bytes:
    """Return the sender a bounce goes back to: a VERP sender 'owner-@host-@[]' becomes 'owner-@host'."""
    if sender.endswith(b"-@[]"):
        return sender[:-4]
    return sender


def is_triple(sender: bytes) -> bool:
    """Return True if a bounce of a message from sender must be discarded (it is a double bounce)."""
    return sender == DOUBLE_BOUNCE_SENDER


def envelope(sender: bytes, doublebounceto: bytes) -> tuple[bytes, bytes]:
    """Return (envelope sender, recipient) of the notice for a message from sender (after vanilla_sender).

    A single bounce goes from <> to the sender; a double bounce (the message
    was itself a bounce) goes from #@[] to doublebounceto@doublebouncehost.
    """
    if sender:
        return b"", sender
    return DOUBLE_BOUNCE_SENDER, doublebounceto


def head(date: bytes, bouncefrom: bytes, bouncehost: bytes, recip: bytes, double: bool,
         utf8: bool = False) -> bytes:
    """Return the notice up to the contents of bounce/N; date is date822 text ('1 Jan 2026 00:00:00 -0000').

    utf8: the notice goes with SMTPUTF8 (RFC 6531/6532): a UTF-8 local part stays
    unquoted in To:, and MIME headers say the text is UTF-8 (the addresses in it are).
    """
    return (b"Date: " + date + b"\n"
            + b"From: " + quote(bouncefrom) + b"@" + bouncehost + b"\n"
            + b"To: " + quote2(recip, utf8) + b"\n"
            + b"Subject: failure notice\n"
            + (UTF8_MIME if utf8 else b"") + b"\n"
            + b"Hi. This is the qmail-send program at " + bouncehost + b".\n"
            + (DOUBLE_INTRO if double else SINGLE_INTRO))


def middle(sender: bytes, double: bool, utf8: bool = False) -> bytes:
    """Return the notice between the contents of bounce/N and the copy of the message."""
    return (DOUBLE_BELOW if double else SINGLE_BELOW) + b"Return-Path: <" + quote2(sender, utf8) + b">\n"


def notice(date: bytes, bouncefrom: bytes, bouncehost: bytes, sender: bytes, doublebounceto: bytes,
           failures: bytes, message: bytes) -> tuple[bytes, bytes, bytes]:
    """Return (envelope sender, recipient, text) of the whole notice, for messages held in memory."""
    bsender, brecip = envelope(sender, doublebounceto)
    double = not sender
    text = head(date, bouncefrom, bouncehost, brecip, double) + failures + middle(sender, double) + message
    return bsender, brecip, text
