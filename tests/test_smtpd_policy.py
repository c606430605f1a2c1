"""qmail-smtpd's check interface (pyqmail.smtpd.policy) on the pure session: hook order, verdicts,
headers, relay grants, the bad-recipient limit, the EHLO list and the shared receive policy."""

from __future__ import annotations

import pytest

from pyqmail.control import DomainSet
from pyqmail.smtpd import policy, replies
from pyqmail.smtpd.policy import ACCEPT, Check, Hooks, Verdict
from pyqmail.smtpd.rcpthosts import RcptHosts
from pyqmail.smtpd.received import Peer
from pyqmail.smtpd.session import CONTINUE, DATA, DIE, DROP, VERBS, Config, Session

GREETING = b"mx.example.com"
REFUSE = b"550 no (#5.7.1)\r\n"


def session(*checks: Check, **kw: object) -> Session:
    peer = Peer(b"192.0.2.1", b"client.example.net", None, b"mx.example.com")
    kw.setdefault("rcpthosts", RcptHosts(DomainSet(["example.com"])))
    return Session(Config(GREETING, peer, hooks=Hooks(list(checks)), **kw))  # type: ignore[arg-type]


class Recorder(Check):
    """Records every hook call; answers from a table (hook name -> verdict)."""

    def __init__(self, log: list[str], answers: dict[str, Verdict] | None = None, tag: str = "") -> None:
        self.log = log
        self.answers = answers or {}
        self.tag = tag

    def _v(self, hook: str, arg: bytes = b"") -> Verdict | None:
        self.log.append(f"{self.tag}{hook} {arg.decode()}".rstrip())
        return self.answers.get(hook)

    def connect(self, s: policy.View) -> Verdict | None:
        return self._v("connect")

    def helo(self, s: policy.View, name: bytes) -> Verdict | None:
        return self._v("helo", name)

    def mail(self, s: policy.View, addr: bytes) -> Verdict | None:
        return self._v("mail", addr)

    def rcpt(self, s: policy.View, addr: bytes) -> Verdict | None:
        return self._v("rcpt", addr + b" %d/%d %d" % (s.rcptcount, s.rcptcountall, s.rcpt_allowed))

    def data(self, s: policy.View) -> Verdict | None:
        return self._v("data")

    def auth(self, s: policy.View, user: bytes) -> Verdict | None:
        return self._v("auth", user)

    def reset(self, s: policy.View) -> None:
        self._v("reset")


def test_verb_table_is_qmails_command_list() -> None:
    assert sorted(VERBS) == sorted([b"rcpt", b"mail", b"data", b"quit", b"helo", b"ehlo", b"auth", b"starttls",
                                    b"rset", b"help", b"noop", b"vrfy", b"bdat"])  # bdat: issue 18.4
    s = session()
    assert s.command(b"eXpN x") == (replies.UNIMPLEMENTED, CONTINUE)
    assert s.command(b"NoOp") == (replies.OK, CONTINUE)


def test_no_checks_share_one_empty_hooks() -> None:
    assert Hooks([]).checks == ()
    assert Hooks([]).rcpt == ()
    h = Hooks([Recorder([])])
    assert len(h.rcpt) == 1 and len(h.reset) == 1


def test_only_overridden_hooks_are_called() -> None:
    class OnlyRcpt(Check):
        def rcpt(self, s: policy.View, addr: bytes) -> Verdict | None:
            return None

    h = Hooks([OnlyRcpt()])
    assert len(h.rcpt) == 1
    assert h.mail == h.helo == h.connect == h.data == h.auth == h.reset == ()


def test_hooks_run_in_dialogue_order_with_the_view() -> None:
    log: list[str] = []
    s = session(Recorder(log))
    assert s.connect() == (replies.greeting(GREETING), CONTINUE)
    s.command(b"EHLO client")
    s.command(b"MAIL FROM:<a@b.example>")
    assert s.command(b"RCPT TO:<x@example.com>") == (replies.OK, CONTINUE)
    assert s.command(b"RCPT TO:<y@elsewhere.example>") == (replies.NOGATEWAY, CONTINUE)
    assert s.command(b"DATA") == (b"", DATA)
    s.message_done()
    s.command(b"RSET")
    assert log == ["connect", "helo client", "mail a@b.example", "rcpt x@example.com 0/1 1",
                   "rcpt y@elsewhere.example 1/2 0", "data", "reset", "reset"]


def test_refusals_at_each_step() -> None:
    log: list[str] = []
    v = Verdict(REFUSE)
    s = session(Recorder(log, {"connect": v, "helo": v, "mail": v, "rcpt": v, "data": v}))
    assert s.connect() == (REFUSE, CONTINUE)  # instead of the greeting, as qmail-spp
    assert s.command(b"HELO other") == (REFUSE, CONTINUE)
    assert s.helohost == b"client.example.net"  # unchanged
    assert s.command(b"MAIL FROM:<a@b>") == (REFUSE, CONTINUE)
    assert not s.seenmail


