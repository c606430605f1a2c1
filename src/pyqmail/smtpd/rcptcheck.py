"""qmail-smtpd's recipient validation at RCPT (issue 15.2): three interfaces, one check.

1. The built-in check (`$RCPTCHECK_LOCAL`, else control/rcptcheck): a recipient
   this host delivers (qmail-send's locals and virtualdomains) is refused with
   ``550 sorry, no mailbox here by that name (#5.1.1)`` when qmail-local would
   bounce it, by pyqmail.local.rcptcheck, the code qmail-send, qmail-lspawn and
   qmail-local use. Single-user mode looks directly; root mode asks
   qmail-rcptcheckd (qmail-smtpd, as qmaild, cannot look into homes). It
   cannot check now: ``451 unable to verify recipient (#4.3.0)``. Relay
   clients' and authenticated users' recipients are checked too when they are
   local; a recipient that is not local is never checked.
   `$RCPTCHECK_LOCAL` set and not ``0`` turns it on, ``0`` off; unset, a
   control/rcptcheck whose first line is a nonzero number turns it on. Off by
   default (qmail's behaviour); `qmail up` turns it on in its services.
2. control/validrcptto.cdb, made by qmail-newvrt from control/validrcptto (the
   validrcptto.cdb patch): keys are lowercased ``user@domain`` (accepted),
   ``-user@domain`` (refused), ``@domain`` (the domain accepted) and
   ``-@domain`` (the domain refused), tried in that order of precedence; a
   refusal is ``553 sorry, this recipient is not in my validrcptto list
   (#5.7.1)``; an address it does not mention goes on to the other checks.
   Not for relay clients (as the patch).
3. `$RCPTCHECK` naming a program (Jay Soffian's RCPTCHECK patch, notqmail's
   qmail-rcptcheck interface): run with `SENDER` and `RECIPIENT` in its
   environment (stdin /dev/null, stdout and stderr to qmail-smtpd's log):
   exit 100 refuses (``553 sorry, no mailbox here by that name. (#5.1.1)``),
   111 is ``421 unable to verify recipient (#4.3.0)`` and the end of the
   connection, 120, a crash or a program that cannot be run ``421 unable to
   execute recipient check (#4.3.0)`` and the end; anything else accepts.
   Not for relay clients (as the patch).

Every refusal counts toward control/brtlimit ($BRTLIMIT), the core's
bad-recipient limit, and is logged with the client's IP.
"""

from __future__ import annotations

import os

from pyqmail import cdb, control
from pyqmail import home as _home
from pyqmail.local import rcptcheck
from pyqmail.smtpd import policy
from pyqmail.smtpd.log import field, warn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from pyqmail.send.schedule import Rewriter
    from pyqmail.smtpd.policy import View

NO_MAILBOX = b"550 sorry, no mailbox here by that name (#5.1.1)\r\n"
UNVERIFIED = b"451 unable to verify recipient (#4.3.0)\r\n"
VALIDRCPTTO = b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)\r\n"
# The RCPTCHECK patch's replies, in its words.
PROGRAM_REFUSED = b"553 sorry, no mailbox here by that name. (#5.1.1)\r\n"
PROGRAM_UNVERIFIED = b"421 unable to verify recipient (#4.3.0)\r\n"
PROGRAM_FAILED = b"421 unable to execute recipient check (#4.3.0)\r\n"
PROGRAM_REFUSE = 100
PROGRAM_TEMPORARY = 111
PROGRAM_EXEC_FAILED = 120

VALIDRCPTTO_CDB = "validrcptto.cdb"


def vrt_lookup(reader: cdb.Reader, addr: bytes) -> bool | None:
    """Return True (listed), False (refused) or None (not mentioned) for addr in validrcptto.cdb."""
    a = addr.lower()
    at = a.rfind(b"@")
    if reader.get(a) is not None:
        return True
    if at != -1:
        user, dom = a[:at], a[at:]
        if reader.get(b"-" + user + dom) is not None:
            return False
        if reader.get(dom) is not None:
            return True
        if reader.get(b"-" + dom) is not None:
            return False
    return None


