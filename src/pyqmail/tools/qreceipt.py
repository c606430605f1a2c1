"""qreceipt(1): send a success notice when youraddress is in Notice-Requested-Upon-Delivery-To.

``qreceipt youraddress``: if the message's Notice-Requested-Upon-Delivery-To
lists exactly youraddress and the envelope sender ($SENDER) is neither empty
nor #@[], a notice goes back to the sender (envelope sender empty). Exit 0
also when no notice is due; 100 for usage, an unparsable field or a
permanent qmail-queue failure; 111 for temporary trouble.
"""

from __future__ import annotations

from pyqmail import rfc822
from pyqmail.entry import program
from pyqmail.tools import common, headerbody
from pyqmail.tools.common import EXIT_OK, EXIT_PERM, EXIT_TEMP, Die

NOTICE_FIELD = b"notice-requested-upon-delivery-to"
MESSAGE_ID = b"message-id"


def notice(target: bytes, returnpath: bytes, messageid: bytes | None) -> bytes:
    """Return the text of the success notice."""
    quoted = rfc822.quote2(returnpath)
    text = (b"From: DELIVERY NOTICE SYSTEM <" + quoted + b">\n"
            b"To: <" + quoted + b">\n"
            b"Subject: success notice\n"
            b"\n"
            b"Hi! This is the qreceipt program. Your message was delivered to the\n"
            b"following address: " + target + b". Thanks for asking.\n")
    if messageid is not None:
        text += b"Your " + messageid
    return text


class Receipt:
    """The header pass of qreceipt."""

    def __init__(self, target: bytes, returnpath: bytes) -> None:
        self.target = target
        self.returnpath = returnpath
        self.flagreceipt = False
        self.messageid: bytes | None = None

    def _address(self, toks: list[rfc822.Token]) -> None:
        if rfc822.unquote(toks) == self.target:
            self.flagreceipt = True

    def field(self, h: bytes) -> None:
        if headerbody.hfield_is(h, MESSAGE_ID):
            self.messageid = h
        elif headerbody.hfield_is(h, NOTICE_FIELD):
            toks = rfc822.tokenize(h)
            if toks is None or rfc822.addrlist(toks, self._address) is None:
                # qmail prints the field as it is, its own newline ending the message.
                text = h[:-1] if h.endswith(b"\n") else h
                raise Die(EXIT_PERM, b"qreceipt: fatal: unable to parse this: " + text)

    def done(self) -> None:
        if not self.flagreceipt or self.returnpath in (b"", b"#@[]"):
            raise Die(EXIT_OK, None)
        from pyqmail.queue.qq import QQ

        q = QQ()
        q.write(notice(self.target, self.returnpath, self.messageid))
        report = q.close(b"", [self.returnpath])
        if report[:1] == b"D":
            raise Die(EXIT_PERM, b"qreceipt: fatal: permanent qmail-queue error")
        if report:
            raise Die(EXIT_TEMP, b"qreceipt: fatal: temporary qmail-queue error")


def qreceipt(argv: list[str]) -> Die:
    """Run qreceipt; return the Die that ends it."""
    usage = Die(EXIT_PERM, b"qreceipt: usage: qreceipt deliveryaddress")
    if len(argv) < 2:
        return usage
    returnpath = common.env("SENDER")
    if returnpath is None:
        return usage
    r = Receipt(common.b(argv[1]), returnpath)
    try:
        headerbody.headerbody(headerbody.lines_of_fd(0), r.field, r.done, lambda line: None)
    except OSError:
        return Die(EXIT_TEMP, b"qreceipt: fatal: read error")
    return Die(EXIT_OK, None)


@program("qreceipt", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Answer a delivery notice request for argv[1]."""
    return common.run_tool(qreceipt, argv)
