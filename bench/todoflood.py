"""The silly qmail syndrome: how soon a waiting delivery starts during a flood in todo/.

usage: python bench/todoflood.py [N] [ROUNDS]   (default 2000 messages, 3 rounds)

Runs tests/test_send_todo.py's scenario (sendkit's single-user home, N
1-byte messages queued with qmail-queue while qmail-send is down, to a remote
channel held at concurrency 0; a local message deferred once waits; ALRM makes
it due a quarter into the flood's preprocessing) with qmail-todo and with
qmail-send preprocessing in its own loop (no bin/qmail-todo), alternated, and
prints for each the median and range of: ms from ALRM to the waiting
message's `starting delivery`, and seconds to preprocess the flood.
"""

from __future__ import annotations

import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from sendkit import make_site, remove_site  # noqa: E402
from test_send_todo import FQDN, flood_run  # noqa: E402


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    figures: dict[str, list[dict[str, float]]] = {"qmail-todo": [], "in qmail-send": []}
    for _ in range(rounds):
        for mode in figures:
            site = make_site(FQDN, todo="--big-todo")
            try:
                if mode == "in qmail-send":
                    (site.home.path / "bin" / "qmail-todo").unlink()
                figures[mode].append(flood_run(site, n))
            finally:
                remove_site(site)
    print(f"flood of {n} in todo/, {rounds} rounds: median (min-max)")
    for mode, runs in figures.items():
        lat = [r["latency_ms"] for r in runs]
        pre = [r["preprocess_s"] for r in runs]
        print(f"  {mode:14} ALRM -> starting delivery {statistics.median(lat):7.1f} ms ({min(lat):.1f}-{max(lat):.1f}); "
              f"flood preprocessed in {statistics.median(pre):.1f} s ({min(pre):.1f}-{max(pre):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
