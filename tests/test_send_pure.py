"""qmail-send's pure pieces: log texts, retry schedule, rewriting, bounce texts, pipe protocols."""

from __future__ import annotations

import pytest

from pyqmail.send import bounce, log, schedule, spawnproto
from pyqmail.send.schedule import LOCAL, REMOTE, Rewriter


# --- log texts -----------------------------------------------------------------------

def test_logsafe_turns_newlines_to_slashes_and_unsafe_bytes_to_underscores() -> None:
    assert log.safe(b"did 0+1+0\n") == b"did_0+1+0/"
    assert log.safe(b"a\tb%c\x7fd\xffe~!") == b"a_b_c_d_e~!"
    assert log.safe(b"cut\0here") == b"cut"
    assert log.safe(b"") == b""


def test_log_lines_of_the_book_example() -> None:
    assert log.new_msg(96025) == b"new msg 96025\n"
    assert log.info_msg(96025, 9956, b"user@example.com", 16296, 101) == \
        b"info msg 96025: bytes 9956 from <user@example.com> qp 16296 uid 101\n"
    assert log.starting(1461, 96025, LOCAL, b"me@mydomain.com") == \
        b"starting delivery 1461: msg 96025 to local me@mydomain.com\n"
    assert log.status((1, 0), (10, 20)) == b"status: local 1/10 remote 0/20\n"
    assert log.success(1461, b"did 1+0+2\n") == b"delivery 1461: success: did_1+0+2/\n"
    assert log.end_msg(96025) == b"end msg 96025\n"


def test_other_log_lines() -> None:
    assert log.starting(2, 7, REMOTE, b"a b@c") == b"starting delivery 2: msg 7 to remote a_b@c\n"
    assert log.status([0, 0], [10, 20], exiting=True) == b"status: local 0/10 remote 0/20 exitasap\n"
    assert log.deferral(3, b"Sorry.\n") == b"delivery 3: deferral: Sorry./\n"
    assert log.failure(3, b"No mailbox. (#5.1.1)\n") == b"delivery 3: failure: No_mailbox._(#5.1.1)/\n"
    assert log.mangled(4) == b"delivery 4: report mangled, will defer\n"
    assert log.bounce_msg(5, 1234) == b"bounce msg 5 qp 1234\n"
    assert log.triple_bounce(b"bounce/5") == b"triple bounce: discarding bounce/5\n"
    assert log.clean_trouble(b"todo/5") == b"warning: qmail-clean unable to clean up todo/5\n"
    assert log.info_msg(1, 0, b"", 2, 3) == b"info msg 1: bytes 0 from <> qp 2 uid 3\n"
    assert log.opendir(b"todo") == b"alert: unable to opendir todo, sleeping...\n"
    assert log.unable(b"stat", b"info/1/1", later=True) == b"warning: unable to stat info/1/1; will try again later\n"
    assert log.trouble_marking(b"local/1/1") == b"warning: trouble marking local/1/1; message will be delivered twice!\n"
    assert log.utime_trouble(b"local/1/1") == b"warning: unable to utime local/1/1; message will be retried too soon\n"
    assert log.LOST_SPAWN == b"alert: oh no! lost spawn connection! dying...\n"
    assert log.LOST_CLEAN == b"alert: oh no! lost qmail-clean connection! dying...\n"


# --- retry schedule ---------------------------------------------------------------------

def test_local_retries_at_0_100_400_900_seconds() -> None:
    birth = 1_000_000
    t = birth
    seen = []
    for _ in range(5):
        t = schedule.next_retry(birth, t, LOCAL)
        seen.append(t - birth)
    assert seen == [100, 400, 900, 1600, 2500]


def test_remote_retries_at_0_400_1600_seconds() -> None:
    birth = 5000
    assert schedule.next_retry(birth, birth, REMOTE) == birth + 400
    assert schedule.next_retry(birth, birth + 400, REMOTE) == birth + 1600
    assert schedule.next_retry(birth, birth + 1600, REMOTE) == birth + 3600


def test_retry_uses_qmails_formula_between_steps() -> None:
    # isqrt(150) = 12, + 10 = 22: next try at 484 s, not at 400.
    assert schedule.next_retry(0, 150, LOCAL) == 484
    # A birth in the future (clock skew) counts as no time spent.
    assert schedule.next_retry(100, 50, LOCAL) == 200
    assert schedule.squareroot(0) == 0 and schedule.squareroot(99) == 9 and schedule.squareroot(100) == 10


def test_queue_lifetime() -> None:
    assert not schedule.dying(1000, 1000 + 604800, 604800)
    assert schedule.dying(1000, 1000 + 604801, 604800)
    assert schedule.dying(0, 1, 0)


