"""zsendmail: zsendmail: matchup output as sendmail-style log lines.

usage: zsendmail < matchup-output
"""

from __future__ import annotations

from pyqmail.analog import summaries
from pyqmail.analog.stdio import EXIT_TROUBLE, report
from pyqmail.entry import program


@program("zsendmail", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Print the report for stdin on stdout."""
    return report(summaries.zsendmail)
