"""qmail-clean(8): the cleanup commands qmail-send sends, as a process."""

from __future__ import annotations

import os
import subprocess
import time

from conftest import QHome, expect, run
from queuefmt import files, messages


def queue_one(home: QHome, recips: tuple[bytes, ...] = (b"a@b",)) -> int:
    """Queue a message with QMAILHOME/bin/qmail-queue; return its number."""
    r, w = os.pipe()
    os.write(w, b"F\0" + b"".join(b"T" + x + b"\0" for x in recips) + b"\0")
    os.close(w)
    try:
        p = subprocess.run([home.bin("qmail-queue")], input=b"Subject: x\n\nbody\n", stdout=r,
                           capture_output=False, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(r)
    assert p.returncode == 0, p.stderr
    before = set(files(home.queue)["todo"])
    (num,) = before
    return int(num)


def test_todo_then_foop_takes_the_message_from_s4_to_s1(qhome: QHome) -> None:
    num = queue_one(qhome)
    assert messages(qhome.queue) == {num: "S4"}
    res = expect(run([qhome.bin("qmail-clean")], input=f"todo/{num}\0".encode()))
    assert res.stdout == b"+" and res.stderr == b""
    fs = files(qhome.queue)
    assert fs["todo"] == [] and fs["intd"] == [] and fs["mess"] == [f"{num % 23}/{num}"]
    res = expect(run([qhome.bin("qmail-clean")], input=f"foop/{num}\0foop/{num}\0".encode()))
    assert res.stdout == b"++", "a file already gone counts as removed"
    assert messages(qhome.queue) == {}


def test_malformed_commands_are_answered_x(qhome: QHome) -> None:
    cmds = [b"todo/", b"todo", b"xxxx/12", b"todo/1a", b"todo/-1", b"todo/" + b"1" * 95, b"foop/ 1",
            b"", b"todo/1\n"]
    res = expect(run([qhome.bin("qmail-clean")], input=b"".join(c + b"\0" for c in cmds)))
    assert res.stdout == b"x" * len(cmds)


def test_overlong_command_then_a_good_one(qhome: QHome) -> None:
    num = queue_one(qhome)
    res = expect(run([qhome.bin("qmail-clean")], input=b"todo/" + b"9" * 5000 + b"\0" + f"todo/{num}\0".encode()))
    assert res.stdout == b"x+"
    assert files(qhome.queue)["todo"] == []


def test_unremovable_file_is_answered_bang(qhome: QHome) -> None:
    d = qhome.queue / "todo" / "4242"
    d.mkdir()
    (d / "inside").write_bytes(b"")
    res = expect(run([qhome.bin("qmail-clean")], input=b"todo/4242\0"))
    assert res.stdout == b"!"


def test_truncated_input_ends_quietly(qhome: QHome) -> None:
    res = expect(run([qhome.bin("qmail-clean")], input=b"todo/12"))
    assert res.stdout == b""
    res = expect(run([qhome.bin("qmail-clean")], input=b""))
    assert res.stdout == b""


def test_old_pid_files_are_removed_at_start(qhome: QHome) -> None:
    old = qhome.queue / "pid" / "123.456.1"
    new = qhome.queue / "pid" / "123.456.2"
    old.write_bytes(b"")
    new.write_bytes(b"")
    long_ago = time.time() - 129600 - 60
    os.utime(old, (long_ago, long_ago))
    expect(run([qhome.bin("qmail-clean")], input=b""))
    assert not old.exists() and new.exists()


def test_missing_queue_exits_111(qhome: QHome) -> None:
    res = run([qhome.bin("qmail-clean")], input=b"todo/1\0", env={"QMAILHOME": str(qhome.path / "nonexistent")})
    expect(res, 111)
    assert res.stdout == b""
