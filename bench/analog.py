"""Benchmark: a generated qmail-send log of 100 000 deliveries through `matchup | zoverall`.

usage: .venv/bin/python bench/analog.py [DELIVERIES] [--tai64n]

Prints the log's size and the wall time of the pipeline (the goal: under a
minute on the project's two-core machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import BIN  # noqa: E402

from pyqmail.analog.synthlog import generate  # noqa: E402

DELIVERIES = 100_000


def main() -> int:
    want = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else DELIVERIES
    tai64n = "--tai64n" in sys.argv
    messages = want * 10 // 17
    while True:
        log, counts = generate(messages, seed=1, tai64n=tai64n)
        if counts.deliveries >= want:
            break
        messages += messages // 20 + 1
    with tempfile.TemporaryDirectory(prefix="pyqmail-bench-") as tmp:
        path = os.path.join(tmp, "current")
        with open(path, "wb") as f:
            f.write(log)
        script = f'"{BIN}/matchup" < "{path}" 5>/dev/null | "{BIN}/zoverall"'
        t = time.perf_counter()
        p = subprocess.run(["/bin/sh", "-c", script], capture_output=True, check=True)
        took = time.perf_counter() - t
    print(f"log: {len(log.splitlines())} lines, {len(log) / 1e6:.1f} MB, {counts.messages} messages, "
          f"{counts.deliveries} deliveries ({'TAI64N' if tai64n else 'numeric'} stamps)")
    line = [x for x in p.stdout.decode().splitlines() if x.startswith("Total delivery attempts:")]
    print(f"zoverall says: {line[0] if line else '?'}")
    print(f"matchup | zoverall: {took:.2f} s  (goal: under 60 s)")
    return 0 if took < 60 else 1


if __name__ == "__main__":
    sys.exit(main())
