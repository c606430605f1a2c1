"""The signal module without its start-up cost.

`signal` wraps its constants in enums, and importing enum costs several
milliseconds per process start: too much for qmail-queue and qmail-inject,
which are started once per message. The C module `_signal` has the same
functions and integer constants.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from signal import (NSIG, SIG_BLOCK, SIG_DFL, SIG_IGN, SIG_SETMASK, SIGALRM, SIGCHLD, SIGHUP, SIGINT,
                        SIGKILL, SIGPIPE, SIGSTOP, SIGTERM, SIGXFSZ, alarm, default_int_handler,
                        getsignal, pthread_sigmask, set_wakeup_fd, signal)
else:
    try:
        from _signal import (NSIG, SIG_BLOCK, SIG_DFL, SIG_IGN, SIG_SETMASK, SIGALRM, SIGCHLD, SIGHUP, SIGINT,
                             SIGKILL, SIGPIPE, SIGSTOP, SIGTERM, SIGXFSZ, alarm, default_int_handler,
                             getsignal, pthread_sigmask, set_wakeup_fd, signal)
    except ImportError:  # another Python implementation
        from signal import (NSIG, SIG_BLOCK, SIG_DFL, SIG_IGN, SIG_SETMASK, SIGALRM, SIGCHLD, SIGHUP, SIGINT,
                            SIGKILL, SIGPIPE, SIGSTOP, SIGTERM, SIGXFSZ, alarm, default_int_handler,
                            getsignal, pthread_sigmask, set_wakeup_fd, signal)

__all__ = ["NSIG", "SIG_BLOCK", "SIG_DFL", "SIG_IGN", "SIG_SETMASK", "SIGALRM", "SIGCHLD", "SIGHUP", "SIGINT",
           "SIGKILL", "SIGPIPE", "SIGSTOP", "SIGTERM", "SIGXFSZ", "alarm", "default_int_handler",
           "getsignal", "pthread_sigmask", "set_wakeup_fd", "signal"]
