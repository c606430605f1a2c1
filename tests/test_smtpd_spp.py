"""qmail-spp in qmail-smtpd (issue 15.3): control/smtpplugins, the plugins' environment and answers,
with smtplib and swaks as clients; a plugin that hangs or crashes is a 451, never an accepted message."""

from __future__ import annotations

import shutil
import smtplib
import time

import pytest

from conftest import CI, QHome, expect, run
from smtpdkit import Conversation, ForkServer, queued
from test_smtpd import GREETING, TCP, assert_empty_queue, no_certificate

from pyqmail.smtpd import replies


@pytest.fixture(autouse=True)
def _no_leftover_servers():
    yield
    Conversation.close_all()


def plugin(qhome: QHome, name: str, body: str) -> str:
    """Write an executable sh plugin in the home; return its path relative to the home."""
    p = qhome.path / "plugins" / name
    p.parent.mkdir(exist_ok=True)
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return f"plugins/{name}"


def plugins(qhome: QHome, **sections: list[str]) -> None:
    text = "# qmail-spp plugins\n"
    for section, programs in sections.items():
        text += f"[{section}]\n" + "".join(p + "\n" for p in programs)
    qhome.control("smtpplugins", text)


def talk(qhome: QHome, **env: str) -> Conversation:
    c = Conversation(qhome.bin("qmail-smtpd"), dict(TCP, **env))
    assert c.line() == GREETING
    return c


def say(c: Conversation, *pairs: tuple[bytes, bytes]) -> None:
    for command, answer in pairs:
        c.send(command)
        assert c.reply() == answer, command


def three_plugins(qhome: QHome) -> None:
    """A HELO plugin refusing one name, a MAIL plugin adding a header, a RCPT plugin that refuses one
    recipient and accepts another past rcpthosts (O), logging its environment; a DATA plugin adding a header."""
    log = qhome.path / "plugins.log"
    plugins(qhome,
            helo=[plugin(qhome, "helo", 'case "$SMTPHELOHOST" in bad.example) echo "E550 go away, $SMTPHELOHOST";; esac')],
            mail=[plugin(qhome, "mail", 'echo "HX-SPP-From: $SMTPMAILFROM"\necho N')],
            rcpt=[plugin(qhome, "rcpt",
                         f'echo "$SMTPRCPTTO $SMTPRCPTCOUNT $SMTPRCPTCOUNTALL $SMTPRCPTHOSTSOK $TCPREMOTEIP" >> {log}\n'
                         'case "$SMTPRCPTTO" in\n'
                         '  spam@*) echo "E550 no spam here (#5.7.1)";;\n'
                         '  *@friend.example) echo O;;\n'
                         'esac'),
                  ":echo should-not-run >&2; echo E451 second plugin ran"],
            data=[plugin(qhome, "data", 'echo "HX-SPP-Count: $SMTPRCPTCOUNT"')])


def test_three_plugins_with_smtplib(qhome: QHome) -> None:
    no_certificate(qhome)
    three_plugins(qhome)
    with ForkServer(qhome.bin("qmail-smtpd")) as srv:
        with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="bad.example", timeout=30) as s:
            assert s.ehlo() == (550, b"go away, bad.example")
            assert s.helo("good.example")[0] == 250
            assert s.mail("alice@client.example") == (250, b"ok")
            assert s.rcpt("spam@test.example.com") == (550, b"no spam here (#5.7.1)")
            assert s.rcpt("bob@friend.example") == (250, b"ok")  # O: past rcpthosts
            assert s.rcpt("carol@test.example.com") == (451, b"second plugin ran")  # no O/N: the next one runs
            code, _ = s.data(b"Subject: spp\r\n\r\nbody\r\n")
            assert code == 250
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"alice@client.example", [b"bob@friend.example"])
    head = mess.split(b"\n\n", 1)[0].split(b"\n")
    assert head[1].startswith(b"Received: from unknown (HELO good.example)")  # [0] is qmail-queue's
    assert head[3:5] == [b"X-SPP-From: alice@client.example", b"X-SPP-Count: 1"]  # after Received, as the patch
    log = (qhome.path / "plugins.log").read_text().splitlines()
    assert log == ["spam@test.example.com 0 1 1 127.0.0.1", "bob@friend.example 0 2 0 127.0.0.1",
                   "carol@test.example.com 1 3 1 127.0.0.1"]