def test_first_decision_wins_and_later_checks_do_not_run() -> None:
    log: list[str] = []
    s = session(Recorder(log, {"rcpt": Verdict(REFUSE)}, "1:"), Recorder(log, {}, "2:"))
    s.command(b"MAIL FROM:<a@b>")
    assert s.command(b"RCPT TO:<x@example.com>") == (REFUSE, CONTINUE)
    assert [x for x in log if "rcpt" in x] == ["1:rcpt x@example.com 0/1 1"]
    assert s.rcptto == []


def test_accept_skips_rcpthosts_and_badmailfrom_stop_does_not() -> None:
    s = session(Recorder([], {"rcpt": ACCEPT, "mail": ACCEPT}), badmailfrom=frozenset({b"bad@x"}))
    s.command(b"MAIL FROM:<bad@x>")
    assert s.command(b"RCPT TO:<y@elsewhere.example>") == (replies.OK, CONTINUE)
    assert s.rcptto == [b"y@elsewhere.example"]
    s = session(Recorder([], {"rcpt": Verdict(stop=True), "mail": Verdict(stop=True)}),
                badmailfrom=frozenset({b"bad@x"}))
    s.command(b"MAIL FROM:<bad@x>")
    assert s.command(b"RCPT TO:<y@example.com>") == (replies.BADMAILFROM, CONTINUE)
    s.command(b"MAIL FROM:<good@x>")
    assert s.command(b"RCPT TO:<y@elsewhere.example>") == (replies.NOGATEWAY, CONTINUE)


def test_headers_address_before_and_drop() -> None:
    log: list[str] = []
    first = Recorder(log, {"rcpt": Verdict(header=b"X-One: 1\n", address=b"new@example.com", before=b"250-hi\r\n")})
    second = Recorder(log, {"data": Verdict(header=b"X-Two: 2\n")}, "2:")
    s = session(first, second)
    s.command(b"MAIL FROM:<a@b>")
    assert s.command(b"RCPT TO:<old@example.com>") == (b"250-hi\r\n" + replies.OK, CONTINUE)
    assert "2:rcpt new@example.com 0/1 1" in log  # the next check saw the new address
    assert s.rcptto == [b"new@example.com"]
    assert s.command(b"DATA") == (b"", DATA)
    assert s.headers == [b"X-One: 1\n", b"X-Two: 2\n"]
    s.message_done()
    assert s.headers == []
    s = session(Recorder([], {"helo": Verdict(b"421 bye\r\n", drop=True), "mail": Verdict(drop=True)}))
    assert s.command(b"HELO x") == (b"421 bye\r\n", DROP)
    assert s.command(b"MAIL FROM:<a@b>") == (b"", DROP)


def test_relay_granted_by_a_check_reaches_the_environment() -> None:
    env: dict[bytes, bytes] = {}
    s = session(Recorder([], {"mail": Verdict(relay=True)}), setenv=env.__setitem__)
    assert not s.relaying
    s.command(b"MAIL FROM:<a@b>")
    assert s.relaying and env == {b"RELAYCLIENT": b""}
    assert s.command(b"RCPT TO:<y@elsewhere.example>") == (replies.OK, CONTINUE)


def test_bad_recipient_limit() -> None:
    s = session(Recorder([], {"rcpt": Verdict(REFUSE, badrcpt=True)}), brtlimit=3)
    s.command(b"MAIL FROM:<a@b>")
    assert s.command(b"RCPT TO:<1@example.com>") == (REFUSE, CONTINUE)
    assert s.command(b"RCPT TO:<2@example.com>") == (REFUSE, CONTINUE)
    assert s.command(b"RCPT TO:<3@example.com>") == (replies.BRTLIMIT, DIE)
    s = session(Recorder([], {"rcpt": Verdict(REFUSE)}), brtlimit=1)  # not counted
    s.command(b"MAIL FROM:<a@b>")
    assert s.command(b"RCPT TO:<1@example.com>") == (REFUSE, CONTINUE)


def test_auth_hook_refusal_undoes_the_login() -> None:
    from pyqmail.smtpd.auth import Policy

    log: list[str] = []
    s = session(Recorder(log, {"auth": Verdict(b"535 not you (#5.7.1)\r\n")}),
                auth=Policy.from_env(b""))
    assert s.authenticated(b"joe") == (b"535 not you (#5.7.1)\r\n", CONTINUE)
    assert s.authuser is None and not s.relaying and log == ["auth joe"]
    s = session(Recorder([]), auth=Policy.from_env(b""))
    assert s.authenticated(b"joe") == (replies.AUTH_OK, CONTINUE)
    assert s.authuser == b"joe" and s.relaying


