"""qmail-spamc: ask SpamAssassin's spamd about a message; mark it with X-Spam fields or refuse it.

qmail-spamc is a filter for control/smtpfilters or qmail-qfilter: it reads
the message on descriptor 0 and sends it to spamd with spamc's SPAMC/1.5
HEADERS request. The X-Spam-* fields of spamd's answer are written on
descriptor 1 above the message, which is otherwise passed on byte for byte.
When spamd's score is at or over control/spamthreshold (a decimal number;
missing: never refuse, only mark), qmail-spamc writes `DThis message looks
like spam (score S, threshold T) (#5.7.1)` on descriptor 6 and exits 82, and
qmail-smtpd answers 554 (exit 31 when descriptor 6 is closed).

spamd is control/spamd or $SPAMD: HOST:PORT, or the absolute path of a unix
socket (default 127.0.0.1:783). $SPAMUSER is sent as spamc's -u. A message
longer than control/spammaxsize bytes (default 512000) passes unscanned.

When spamd cannot be reached, takes longer than control/scantimeout or
$SCANTIMEOUT seconds (default 300), or gives an answer that is not one,
qmail-spamc writes `Zspam scanner unavailable, try again later (#4.3.0)`
and exits 82 (71 when descriptor 6 is closed): qmail-smtpd answers 451 and
the client keeps the message. With control/scanfailopen holding 1, or
$SCANFAILOPEN=1 ($SCANFAILOPEN=0 overrides the file), the message passes
instead, with an X-Scan-Skipped field naming the reason. Exit 81: a crash.
"""

from __future__ import annotations

from pyqmail.entry import program
from pyqmail.filter import scan


@program("qmail-spamc", crash=scan.EXIT_BUG)
def main(argv: list[str]) -> int:
    """Filter the message on descriptor 0 through spamd; see pyqmail.filter.scan."""
    return scan.spamc(argv)