class RcptCheck(policy.Check):
    """Recipient validation at RCPT: validrcptto.cdb, the built-in check, $RCPTCHECK, in that order."""

    name = "rcptcheck"

    def __init__(self, local: Rewriter | None, ask: Callable[[bytes], rcptcheck.Answer] | None,
                 program: str | None, vrt: cdb.Reader | None, qmail_home: str) -> None:
        self.local = local  # qmail-send's rewriter when the built-in check is on
        self.ask = ask  # root mode: qmail-rcptcheckd; single-user mode: None, look here
        self.program = program
        self.vrt = vrt
        self.home = qmail_home

    def rcpt(self, s: View, addr: bytes) -> policy.Verdict | None:
        if not s.rcpt_allowed:
            return None  # the core refuses it (rcpthosts)
        if self.vrt is not None and not s.relaying:
            try:
                listed = vrt_lookup(self.vrt, addr)
            except cdb.CDBError:
                return policy.Verdict(UNVERIFIED)
            if listed is False:
                warn(b"validrcptto: refused <" + field(addr) + b"> at " + field(s.remoteip))
                return policy.Verdict(VALIDRCPTTO, badrcpt=True)
        if self.local is not None:
            answer = rcptcheck.check(addr, self.local, self.home, self.ask)
            if answer.code == rcptcheck.NO_MAILBOX:
                warn(b"rcptcheck: no mailbox <" + field(addr) + b"> at " + field(s.remoteip))
                return policy.Verdict(NO_MAILBOX, badrcpt=True)
            if answer.code == rcptcheck.TEMPORARY:
                warn(b"rcptcheck: unable to verify <" + field(addr) + b">: "
                     + field(answer.why.encode("utf-8", "replace")))
                return policy.Verdict(UNVERIFIED)
        if self.program is not None and not s.relaying:
            return self._program(s, addr)
        return None

    def _program(self, s: View, addr: bytes) -> policy.Verdict | None:
        from pyqmail import spawn

        env = dict(os.environ)
        env["SENDER"] = os.fsdecode(s.mailfrom)
        env["RECIPIENT"] = os.fsdecode(addr)
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pid = spawn.spawn(self.program or "", [self.program or ""], env=env, fds={0: null, 1: 2, 2: 2})
        except OSError:
            return policy.Verdict(PROGRAM_FAILED, drop=True)
        finally:
            os.close(null)
        code = spawn.wait(pid)
        if code == PROGRAM_REFUSE:
            warn(b"rcptcheck: RCPTCHECK refused <" + field(addr) + b"> at " + field(s.remoteip))
            return policy.Verdict(PROGRAM_REFUSED, badrcpt=True)
        if code == PROGRAM_TEMPORARY:
            return policy.Verdict(PROGRAM_UNVERIFIED, drop=True)
        if code < 0 or code == PROGRAM_EXEC_FAILED:
            return policy.Verdict(PROGRAM_FAILED, drop=True)
        return None


def local_on(env: Mapping[bytes, bytes]) -> bool:
    """Whether the built-in check is on: $RCPTCHECK_LOCAL (not 0), else control/rcptcheck (nonzero)."""
    x = env.get(b"RCPTCHECK_LOCAL")
    if x is not None:
        return x.strip() != b"0"
    return control.read_int("rcptcheck", 0) != 0


def load(env: Mapping[bytes, bytes]) -> RcptCheck | None:
    """Return the check when any of its interfaces is on; ControlError if a control file cannot be read."""
    qmail_home = _home.home()
    rewriter = None
    ask = None
    if local_on(env):
        rewriter = rcptcheck.read_rewriter()
        if rewriter is None:
            raise control.ControlError("control/locals and control/me are both missing")
        if not _home.install().single:
            from pyqmail.local import qmail_rcptcheckd

            def ask(local: bytes) -> rcptcheck.Answer:
                return qmail_rcptcheckd.ask(qmail_home, local)
    x = env.get(b"RCPTCHECK")
    program = os.fsdecode(x) if x else None
    try:
        vrt: cdb.Reader | None = cdb.Reader.open(control.path(VALIDRCPTTO_CDB))
    except FileNotFoundError:
        vrt = None
    except (OSError, cdb.CDBError) as e:
        raise control.ControlError(f"unable to read controls: {VALIDRCPTTO_CDB}: {e}") from None
    if rewriter is None and program is None and vrt is None:
        return None
    if rewriter is not None and b"TCPREMOTEIP" not in env:
        _warm(rewriter, qmail_home, ask is None)  # no client: tcpserver's parent preloading
    return RcptCheck(rewriter, ask, program, vrt, qmail_home)


WARM_ROUNDS = 12  # CPython specialises a function's code after 8 calls
WARM_ADDRESS = b"warm.up"  # no @: envnoathost's domain, local in any installation that delivers its own


def _warm(rewriter: Rewriter, qmail_home: str, here: bool) -> None:
    """Run the built-in lookup in tcpserver's parent, so that no forked child runs it cold.

    tcpserver's warm-up sessions (qmail_smtpd.preload) name no local recipient.
    Measured per forked session (bench/smtpd.py --checks): the check cost 0.66 ms
    of CPU and 57 page faults cold, 0.3 ms and 31 after this (glibc's passwd
    lookup sets its sources up once per process). here: single-user mode, whose
    lookup runs in qmail-smtpd (root mode asks qmail-rcptcheckd: only the
    rewriting is run here). Reads only, and the answer is dropped: nothing a
    session sees changes.
    """
    try:
        for _ in range(WARM_ROUNDS):
            if here:
                rcptcheck.check(WARM_ADDRESS, rewriter, qmail_home)
            else:
                rcptcheck.route(rewriter, WARM_ADDRESS)
    except OSError:
        return  # best effort: the children look up cold, and report what fails


policy.register("rcptcheck", load)
