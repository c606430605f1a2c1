"""qmail-qstat: summarize the status of the mail queue (qmail-qstat(8)).

Prints two lines, as qmail's shell script does:

    messages in queue: N
    messages in queue but not yet preprocessed: M

N counts the regular files anywhere under queue/mess, M those under
queue/todo, the way `find DIR -type f -print | wc -l` counts them: symbolic
links are not followed, and a name with a newline in it counts once per line.
Trouble is reported on standard error in the words of the script's tools
(dash's for the cd, GNU find's for the directories), and, as in the script,
does not change the exit code: 0.
"""

from __future__ import annotations

import os
import stat

from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.outbuf import Output

FD_OUT = 1
FD_ERR = 2
EXIT_OK = 0
EXIT_WRITE = 1  # what the script's last echo returns when it cannot write
EXIT_CRASH = 111

LINE_QUEUE = b"messages in queue: "
LINE_TODO = b"messages in queue but not yet preprocessed: "
SCRIPT_CD_LINE = 3  # the cd is line 3 of the installed script (two header lines)


def _complain(text: bytes) -> None:
    try:
        os.write(FD_ERR, text)
    except OSError:
        pass  # safe: stderr gone; the exit code carries the failure


def _find_complaint(path: bytes, e: OSError) -> bytes:
    return b"find: '" + path + b"': " + (e.strerror or "error").encode() + b"\n"


def count_files(top: bytes) -> int:
    """Return the line count `find top -type f -print | wc -l` prints, complaining as find does."""
    count = 0
    try:
        st = os.lstat(top)
    except OSError as e:
        _complain(_find_complaint(top, e))
        return 0
    if stat.S_ISREG(st.st_mode):
        return 1 + top.count(b"\n")
    if not stat.S_ISDIR(st.st_mode):
        return 0
    stack = [top]
    while stack:
        path = stack.pop()
        try:
            entries = os.scandir(path)
        except OSError as e:
            _complain(_find_complaint(path, e))
            continue
        with entries:
            for entry in entries:
                full = path + b"/" + entry.name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(full)
                    elif entry.is_file(follow_symlinks=False):
                        count += 1 + full.count(b"\n")
                except OSError as e:
                    _complain(_find_complaint(full, e))
    return count


@program("qmail-qstat", crash=EXIT_CRASH)
def main(argv: list[str]) -> int:
    """Run qmail-qstat; return its exit code."""
    prog = os.fsencode(argv[0]) if argv else b"qmail-qstat"
    home = os.fsencode(_home.home())
    try:
        os.chdir(home)
    except OSError:
        # The script goes on after a failed cd, counting in the current directory.
        _complain(prog + b": %d: cd: can't cd to " % SCRIPT_CD_LINE + home + b"\n")
    out = Output(FD_OUT)
    out.put(LINE_QUEUE + b"%d\n" % count_files(b"queue/mess"))
    out.flush()
    out.put(LINE_TODO + b"%d\n" % count_files(b"queue/todo"))
    out.flush()
    return EXIT_WRITE if out.failed else EXIT_OK