# --- rewriting -----------------------------------------------------------------------------

BOOK_VDOMS = [b"example.com:foo", b".example.com:foo-bar", b"two.example.com:baz",
              b"waldo@domain.com:qux", b"domain.com:", b":garply"]


def book() -> Rewriter:
    return Rewriter(b"test.example.org", [b"test.example.org"], virtualdomains=BOOK_VDOMS)


@pytest.mark.parametrize("recip, want", [
    (b"user@example.com", (LOCAL, b"foo-user@example.com")),
    (b"user@something.example.com", (LOCAL, b"foo-bar-user@something.example.com")),
    (b"user@two.example.com", (LOCAL, b"baz-user@two.example.com")),
    (b"waldo@domain.com", (LOCAL, b"qux-waldo@domain.com")),
    (b"someone@domain.com", (REMOTE, b"someone@domain.com")),
    (b"someone@somewhere.org", (LOCAL, b"garply-someone@somewhere.org")),
    (b"USER@Example.COM", (LOCAL, b"foo-USER@Example.COM")),
    (b"Waldo@DOMAIN.com", (LOCAL, b"qux-Waldo@DOMAIN.com")),
    (b"a.b@x.two.example.com", (LOCAL, b"foo-bar-a.b@x.two.example.com")),
    (b"me@test.example.org", (LOCAL, b"me@test.example.org")),
])
def test_virtualdomains_example_of_the_book(recip: bytes, want: tuple[int, bytes]) -> None:
    assert book().rewrite(recip) == want


def test_locals_win_over_virtualdomains_and_compare_without_case() -> None:
    rw = Rewriter(b"h", [b"Example.COM"], virtualdomains=[b"example.com:foo"])
    assert rw.rewrite(b"x@EXAMPLE.com") == (LOCAL, b"x@EXAMPLE.com")
    assert rw.rewrite(b"x@other") == (REMOTE, b"x@other")


def test_address_without_at_gets_envnoathost() -> None:
    rw = Rewriter(b"envhost.example", [b"envhost.example"])
    assert rw.rewrite(b"joe") == (LOCAL, b"joe@envhost.example")
    assert rw.rewrite(b"") == (LOCAL, b"@envhost.example")
    rw = Rewriter(b"elsewhere", [b"here"])
    assert rw.rewrite(b"joe") == (REMOTE, b"joe@elsewhere")


def test_percenthack_repeats_while_the_domain_is_listed() -> None:
    rw = Rewriter(b"h", [b"here"], percenthack=[b"relay.example", b"inner.example"])
    assert rw.rewrite(b"user%fqdn.example@relay.example") == (REMOTE, b"user@fqdn.example")
    assert rw.rewrite(b"a%b%inner.example@relay.example") == (REMOTE, b"a@b")
    assert rw.rewrite(b"a%here@RELAY.example") == (LOCAL, b"a@here")
    assert rw.rewrite(b"nopct@relay.example") == (REMOTE, b"nopct@relay.example")
    assert rw.rewrite(b"a%b@other.example") == (REMOTE, b"a%b@other.example")
    # No '@': envnoathost first, then the percent hack on it.
    rw = Rewriter(b"relay.example", [], percenthack=[b"relay.example"])
    assert rw.rewrite(b"x%y") == (REMOTE, b"x@y")


def test_virtualdomains_last_entry_wins_and_lines_without_colon_are_ignored() -> None:
    rw = Rewriter(b"h", [], virtualdomains=[b"d.example:one", b"nocolon", b"D.example:two"])
    assert rw.rewrite(b"u@d.example") == (LOCAL, b"two-u@d.example")
    assert rw.rewrite(b"u@nocolon") == (REMOTE, b"u@nocolon")


def test_virtualdomains_prepend_may_hold_colons() -> None:
    rw = Rewriter(b"h", [], virtualdomains=[b"d.example:a:b"])
    assert rw.rewrite(b"u@d.example") == (LOCAL, b"a:b-u@d.example")


def test_recipientmap_before_locals() -> None:
    rw = Rewriter(b"h", [b"here"], recipientmap=[b"old@gone.example:new@here", b"x@here:y@far.example"])
    assert rw.rewrite(b"old@gone.example") == (LOCAL, b"new@here")
    assert rw.rewrite(b"OLD@Gone.example") == (LOCAL, b"new@here")
    assert rw.rewrite(b"x@here") == (REMOTE, b"y@far.example")


