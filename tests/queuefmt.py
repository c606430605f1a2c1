"""An independent reader of a qmail queue (INTERNALS.md, envelopes(5)).

Written from the documents, not from pyqmail's writer, so that tests check
the on-disk format rather than the writer against itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

RECEIVED = re.compile(
    rb"^Received: \(qmail (\d+) (invoked by uid \d+|invoked by alias|invoked from network|invoked for bounce)\); "
    rb"([1-9]|[12]\d|3[01]) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d -0000\n")


@dataclass
class Envelope:
    uid: int
    pid: int
    sender: bytes
    recipients: list[bytes]


def parse_todo(data: bytes) -> Envelope:
    """Parse a todo/intd file: u<uid>\\0 p<pid>\\0 F<sender>\\0 then T<rcpt>\\0 records."""
    fields = data.split(b"\0")
    assert fields[-1] == b"", f"todo must end with NUL: {data!r}"
    fields = fields[:-1]
    assert fields[0][:1] == b"u" and fields[0][1:].isdigit(), data
    assert fields[1][:1] == b"p" and fields[1][1:].isdigit(), data
    assert fields[2][:1] == b"F", data
    rcpts = []
    for f in fields[3:]:
        assert f[:1] == b"T", data
        rcpts.append(f[1:])
    return Envelope(int(fields[0][1:]), int(fields[1][1:]), fields[2][1:], rcpts)


def files(queue: Path) -> dict[str, list[str]]:
    """Return {dir: [relative names of regular files]} for every queue directory."""
    out: dict[str, list[str]] = {}
    for d in ("pid", "mess", "intd", "todo", "info", "local", "remote", "bounce"):
        names = []
        for root, _, fs in os.walk(queue / d):
            for f in fs:
                names.append(os.path.relpath(os.path.join(root, f), queue / d))
        out[d] = sorted(names)
    return out


def messages(queue: Path, split: int = 23) -> dict[int, str]:
    """Classify every message number present into its INTERNALS.md state S1-S5 ('?' if none fits)."""
    fs = files(queue)
    nums: set[int] = set()
    where: dict[str, set[int]] = {}
    for d, names in fs.items():
        if d == "pid":
            continue
        s = set()
        for n in names:
            base = os.path.basename(n)
            num = int(base)
            if d in ("mess", "info", "local", "remote"):
                assert n == f"{num % split}/{num}", f"{d}/{n} is in the wrong split directory"
            elif d in ("intd", "todo"):  # flat, or split in a big-todo queue
                assert n in (str(num), f"{num % split}/{num}"), f"{d}/{n} is in the wrong place"
            else:
                assert "/" not in n, f"{d}/{n} must not be split"
            s.add(num)
        where[d] = s
        nums |= s
    states = {}
    for num in nums:
        has = {d: num in where[d] for d in where}
        if has["mess"] and not has["intd"] and not has["todo"] and not has["info"] and not has["local"] and not has["remote"] and not has["bounce"]:
            states[num] = "S2"
        elif has["mess"] and has["intd"] and not has["todo"] and not has["info"] and not has["local"] and not has["remote"] and not has["bounce"]:
            states[num] = "S3"
        elif has["mess"] and has["todo"] and not has["bounce"]:
            states[num] = "S4"
        elif has["mess"] and not has["intd"] and not has["todo"] and has["info"]:
            states[num] = "S5"
        else:
            states[num] = "?"
    return states
