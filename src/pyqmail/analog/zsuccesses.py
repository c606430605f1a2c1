"""zsuccesses: zsuccesses' report: the reasons for success, with their counts and xdelay.

usage: zsuccesses < matchup-output
"""

from __future__ import annotations

from collections.abc import Iterable

from pyqmail.analog import summaries
from pyqmail.analog.stdio import EXIT_TROUBLE, report
from pyqmail.entry import program


def _summary(records: Iterable[bytes]) -> bytes:
    return summaries.zreasons(records, b"k")


@program("zsuccesses", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Print the report for stdin on stdout."""
    return report(_summary)