def test_hup_reread_replaces_locals_and_virtualdomains() -> None:
    rw = Rewriter(b"h", [b"a.example"])
    assert rw.rewrite(b"u@b.example") == (REMOTE, b"u@b.example")
    rw.reread([b"b.example"], [b"c.example:cc"])
    assert rw.rewrite(b"u@b.example") == (LOCAL, b"u@b.example")
    assert rw.rewrite(b"u@a.example") == (REMOTE, b"u@a.example")
    assert rw.rewrite(b"u@c.example") == (LOCAL, b"cc-u@c.example")


def test_strip_virtualdomains_prepend_for_bounces() -> None:
    rw = book()
    assert rw.strip_prepend(b"foo-user@example.com") == b"user@example.com"
    assert rw.strip_prepend(b"foo-bar-user@something.example.com") == b"user@something.example.com"
    assert rw.strip_prepend(b"other-user@example.com") == b"other-user@example.com"
    assert rw.strip_prepend(b"garply-x@somewhere.org") == b"x@somewhere.org"
    assert rw.strip_prepend(b"someone@domain.com") == b"someone@domain.com"
    assert rw.strip_prepend(b"noat") == b"noat"


def test_verp_sender_per_recipient() -> None:
    assert schedule.verp_sender(b"owner-@list.example-@[]", b"joe@far.example") == \
        b"owner-joe=far.example@list.example"
    assert schedule.verp_sender(b"a@b", b"joe@far") == b"a@b"
    assert schedule.verp_sender(b"owner-@list-@[]", b"noat") == b"owner-@list-@[]"
    assert schedule.verp_sender(b"noat-@[]", b"joe@far") == b"noat-@[]"
    assert schedule.verp_sender(b"-@[]", b"j@f") == b"-@[]"
    assert schedule.verp_sender(b"@-@[]", b"j@f") == b"j=f@"


# --- bounce texts --------------------------------------------------------------------

def test_bounce_paragraph() -> None:
    assert bounce.paragraph(b"joe@x.example", b"Sorry, no mailbox here by that name. (#5.1.1)\n") == \
        b"<joe@x.example>:\nSorry, no mailbox here by that name. (#5.1.1)\n\n"
    assert bounce.paragraph(b"joe@x", b"no newline") == b"<joe@x>:\nno newline\n\n"
    assert bounce.paragraph(b"joe@x", b"") == b"<joe@x>:\n\n"
    assert bounce.paragraph(b"a\nb@x", b"one\n\ntwo\n\n\nthree\n") == b"<a_b@x>:\none\n/two\n//three\n\n"


def test_single_bounce_text_exactly() -> None:
    failures = bounce.paragraph(b"nobody@test.example", b"Sorry, no mailbox here by that name. (#5.1.1)\n")
    bsender, brecip, text = bounce.notice(
        b"22 Nov 2026 15:23:38 -0000", b"MAILER-DAEMON", b"test.example", b"joe@far.example",
        b"postmaster@test.example", failures, b"Received: x\n\nbody\n")
    assert (bsender, brecip) == (b"", b"joe@far.example")
    assert text == (
        b"Date: 22 Nov 2026 15:23:38 -0000\n"
        b"From: MAILER-DAEMON@test.example\n"
        b"To: joe@far.example\n"
        b"Subject: failure notice\n"
        b"\n"
        b"Hi. This is the qmail-send program at test.example.\n"
        b"I'm afraid I wasn't able to deliver your message to the following addresses.\n"
        b"This is a permanent error; I've given up. Sorry it didn't work out.\n"
        b"\n"
        b"<nobody@test.example>:\n"
        b"Sorry, no mailbox here by that name. (#5.1.1)\n"
        b"\n"
        b"--- Below this line is a copy of the message.\n"
        b"\n"
        b"Return-Path: <joe@far.example>\n"
        b"Received: x\n\nbody\n")


def test_double_bounce_text_exactly() -> None:
    bsender, brecip, text = bounce.notice(
        b"1 Jan 2027 00:00:00 -0000", b"MAILER-DAEMON", b"h.example", b"", b"postmaster@h.example",
        b"<joe@far>:\nbad\n\n", b"M\n")
    assert (bsender, brecip) == (b"#@[]", b"postmaster@h.example")
    assert text == (
        b"Date: 1 Jan 2027 00:00:00 -0000\n"
        b"From: MAILER-DAEMON@h.example\n"
        b"To: postmaster@h.example\n"
        b"Subject: failure notice\n"
        b"\n"
        b"Hi. This is the qmail-send program at h.example.\n"
        b"I tried to deliver a bounce message to this address, but the bounce bounced!\n"
        b"\n"
        b"<joe@far>:\nbad\n\n"
        b"--- Below this line is the original bounce.\n"
        b"\n"
        b"Return-Path: <>\n"
        b"M\n")


