"""The maildrop: where qmail-queue leaves a message when qmail-queued is not there.

QMAILHOME/maildrop/ (qmailq, group qmail, mode 3733: anyone may create a
file, nobody but qmailq may list it; sticky, so nobody removes another's file;
setgid, so every file in it gets the group qmail) holds one file per message.
qmail-queue, run by a local user in a root-mode installation that cannot
reach qmail-queued, writes `t<unique>` there, then renames it to `m<unique>`;
qmail-queued queues each `m` file with the uid of the file's owner and removes
it. A drop file is:

    MAGIC (16 bytes) | envelope offset (8 bytes, big-endian) | message | envelope

where the envelope is qmail-queue's input form (`F...\\0T...\\0...\\0`,
already checked) and runs from the offset to the end of the file.
"""

from __future__ import annotations

import os

DIR = "maildrop"
MODE = 0o3733
FILE_MODE = 0o640  # readable by the group qmail (the directory's, by setgid), so by qmailq
MAGIC = b"pyqmail-drop-v1\n"
HEADER_SIZE = len(MAGIC) + 8
OFFSET_AT = len(MAGIC)
STALE_SECONDS = 36 * 3600  # qmail-clean's rule for pid/ files: older than this is abandoned


def unique(now: float) -> str:
    """Return a name part nobody can guess or repeat: TIME.PID.RANDOM."""
    return f"{int(now)}.{os.getpid()}.{os.urandom(16).hex()}"


def writer_pid(name: str) -> int:
    """Return the pid in a drop file's name `mTIME.PID.RANDOM` (the client's word: a note for the
    Received line and the `p` record only), or qmail-queued's own pid if the name has none."""
    parts = name.split(".")
    if len(parts) == 3 and parts[1].isdigit() and parts[1].isascii() and 0 < len(parts[1]) <= 10:
        pid = int(parts[1])
        if 0 < pid < 2**31:
            return pid
    return os.getpid()


def header(offset: int) -> bytes:
    """Return the header of a drop file whose envelope starts at offset."""
    return MAGIC + offset.to_bytes(8, "big")


def envelope_offset(head: bytes, size: int) -> int | None:
    """Return the envelope offset the header claims, or None if it is not a drop file of size bytes."""
    if len(head) != HEADER_SIZE or not head.startswith(MAGIC):
        return None
    offset = int.from_bytes(head[OFFSET_AT:], "big")
    # The shortest envelope is "F\0\0": three bytes.
    if offset < HEADER_SIZE or offset + 3 > size:
        return None
    return offset
