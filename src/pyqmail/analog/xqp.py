"""xqp: select from matchup output the lines of messages with one qp (qmail-queue's pid).

usage: xqp QP < matchup-output

The selected lines come out unchanged, in matchup's format.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pyqmail.analog import summaries
from pyqmail.analog.stdio import EXIT_TROUBLE, report
from pyqmail.entry import program


@program("xqp", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Print the selected lines of stdin on stdout."""
    value = os.fsencode(argv[1]) if len(argv) > 1 else b""

    def _summary(records: Iterable[bytes]) -> bytes:
        return summaries.select(records, "qp", value)

    return report(_summary)
