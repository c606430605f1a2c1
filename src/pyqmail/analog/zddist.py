"""zddist: zddist's report: how soon successful deliveries were done.

usage: zddist < matchup-output
"""

from __future__ import annotations

from pyqmail.analog import summaries
from pyqmail.analog.stdio import EXIT_TROUBLE, report
from pyqmail.entry import program


@program("zddist", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Print the report for stdin on stdout."""
    return report(summaries.zddist)