def test_three_plugins_with_swaks(qhome: QHome) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        if CI:
            pytest.fail("swaks is missing: .ci/run must install Debian's swaks")
        pytest.skip("swaks not installed")
    no_certificate(qhome)
    three_plugins(qhome)
    with ForkServer(qhome.bin("qmail-smtpd")) as srv:
        base = [swaks, "--server", "127.0.0.1", "--port", str(srv.port), "--from", "s@swaks.example",
                "--header", "Subject: from swaks", "--body", "swaks body"]
        res = run([*base, "--helo", "bad.example", "--to", "r@test.example.com"], timeout=60)
        assert b"<** 550 go away, bad.example" in res.stdout, res.explain()
        res = run([*base, "--helo", "swaks.example", "--to", "spam@test.example.com"], timeout=60)
        assert b"<** 550 no spam here (#5.7.1)" in res.stdout, res.explain()
        assert_empty_queue(qhome)
        res = expect(run([*base, "--helo", "swaks.example", "--to", "x@friend.example"], timeout=60))
        assert b"<-  250 ok " in res.stdout, res.explain()
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"s@swaks.example", [b"x@friend.example"])
    # SMTPRCPTCOUNT is set before each RCPT's plugins run (as the patch): the DATA plugin sees 0 here.
    assert b"\nX-SPP-From: s@swaks.example\nX-SPP-Count: 0\n" in mess and b"\nswaks body\n" in mess, mess


def test_hang_and_crash_are_temporary_failures(qhome: QHome) -> None:
    hang = plugin(qhome, "hang", "sleep 30")
    crash = plugin(qhome, "crash", "echo HX-Never: seen\nkill -SEGV $$")
    plugins(qhome, rcpt=[hang], data=[crash])
    c = talk(qhome, SPPTIMEOUT="1")
    say(c, (b"HELO x\r\n", b"250 test.example.com\r\n"), (b"MAIL FROM:<a@b>\r\n", replies.OK))
    t = time.monotonic()
    c.send(b"RCPT TO:<r@test.example.com>\r\n")
    assert c.reply() == b"451 qmail-spp failure: " + hang.encode() + b": plugin timed out (#4.3.0)\r\n"
    assert 0.9 < time.monotonic() - t < 10
    plugins(qhome, mail=[crash])
    c = talk(qhome)
    say(c, (b"MAIL FROM:<a@b>\r\n", b"451 qmail-spp failure: " + crash.encode() + b": child crashed (#4.3.0)\r\n"),
        (b"RCPT TO:<r@test.example.com>\r\n", replies.WANT_MAIL))
    plugins(qhome, data=[crash])
    c = talk(qhome)
    say(c, (b"MAIL FROM:<a@b>\r\n", replies.OK), (b"RCPT TO:<r@test.example.com>\r\n", replies.OK),
        (b"DATA\r\n", b"451 qmail-spp failure: " + crash.encode() + b": child crashed (#4.3.0)\r\n"),
        (b"QUIT\r\n", b"221 test.example.com\r\n"))
    plugins(qhome, data=["plugins/missing"])
    c = talk(qhome)
    say(c, (b"MAIL FROM:<a@b>\r\n", replies.OK), (b"RCPT TO:<r@test.example.com>\r\n", replies.OK),
        (b"DATA\r\n", b"451 qmail-spp failure: plugins/missing: can't execute (#4.3.0)\r\n"))
    assert_empty_queue(qhome)


