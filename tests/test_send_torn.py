"""A todo/N naming a torn envelope (issue 17): removed with a warning, nothing delivered, the queue goes on.

qmail-queue fsyncs intd/N after linking todo/N (one fsync for the envelope and
the link), so after a power failure a todo/N can name an envelope that never
reached the disk whole: empty, cut inside a record, or cut before its F
record. Its message was never acknowledged. qmail-send (or qmail-todo, which
preprocesses with the same code) must remove it -- todo/N, intd/N, mess/N --
log a warning, deliver nothing of it, and go on with the next message.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from queuefmt import files
from sendkit import Running, Site, make_site, maildir_messages, qqueue, remove_site

FQDN = "test.example.com"
SPLIT = 23
TORN = {
    "empty": b"",
    "cut inside a record": b"u0\0p1\0Fs@x.example\0Tjoe@test.exa",
    "without F": b"u0\0p1\0",
    "zeros at the end": b"u0\0p1\0Fs@x.example\0Tjoe@test.example.com\0\0\0\0",
}


def _plant(site: Site, n: int, envelope: bytes) -> int:
    """Put a message into the queue as a power failure could leave it (mess/N whole, todo/N -> intd/N); return N."""
    q = site.home.queue
    tmp = q / "pid" / f"torn.{n}"
    tmp.write_bytes(b"Received: (qmail 1 invoked by uid 0); 1 Jan 2026 00:00:00 -0000\nSubject: torn\n\nx\n")
    num = tmp.stat().st_ino
    mess = q / "mess" / str(num % SPLIT) / str(num)
    os.link(tmp, mess)
    tmp.unlink()
    intd = q / "intd" / str(num)
    intd.write_bytes(envelope)
    os.link(intd, q / "todo" / str(num))
    for p in (mess, intd):
        os.chown(p, site.uid, site.gid)
    return num


def _gone(queue: Path, nums: set[int]) -> bool:
    left = {int(os.path.basename(n)) for names in files(queue).values() for n in names}
    return not (left & nums)


@pytest.mark.parametrize("preprocessor", ["qmail-todo", "qmail-send"])
def test_torn_envelopes_are_removed_and_the_queue_goes_on(preprocessor: str) -> None:
    site = make_site(FQDN)
    try:
        if preprocessor == "qmail-send":
            site.home.bin("qmail-todo").unlink()  # qmail-send preprocesses in its own loop, as qmail 1.03's
        site.home.bin("qmail-remote").unlink(missing_ok=True)
        joe = site.mkdir("joe")
        site.maildir("joe/Maildir")
        site.assign([site.user_line("joe", joe)])
        torn = {_plant(site, i, env): name for i, (name, env) in enumerate(TORN.items())}
        assert qqueue(site.home, b"s@x.example", [b"joe@" + FQDN.encode()], b"Subject: whole\n\nw\n",
                      user=site.user) == 0
        d = Running(site)
        try:
            d.wait_for(lambda ls: any(x.startswith(b"end msg ") for x in ls)
                       and sum(b": torn envelope, " in x for x in ls) == len(TORN))
            deadline = time.monotonic() + 30
            while not _gone(site.home.queue, set(torn)) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            assert d.stop() == 0
        lines = d.lines()
        for num in torn:
            assert b"warning: trouble with todo/%d: torn envelope, removing message" % num in lines, lines
            assert not any(x.endswith(b"msg %d" % num) or b" msg %d:" % num in x or b"msg %d to" % num in x
                           for x in lines), (torn[num], lines)
        assert not any(b"qmail-clean unable" in x for x in lines), lines
        left = files(site.home.queue)
        assert _gone(site.home.queue, set(torn)), (torn, left)  # todo/N, intd/N, mess/N: nothing left
        assert all(not v for v in left.values()), left  # the whole message is done too
        (msg,) = maildir_messages(joe / "Maildir")
        assert b"Subject: whole" in msg
    finally:
        remove_site(site)