@pytest.mark.parametrize("tls, auth, forcetls, lines", [
    (False, None, False, [b"PIPELINING", b"8BITMIME"]),
    (True, None, False, [b"STARTTLS", b"PIPELINING", b"8BITMIME"]),
    (False, b"", False, [b"PIPELINING", b"8BITMIME", b"AUTH LOGIN PLAIN", b"SIZE 0"]),
    (True, b"+cram", True, [b"STARTTLS", b"PIPELINING", b"8BITMIME", b"SIZE 0"]),
])  # the old replies' keywords: SIZE and CHUNKING only when switched on (control/smtpsize, control/chunking)
def test_ehlo_keywords_match_the_old_replies(tls: bool, auth: bytes | None, forcetls: bool,
                                              lines: list[bytes]) -> None:
    from pyqmail.smtpd.auth import Policy

    policy_ = Policy.from_env(auth)
    s = session(starttls=(lambda: True) if tls else None, auth=policy_, forcetls=forcetls)
    assert s.ehlo_keywords() == lines
    reply, _ = s.command(b"EHLO x")
    old = (replies.ehlo(GREETING, tls) if policy_ is None
           else replies.ehlo_auth(GREETING, tls, None if forcetls else policy_.line(), 0))
    assert reply == old


def test_receive_policy(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from pyqmail.smtpd import receive

    home = Path(str(tmp_path))
    (home / "control").mkdir()
    (home / "control" / "databytes").write_text("1000\n")
    (home / "control" / "badmailfrom").write_text("Bad@X\n@evil.example\n")
    (home / "control" / "rcpthosts").write_text("example.com\n")
    from pyqmail import home as _home

    monkeypatch.setenv("QMAILHOME", str(home))
    _home.reset()
    monkeypatch.setattr(_home, "_home", None, raising=False)
    r = receive.Receive.load({b"RELAYCLIENT": b"+r"})
    assert (r.databytes, r.relayclient) == (1000, b"+r")
    assert r.allowed(b"a@example.com") and not r.allowed(b"a@other.example")
    assert receive.badmailfrom(r.badmailfrom, b"bad@x") and receive.badmailfrom(r.badmailfrom, b"a@EVIL.example")
    assert not receive.badmailfrom(r.badmailfrom, b"good@x")
    assert receive.Receive.load({b"DATABYTES": b"4294967295"}, badmailfrom=False).databytes == 4294967294
    assert receive.Receive.load({}, badmailfrom=False).badmailfrom is None


def test_checks_that_say_nothing_change_nothing() -> None:
    """Property: a session with a check returning None at every hook answers every command sequence
    exactly as one without checks (hypothesis, the fuzz suite's command strategy)."""
    from hypothesis import given
    from hypothesis import strategies as st

    from fuzzkit import bounded
    from test_fuzz_smtpd import COMMAND, _session

    class Silent(Check):
        def connect(self, s: policy.View) -> Verdict | None:
            return None

        def helo(self, s: policy.View, name: bytes) -> Verdict | None:
            return None

        def mail(self, s: policy.View, addr: bytes) -> Verdict | None:
            return None

        def rcpt(self, s: policy.View, addr: bytes) -> Verdict | None:
            return None

        def data(self, s: policy.View) -> Verdict | None:
            return None

        def reset(self, s: policy.View) -> None:
            return None

    @given(st.lists(COMMAND, max_size=30), st.sampled_from([None, b"", b"+relay"]))
    @bounded
    def same(lines: list[bytes], relay: bytes | None) -> None:
        plain, hooked = _session(relay), _session(relay)
        hooked.cfg.hooks = Hooks([Silent()])
        assert hooked.connect() == plain.connect()
        for line in lines:
            assert hooked.command(line) == plain.command(line), line
            if hooked.seenmail:
                assert hooked.rcptto == plain.rcptto
        assert (hooked.mailfrom, hooked.helohost, hooked.relayclient) == (plain.mailfrom, plain.helohost,
                                                                          plain.relayclient)

    same()


def test_a_check_module_with_triggers_is_imported_only_when_one_is_there(tmp_path: object) -> None:
    import subprocess
    import sys
    from pathlib import Path

    home = Path(str(tmp_path))
    (home / "control").mkdir()
    code = ("import sys\nfrom pyqmail.smtpd import policy\npolicy.load({})\n"
            "print('pyqmail.smtpd.spp' in sys.modules)\n")
    env = {"PATH": "/usr/bin:/bin", "QMAILHOME": str(home)}
    out = subprocess.run([sys.executable, "-I", "-c", code], env=env, capture_output=True, check=True)
    assert out.stdout == b"False\n", out.stderr
    (home / "control" / "smtpplugins").write_text("[rcpt]\n:echo N\n")
    out = subprocess.run([sys.executable, "-I", "-c", code], env=env, capture_output=True, check=True)
    assert out.stdout == b"True\n", out.stderr
