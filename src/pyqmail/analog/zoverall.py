"""zoverall: zoverall's report: the overall figures of a matchup output.

usage: zoverall < matchup-output
"""

from __future__ import annotations

from pyqmail.analog import summaries
from pyqmail.analog.stdio import EXIT_TROUBLE, report
from pyqmail.entry import program


@program("zoverall", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Print the report for stdin on stdout."""
    return report(summaries.zoverall)