def test_answers_p_c_s_l_a_r_d_and_nospp(qhome: QHome) -> None:
    rcpt = plugin(qhome, "rcpt",
                  'case "$SMTPRCPTTO" in\n'
                  '  old@*) echo Cnew@test.example.com; echo "P250-redirected"; echo "Sseen=$SMTPRCPTTO"; echo N;;\n'
                  '  later@*) echo "LD554 refused at DATA (#5.7.1)";;\n'
                  '  off@*) echo A;;\n'
                  '  env@*) echo "E550 seen=$seen";;\n'
                  '  bye@*) echo "R421 bye (#4.3.0)";;\n'
                  '  quiet@*) echo D;;\n'
                  'esac')
    plugins(qhome, rcpt=[rcpt])
    c = talk(qhome)
    say(c, (b"MAIL FROM:<a@b>\r\n", replies.OK),
        (b"RCPT TO:<old@test.example.com>\r\n", b"250-redirected\r\n250 ok\r\n"),
        (b"RCPT TO:<env@test.example.com>\r\n", b"550 seen=old@test.example.com\r\n"),
        (b"RCPT TO:<later@test.example.com>\r\n", replies.OK),
        (b"DATA\r\n", b"554 refused at DATA (#5.7.1)\r\n"),
        (b"RSET\r\n", replies.FLUSHED),
        (b"MAIL FROM:<a@b>\r\n", replies.OK),
        (b"RCPT TO:<off@test.example.com>\r\n", replies.OK),
        (b"RCPT TO:<bye@test.example.com>\r\n", replies.OK))  # after A no plugin runs
    c = talk(qhome)
    say(c, (b"MAIL FROM:<a@b>\r\n", replies.OK))
    c.send(b"RCPT TO:<bye@test.example.com>\r\nNOOP\r\n")
    assert c.rest() == b"421 bye (#4.3.0)\r\n"
    assert c.finish()[0] == 0
    c = talk(qhome)
    say(c, (b"MAIL FROM:<a@b>\r\n", replies.OK))
    c.send(b"RCPT TO:<quiet@test.example.com>\r\n")
    assert c.rest() == b""
    c = talk(qhome, NOSPP="1")
    say(c, (b"MAIL FROM:<a@b>\r\n", replies.OK), (b"RCPT TO:<bye@test.example.com>\r\n", replies.OK))
    plugins(qhome, connection=[":echo 'E554 not from you'"])
    c = Conversation(qhome.bin("qmail-smtpd"), TCP)
    assert c.line() == b"554 not from you\r\n"
    say(c, (b"QUIT\r\n", b"221 test.example.com\r\n"))
    qhome.control("smtpplugins", "[rcpt]\nplugins/rcpt\n")
    (qhome.path / "control" / "smtpplugins").chmod(0)
    if run(["id", "-u"]).stdout.strip() != b"0":  # root reads any file
        c = Conversation(qhome.bin("qmail-smtpd"), TCP)
        assert c.line() == replies.CONTROL


def test_auth_section_sees_the_user_and_can_refuse(qhome: QHome) -> None:
    import base64

    no_certificate(qhome)
    check = plugin(qhome, "checkprogram", 'cat <&3 >/dev/null\nexec "$@"')  # accepts anyone
    smtpd = qhome.path / "smtpd-auth"
    smtpd.write_text(f"#!/bin/sh\nexec {qhome.bin('qmail-smtpd')} {qhome.path / check} /bin/true\n")
    smtpd.chmod(0o755)
    auth = plugin(qhome, "auth", 'case "$SMTPAUTHUSER" in\n  mallory) echo "E535 not you (#5.7.1)";;\n'
                                 '  *) echo "HX-Auth: $SMTPAUTHUSER";;\nesac')
    plugins(qhome, auth=[auth])
    env = dict(TCP, SMTPAUTH="", PYQMAIL_SMTPD_AUTH_DELAY="0")

    def login(user: str) -> Conversation:
        c = Conversation(smtpd, env)
        assert c.line() == GREETING
        c.send(b"AUTH PLAIN " + base64.b64encode(b"\0" + user.encode() + b"\0pw") + b"\r\n")
        return c

    c = login("mallory")
    assert c.reply() == b"535 not you (#5.7.1)\r\n"
    say(c, (b"MAIL FROM:<m@x>\r\n", replies.OK), (b"RCPT TO:<r@elsewhere.example>\r\n", replies.NOGATEWAY))
    c = login("joe")
    assert c.reply() == replies.AUTH_OK
    say(c, (b"MAIL FROM:<j@x>\r\n", replies.OK), (b"RCPT TO:<r@elsewhere.example>\r\n", replies.OK),
        (b"DATA\r\n", replies.GO_AHEAD))
    c.send(b"Subject: a\r\n\r\nx\r\n.\r\n")
    assert c.reply().startswith(b"250 ok ")
    ((mess, _, rcpts),) = queued(qhome.queue)
    assert rcpts == [b"r@elsewhere.example"] and b"\nX-Auth: joe\n" in mess
