"""The queue's layout, as INTERNALS.md describes it and qmail 1.03 builds it.

mess/, info/, local/ and remote/ are split into `split` subdirectories by
message number (the inode of mess/N) modulo split; pid/, intd/, todo/ and
bounce/ are not split.
"""

from __future__ import annotations

import os

SPLIT_DIRS = ("mess", "info", "local", "remote")
FLAT_DIRS = ("pid", "intd", "todo", "bounce")
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
