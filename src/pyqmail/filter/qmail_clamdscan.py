"""qmail-clamdscan: stream a message to ClamAV's clamd; refuse it when clamd finds a virus.

qmail-clamdscan is a filter for control/smtpfilters or qmail-qfilter: it
streams the message on descriptor 0 to clamd with clamd's zINSTREAM command
(chunks of a 4-byte big-endian length and that many bytes, a zero length at
the end) and writes nothing, so the message passes on unchanged. When clamd
answers NAME FOUND, qmail-clamdscan writes `DThis message contains a virus
(NAME) (#5.7.1)` on descriptor 6 and exits 82, and qmail-smtpd answers 554
(exit 31 when descriptor 6 is closed).

clamd is control/clamd or $CLAMD: the path of its unix socket or HOST:PORT
(default /var/run/clamav/clamd.ctl, Debian's LocalSocket).

When clamd cannot be reached, takes longer than control/scantimeout or
$SCANTIMEOUT seconds (default 300), or answers with an error (its
StreamMaxLength passed, say), qmail-clamdscan writes `Zvirus scanner
unavailable, try again later (#4.3.0)` and exits 82 (71 when descriptor 6
is closed): qmail-smtpd answers 451. With control/scanfailopen holding 1,
or $SCANFAILOPEN=1 ($SCANFAILOPEN=0 overrides the file), the message passes
instead, with an X-Scan-Skipped field naming the reason. Exit 81: a crash.
"""

from __future__ import annotations

from pyqmail.entry import program
from pyqmail.filter import scan


@program("qmail-clamdscan", crash=scan.EXIT_BUG)
def main(argv: list[str]) -> int:
    """Filter the message on descriptor 0 through clamd; see pyqmail.filter.scan."""
    return scan.clamdscan(argv)
