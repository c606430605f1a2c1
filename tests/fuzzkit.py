"""What every fuzz test shares: hypothesis profiles, and the bounds each example must keep.

Profiles (environment variable PYQMAIL_FUZZ):

- ``ci`` (default): 100 examples per property (every parser has two or more
  properties, so at least 200 inputs per parser), derandomized so a run is
  repeatable; the whole fuzz suite (37 properties) takes about 45 seconds.
- ``long``: PYQMAIL_FUZZ_EXAMPLES examples per property (default 1 000 000),
  random, with hypothesis' example database in .hypothesis/ so a crash found
  is replayed first next time::

      PYQMAIL_FUZZ=long PYQMAIL_FUZZ_EXAMPLES=100000 \\
          .venv/bin/python -m pytest -q tests/test_fuzz_*.py --hypothesis-show-statistics

Every example runs under `bounded`: a hypothesis deadline of 1 s, a hard
alarm (HANG_SECONDS) that turns a real hang into a failure instead of a stuck
suite, and a tracemalloc peak below MEMORY_MAX bytes above what was in use
when the example started.
"""

from __future__ import annotations

import functools
import os
import signal
import tracemalloc
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings

MEMORY_MAX = 100 * 1024 * 1024
HANG_SECONDS = 10.0
DEADLINE = timedelta(seconds=1)  # the bound on a hang, kept by the long profile
# CI shares one disk between every test and fsyncs (multilog, qmail-send's queue): a
# slow fsync there is not a hang. The ci profile's deadline is looser; HANG_SECONDS
# still turns a real hang into a failure.
CI_DEADLINE = timedelta(seconds=5)

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("ci", max_examples=100, deadline=CI_DEADLINE, derandomize=True, database=None,
                          suppress_health_check=_SUPPRESS, print_blob=True)
settings.register_profile("long", max_examples=int(os.environ.get("PYQMAIL_FUZZ_EXAMPLES", "1000000")),
                          deadline=DEADLINE, suppress_health_check=_SUPPRESS, print_blob=True)
settings.load_profile(os.environ.get("PYQMAIL_FUZZ", "ci"))


class Hang(Exception):
    """An example ran past HANG_SECONDS."""


class MemoryBound(Exception):
    """An example's allocations peaked above MEMORY_MAX."""


def _alarm(signum: int, frame: object) -> None:
    raise Hang(f"example still running after {HANG_SECONDS} s")


F = TypeVar("F", bound=Callable[..., Any])


def bounded(test: F) -> F:
    """Run each example of test under the hang alarm and the memory bound (put it below @given)."""
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not tracemalloc.is_tracing():
            tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
        try:
            result = test(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1] - base
        if peak > MEMORY_MAX:
            raise MemoryBound(f"{peak} bytes allocated at the peak")
        return result
    return run  # type: ignore[return-value]


def stop_tracing() -> None:
    """Stop tracemalloc (module teardown: other tests need not pay for it)."""
    if tracemalloc.is_tracing():
        tracemalloc.stop()


@pytest.fixture(autouse=True, scope="module")
def tracing() -> Iterator[None]:
    """Import into a fuzz module: tracemalloc stops when the module's tests are done."""
    yield
    stop_tracing()