def test_bounce_quoting_and_verp_and_triple() -> None:
    assert bounce.quote2(b"a b@c") == b'"a b"@c'
    assert bounce.quote2(b'x"y@c') == b'"x\\"y"@c'
    assert bounce.quote2(b"") == b""
    assert bounce.quote2(b"plain") == b"plain"
    assert bounce.quote(b"") == b'""'
    assert bounce.quote(b".a") == b'".a"' and bounce.quote(b"a..b") == b'"a..b"'
    head = bounce.head(b"D", b"MAILER DAEMON", b"h", b"a b@c", False)
    assert b"From: \"MAILER DAEMON\"@h\nTo: \"a b\"@c\n" in head
    assert bounce.vanilla_sender(b"owner-@list-@[]") == b"owner-@list"
    assert bounce.vanilla_sender(b"x@y") == b"x@y"
    assert bounce.is_triple(b"#@[]") and not bounce.is_triple(b"")


# --- pipe protocols ----------------------------------------------------------------------

def test_command_reader_across_chunks_and_slot_zero() -> None:
    data = spawnproto.command(0, b"3/12345", b"a@b", b"c@d") + spawnproto.command(7, b"1/1", b"", b"e@f")
    for size in (1, 2, 5, len(data)):
        rd = spawnproto.CommandReader()
        got = []
        for i in range(0, len(data), size):
            got += list(rd.feed(data[i:i + size]))
        assert got == [(0, b"3/12345", b"a@b", b"c@d", True), (7, b"1/1", b"", b"e@f", True)]


def test_command_reader_refuses_an_overlong_field_but_keeps_the_slot() -> None:
    rd = spawnproto.CommandReader()
    big = b"x" * (spawnproto.FIELD_MAX + 1)
    got = list(rd.feed(b"\x05" + b"1/1\0" + big + b"\0r@h\0"))
    assert got == [(5, b"1/1", b"", b"r@h", False)]
    assert list(rd.feed(spawnproto.command(6, b"1/1", b"s", b"r@h"))) == [(6, b"1/1", b"s", b"r@h", True)]


def test_report_reader() -> None:
    rd = spawnproto.ReportReader()
    stream = b"\x00Kdid 0+1+0\n\x00" + b"\x03Zlater\x00" + b"\x04\x00"
    got = []
    for b in stream:
        got += list(rd.feed(bytes([b])))
    assert got == [(0, b"Kdid 0+1+0\n"), (3, b"Zlater"), (4, b"")]
    rd = spawnproto.ReportReader()
    (slot, rep), = list(rd.feed(b"\x01D" + b"y" * 20000 + b"\x00"))
    assert slot == 1 and len(rep) == spawnproto.REPORTMAX - 1


def test_messid_checks() -> None:
    assert spawnproto.valid_messid(b"3/12345") is None
    assert spawnproto.valid_messid(b"/3") == spawnproto.ERR_MESSID_DIGITS
    assert spawnproto.valid_messid(b"3/../x") == spawnproto.ERR_MESSID_DIGITS
    assert spawnproto.valid_messid(b"1" * 99) is None
    assert spawnproto.valid_messid(b"1" * 100) == spawnproto.ERR_MESSID_LONG
    assert spawnproto.valid_messid(b"") == spawnproto.ERR_MESSID_SHORT


def test_truncate_report() -> None:
    out = bytearray(b"x" * 3001)
    spawnproto.truncate(out, 3000)
    assert len(out) == 3000 - 3 and out.endswith(b"\nError report too long, sorry.\n")
    out = bytearray(b"x" * 50)
    spawnproto.truncate(out, 0)
    assert out == b"x" * 50


# --- start-up imports ----------------------------------------------------------------------

@pytest.mark.parametrize("module", ["pyqmail.send.qmail_send", "pyqmail.send.qmail_start",
                                    "pyqmail.remote.qmail_rspawn", "pyqmail.queue.qmail_clean",
                                    "pyqmail.send.spawnproto"])
def test_daemons_import_no_slow_modules(module: str) -> None:
    """Forks of these processes start deliveries and queue bounces: keep them lean."""
    import subprocess
    import sys

    from conftest import ROOT

    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); import {module}; "
            "print(' '.join(m for m in ('typing', 'dataclasses', 'enum', 'signal', 'selectors', "
            "'subprocess', 'asyncio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-IS", "-c", code], capture_output=True, check=True).stdout
    assert out.strip() == b"", out
