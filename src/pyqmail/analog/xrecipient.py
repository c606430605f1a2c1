"""xrecipient: select from matchup output the delivery lines for one recipient (chan.address, e.g. local.user@host).

usage: xrecipient RECIPIENT < matchup-output

The selected lines come out unchanged, in matchup's format.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from pyqmail.analog import summaries
from pyqmail.analog.stdio import EXIT_TROUBLE, report
from pyqmail.entry import program


@program("xrecipient", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Print the selected lines of stdin on stdout."""
    value = os.fsencode(argv[1]) if len(argv) > 1 else b""

    def _summary(records: Iterable[bytes]) -> bytes:
        return summaries.select(records, "recipient", value)

    return report(_summary)
