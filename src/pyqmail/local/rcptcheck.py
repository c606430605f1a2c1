"""Would this host deliver mail for an address, or bounce it? (recipient validation, issue 15.2)

The answer is made of qmail's own decisions, in the order a message meets
them, each by the function the delivering program itself calls:

1. qmail-send's rewriting (`schedule.Rewriter`, built from the control files
   by `read_rewriter`): envnoathost, percenthack, recipientmap, locals,
   virtualdomains with their prefixes. Not local: REMOTE, not checked.
2. qmail-lspawn's user lookup (`users.controller`): users/cdb (wildcard ``+``
   and simple ``=`` assignments), else qmail-getpw's rules (passwd users
   owning their home, else the alias user with the whole local part as
   extension).
3. qmail-local's .qmail search (`dotqmail.search`) in that user's home: the
   first of ``.qmail-EXT`` and the ``-default`` chain. No file and a dash:
   qmail-local bounces "no mailbox here by that name" (NO_MAILBOX); no file
   and no dash: the default delivery takes it (DELIVER); a file: it decides
   (DELIVER, even if it then forwards, runs a program or bounces: recipient
   validation cannot know that, the book's "recipient validation is
   insufficient").

Whatever qmail would defer instead of bouncing (a user of uid 0, a
world-writable home or .qmail, a sticky home, another user's mail in a
single-user installation) is DELIVER: the message waits in the queue as in
qmail. What cannot be checked (users/cdb or a home or a .qmail unreadable,
no alias user, qmail-getpw's NFS trouble) is TEMPORARY.

Step 3 must run as the user, as qmail-local does (a home may be closed to
everyone else): `check_local` is called by qmail-rcptcheckd (root mode) in a
child that has dropped to the user, or directly in single-user mode, where
every delivery runs as the installing user anyway.
"""

from __future__ import annotations

import os

from pyqmail import errors
from pyqmail.local import dotqmail, users

TYPE_CHECKING = False  # typing costs milliseconds per connection; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Callable

    from pyqmail.send.schedule import Rewriter

DELIVER = "K"  # qmail-local would take it (a .qmail file, or the default delivery)
NO_MAILBOX = "D"  # qmail-local would bounce: no mailbox here by that name
TEMPORARY = "Z"  # could not decide now
REMOTE = "R"  # not delivered by this host: never checked

LOCAL_MAX = 1000  # bytes of a local part asked about (qmail-smtpd's addresses are shorter)


class Answer:
    """One of DELIVER, NO_MAILBOX, TEMPORARY, REMOTE, and why (for logs and TEMPORARY replies)."""

    __slots__ = ("code", "why")

    def __init__(self, code: str, why: str = "") -> None:
        self.code = code
        self.why = why

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Answer) and (self.code, self.why) == (other.code, other.why)

    def __repr__(self) -> str:
        return f"Answer({self.code!r}, {self.why!r})"


def read_rewriter() -> Rewriter | None:
    """Return qmail-send's rewriter from this home's control files; None if locals and me are both missing.

    Raise control.ControlError if a control file cannot be read. The files
    and defaults are qmail-send's (qmail_send.read_controls).
    """
    from pyqmail import control
    from pyqmail.send import schedule

    enc = control.ENCODING

    def lines(name: str, flag_me: bool = False) -> list[bytes] | None:
        found = control.read_lines(name, flag_me=flag_me)
        return None if found is None else [x.encode(enc) for x in found]

    envnoathost = (control.read_default("envnoathost", "envnoathost") or "").encode(enc)
    locals_ = lines("locals", flag_me=True)
    if locals_ is None:
        return None
    return schedule.Rewriter(envnoathost, locals_, lines("percenthack") or [],
                             lines("virtualdomains") or [], lines("recipientmap") or [])


def route(rewriter: Rewriter, addr: bytes) -> tuple[bool, bytes]:
    """Return (local?, the address qmail-send delivers to) for an envelope recipient."""
    from pyqmail.send import schedule

    channel, final = rewriter.rewrite(addr)
    return channel == schedule.LOCAL, final


def controller(local: bytes, cdb_path: str,
               rules: Callable[[bytes], users.Assignment] | None = None) -> users.Assignment | Answer:
    """Return who controls local (qmail-lspawn's lookup), or a TEMPORARY Answer if it cannot be found."""
    try:
        return users.controller(local, cdb_path, rules)
    except users.UsersCdbError as e:
        return Answer(TEMPORARY, f"trouble reading users/cdb: {e}")
    except users.GetpwError as e:
        return Answer(TEMPORARY, str(e))


def mailbox(who: users.Assignment) -> Answer:
    """Return whether qmail-local, run for who, finds a mailbox (call as who's uid, as qmail-local runs)."""
    try:
        home = os.open(who.homedir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        # qmail-local: "Unable to switch to HOME", a temporary failure.
        return Answer(TEMPORARY, f"unable to switch to {os.fsdecode(who.homedir)}: {errors.describe(e)}")
    try:
        found = dotqmail.search(who.dash, who.ext, dir_fd=home)
    except dotqmail.Unreadable as e:
        return Answer(TEMPORARY, f"unable to open {os.fsdecode(e.name)}: {errors.describe(e.error)}")
    except dotqmail.Writable:
        return Answer(DELIVER, "writable .qmail: deferred at delivery")
    finally:
        os.close(home)
    if found is not None:
        os.close(found[0])
        return Answer(DELIVER)
    if who.dash:
        return Answer(NO_MAILBOX)
    return Answer(DELIVER, "default delivery")


def scan_ulong(field: bytes) -> int:
    """Return the leading decimal digits of field as a number (0 if none), as qmail-lspawn reads ids."""
    n = 0
    for c in field:
        if not 48 <= c <= 57:
            break
        n = n * 10 + c - 48
    return n


def check_local(local: bytes, cdb_path: str, become: Callable[[users.Assignment], Answer | None],
                rules: Callable[[bytes], users.Assignment] | None = None) -> Answer:
    """Decide for a local part after qmail-send's rewriting, as qmail-lspawn and qmail-local would.

    become(who) takes who's identity for the .qmail search and returns None,
    or an Answer when the search must not happen (deferred at delivery, or
    the identity could not be taken).
    """
    if not local:
        return Answer(DELIVER, "trash address")  # qmail-lspawn delivers an empty local part at once
    if len(local) > LOCAL_MAX:
        return Answer(NO_MAILBOX)
    who = controller(local, cdb_path, rules)
    if isinstance(who, Answer):
        return who
    if scan_ulong(who.uid) == 0:
        return Answer(DELIVER, "uid 0: deferred at delivery")
    early = become(who)
    if early is not None:
        return early
    return mailbox(who)


def single_user_become(who: users.Assignment) -> Answer | None:
    """Single-user mode: deliveries run as us; another user's mail is deferred by qmail-lspawn."""
    if scan_ulong(who.uid) != os.getuid():
        return Answer(DELIVER, "another user: deferred at delivery in a single-user installation")
    return None


def check(addr: bytes, rewriter: Rewriter, qmail_home: str,
          ask: Callable[[bytes], Answer] | None = None) -> Answer:
    """Decide for an envelope recipient: rewrite it as qmail-send, then ask about its local part.

    ask(local) answers for the local part (root mode: qmail-rcptcheckd);
    without it the check runs here, as single-user mode's deliveries do.
    """
    is_local, final = route(rewriter, addr)
    if not is_local:
        return Answer(REMOTE)
    at = final.rfind(b"@")
    local = final[:at]
    if ask is not None:
        return ask(local)
    return check_local(local, os.path.join(qmail_home, "users", "cdb"), single_user_become)
