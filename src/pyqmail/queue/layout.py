"""The queue's layout, as INTERNALS.md describes it and qmail 1.03 builds it.

mess/, info/, local/ and remote/ are split into `split` subdirectories by
message number (the inode of mess/N) modulo split; pid/ and bounce/ are not
split. intd/ and todo/ are split the same way in a "big-todo" queue (the
big-todo patch's layout, what `qmail init` makes), and flat in qmail 1.03's:
the queue says which it is (todo/0 is a directory), and every reader of
todo/ and intd/ takes a message from either place, so that a flat queue
converted by making the subdirectories keeps its waiting messages.
"""

from __future__ import annotations

import os
import stat

SPLIT_DIRS = ("mess", "info", "local", "remote")
FLAT_DIRS = ("pid", "intd", "todo", "bounce")  # as qmail 1.03 makes them; intd/, todo/ split in big-todo
TODO_DIRS = ("intd", "todo")
TRIGGER = "lock/trigger"
SENDMUTEX = "lock/sendmutex"
TCPTO = "lock/tcpto"
TCPTO_SIZE = 1024
TCPTO6 = "lock/tcpto6"  # IPv6 hosts' timeouts (pyqmail.remote.tcpto.V6): C qmail never opens it
TCPTO6_SIZE = 2048


def split_name(kind: str, messnum: int, split: int) -> str:
    """Return the queue-relative name of message messnum in directory kind."""
    if kind in SPLIT_DIRS:
        return f"{kind}/{messnum % split}/{messnum}"
    return f"{kind}/{messnum}"


def is_bigtodo(queue_dir: str = ".") -> bool:
    """Return True if the queue's todo/ is split (todo/0 is a directory); raise OSError if it cannot be told."""
    try:
        return stat.S_ISDIR(os.lstat(os.path.join(queue_dir, "todo", "0")).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def todo_name(kind: str, messnum: int, split: int, big: bool) -> str:
    """Return the queue-relative name of message messnum in intd/ or todo/ of a big-todo (or a flat) queue."""
    if big:
        return f"{kind}/{messnum % split}/{messnum}"
    return f"{kind}/{messnum}"


def todo_names(kind: str, messnum: int, split: int) -> tuple[str, str]:
    """Return both places message messnum may have in intd/ or todo/: split first, then flat."""
    return f"{kind}/{messnum % split}/{messnum}", f"{kind}/{messnum}"


def find_todo(messnum: int, split: int, kind: str = "todo") -> str | None:
    """Return where todo/N (or intd/N) of message messnum is, None if in neither place; raise OSError."""
    for name in todo_names(kind, messnum, split):
        try:
            st = os.lstat(name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISDIR(st.st_mode):  # todo/5 of a big-todo queue is a subdirectory, not message 5
            return name
    return None


def todo_dirs(split: int, queue_dir: str = ".") -> list[str]:
    """Return todo/ and, in a big-todo queue, its subdirectories: where to look for messages."""
    dirs = ["todo"]
    if is_bigtodo(queue_dir):
        dirs += [f"todo/{i}" for i in range(split)]
    return dirs


def todo_numbers(split: int, queue_dir: str = ".") -> set[int]:
    """Return the numbers of the messages in todo/ (both places); raise OSError if a directory cannot be read."""
    found: set[int] = set()
    for d in todo_dirs(split, queue_dir):
        with os.scandir(os.path.join(queue_dir, d)) as it:
            for entry in it:
                name = entry.name
                if name.isdigit() and name.isascii() and not (d == "todo" and entry.is_dir(follow_symlinks=False)):
                    found.add(int(name))
    return found


def pull_trigger(queue_dir: str) -> None:
    """Wake qmail-send by writing a byte to lock/trigger without blocking.

    Nobody listening (ENXIO) or a full pipe (EAGAIN) is not an error: qmail-send
    scans todo/ on its own schedule as well.
    """
    try:
        fd = os.open(os.path.join(queue_dir, TRIGGER), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, b"\0")
    except OSError:
        pass  # safe: nobody listening or a full FIFO; qmail-send scans todo/ on its own schedule too
    finally:
        os.close(fd)
