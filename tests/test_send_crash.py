"""Crash safety: qmail-send killed (SIGKILL) at random moments of a 500-message run loses nothing."""

from __future__ import annotations

import os
import random
import re
import time

import pytest

from queuefmt import files, messages
from sendkit import Running, Site, fill, make_site, remove_site

FQDN = "test.example.com"
COUNT = 500
KILLS = 8


@pytest.fixture
def site() -> Site:
    s = make_site(FQDN)
    yield s
    remove_site(s)


def _subjects(maildir: os.PathLike[str]) -> list[int]:
    out = []
    for name in os.listdir(os.path.join(maildir, "new")):
        with open(os.path.join(maildir, "new", name), "rb") as f:
            m = re.search(rb"\nSubject: m(\d+)\n", f.read())
        assert m, name
        out.append(int(m.group(1)))
    return out


def test_sigkill_at_random_moments_loses_nothing(site: Site) -> None:
    joe = site.mkdir("joe")
    site.maildir("joe/Maildir")
    site.assign([site.user_line("joe", joe)])
    fill(site, COUNT, b"joe@" + FQDN.encode())
    assert len(files(site.home.queue)["todo"]) == COUNT
    rng = random.Random(20240501)
    kinds = [b"new msg ", b"starting delivery ", b"delivery ", b"end msg "]
    kills = 0
    for _ in range(KILLS):
        d = Running(site)
        kind = rng.choice(kinds)
        target = rng.randint(1, 40)
        try:
            d.wait_for(lambda ls: sum(x.startswith(kind) for x in ls) >= target
                       or set(messages(site.home.queue).values()) <= {"S2"})
        finally:
            d.kill()
        kills += 1
    assert kills == KILLS
    # The last run goes to the end: nothing left but what only the 36-hour cleanup removes.
    d = Running(site)
    try:
        d.wait_for(lambda ls: bool(ls) and set(messages(site.home.queue).values()) <= {"S2"}, timeout=300)
    finally:
        assert d.stop() == 0
    got = _subjects(joe / "Maildir")
    assert set(got) == set(range(COUNT)), sorted(set(range(COUNT)) - set(got))[:20]
    # A kill between removing info/N and mess/N leaves mess/N alone (S2): qmail-send
    # removes it once it is 36 hours old. Make it so, and let a run clean up.
    s2 = [n for n, s in messages(site.home.queue).items() if s == "S2"]
    assert set(messages(site.home.queue).values()) <= {"S2"}
    if s2:
        old = time.time() - 129600 - 100
        for n in s2:
            os.utime(site.home.queue / "mess" / str(n % 23) / str(n), (old, old))
        d = Running(site)
        try:
            d.wait_for(lambda ls: bool(ls) and not messages(site.home.queue), timeout=60)
        finally:
            d.stop()
    assert messages(site.home.queue) == {}
    assert files(site.home.queue)["pid"] == []
