"""svscanboot: start svscan at boot, its errors shown by readproctitle (daemontools svscanboot(8)).

usage: svscanboot [dir]

dir is the service directory (default: QMAILHOME/service of the home whose
stub runs svscanboot; daemontools' is /service). With stdin, stdout and
stderr on /dev/null, svscanboot first stops what an earlier boot may have
left (`svc -dx dir/* dir/*/log`), then runs `svscan dir` with its stdout and
stderr piped into `readproctitle service errors: ...` (400 dots), both with
an environment of PATH alone (QMAILHOME/bin first, then daemontools'
PATH), and waits for both. It exits when both have exited, 0, or 111 if
either cannot start: run it from inittab with respawn, or from rc.local
in the background.
"""

from __future__ import annotations

import glob
import os

from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.spawn import spawn, wait

EXIT_TROUBLE = 111
DOTS = "." * 400
TAIL_PATH = "/command:/usr/local/bin:/usr/local/sbin:/bin:/sbin:/usr/bin:/usr/sbin:/usr/X11R6/bin"


def _main(argv: list[str]) -> int:
    qmail_home = _home.home()
    top = argv[1] if len(argv) > 1 else os.path.join(qmail_home, "service")
    bindir = os.path.join(qmail_home, "bin")
    env = {"PATH": f"{bindir}:{TAIL_PATH}"}
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    std = {0: null, 1: null, 2: null}
    # sh's globs: sorted, without dot names; an unmatched glob stays literal (svc then warns to /dev/null).
    dirs = sorted(glob.glob(os.path.join(glob.escape(top), "*"))) or [os.path.join(top, "*")]
    logs = sorted(glob.glob(os.path.join(glob.escape(top), "*", "log"))) or [os.path.join(top, "*", "log")]
    try:
        wait(spawn("svc", ["svc", "-dx", *dirs, *logs], env=env, fds=std))
    except OSError:
        pass  # as the shell script: a missing svc is reported to /dev/null
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pids = []
    rc = 0
    try:
        # Exec both (fast=False): each must be a process of its own name, and
        # readproctitle shows its input in its own exec'd argv.
        pids.append(spawn("svscan", ["svscan", top], env=env, fds={0: null, 1: write_end, 2: write_end},
                          fast=False))
        pids.append(spawn("readproctitle", ["readproctitle", "service", "errors:", DOTS], env=env,
                          fds={0: read_end, 1: null, 2: null}, fast=False))
    except OSError:
        # As in the shell's pipeline: a svscan without its reader dies of
        # SIGPIPE at its first complaint; wait for what did start.
        rc = EXIT_TROUBLE
    finally:
        os.close(read_end)
        os.close(write_end)
        os.close(null)
    for pid in pids:
        wait(pid)
    return rc

@program("svscanboot", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Run svscan on the service directory with readproctitle; return when both exit."""
    return _main(argv)
