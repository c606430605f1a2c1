"""qmail-qfilter (issue 16.2): the filter chain, as a process and behind qmail-smtpd (control/smtpfilters)
and qmail-inject ($QMAILQUEUE): qmail-queue's every exit code and descriptor-6 text pass through
untouched; filters rewrite, reject (31), defer (71), drop (99); a 50 MB message in bounded memory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import QHome, run
from queuefmt import files
from smtpdkit import queued
from test_resource_bounds import PEAK_MIB, measured
from test_smtpd import ACCEPTED, talk

from pyqmail.queue import exits

# Every exit code of qmail-queue(8), and 82 with a D and a Z text on descriptor 6.
CODES = [0, 11, 31, 51, 52, 53, 54, 55, 56, 61, 62, 63, 64, 65, 66, 71, 72, 73, 74, 75, 76, 77, 78, 79, 81, 91]
CUSTOM = [(82, b"Dno thanks, virus found (#5.7.1)"), (82, b"Ztry later, scanner busy (#4.3.0)")]
CASES = [(c, b"") for c in CODES] + CUSTOM


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def fake_queue(tmp: Path, code: int, custom: bytes) -> str:
    """A qmail-queue that reads both descriptors, records what qmail-qfilter set, and exits code."""
    text = "".join("\\%03o" % b for b in custom)
    return script(tmp / "fake-qq", f'cat >"{tmp}/qq.msg"\ncat <&1 >"{tmp}/qq.env"\n'
                  f'echo "$NUMRCPTS" >"{tmp}/qq.seen"\n'
                  + (f"printf '{text}' >&6\n" if custom else "") + f"exit {code}")


def smtp_reply(code: int, custom: bytes) -> bytes | None:
    """The reply qmail-smtpd gives for qmail-queue's code (None: 250 ok)."""
    report = exits.report(code, custom)
    if not report:
        return None
    return (b"554 " if report[:1] == b"D" else b"451 ") + report[1:] + b"\r\n"


def smtp_send(qhome: QHome, env: dict[str, str], data: bytes = b"Subject: hello\r\n\r\nbody\r\n") -> bytes:
    c = talk(qhome, env)
    c.send(b"MAIL FROM:<a@b.example>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\n" + data + b".\r\n")
    got = c.lines(4)
    c.close()
    assert got[:3] == [b"250 ok\r\n", b"250 ok\r\n", b"354 go ahead\r\n"], got
    return got[3]


@pytest.mark.parametrize("code,custom", CASES)
def test_smtpd_chain_passes_every_qmail_queue_answer(qhome: QHome, tmp_path: Path, code: int,
                                                      custom: bytes) -> None:
    """control/smtpfilters puts qmail-qfilter before $QMAILQUEUE; the client hears what qmail-queue said."""
    qq = fake_queue(tmp_path, code, custom)
    qhome.control("smtpfilters", "# two filters that change nothing\n/bin/cat\ncat\n")
    got = smtp_reply(code, custom)
    reply = smtp_send(qhome, {"QMAILQUEUE": qq})
    if got is None:
        assert ACCEPTED.match(reply), reply
    else:
        assert reply == got
    assert (tmp_path / "qq.seen").read_text() == "1\n"  # it ran under qmail-qfilter
    assert (tmp_path / "qq.env").read_bytes() == b"Fa@b.example\0Tu@test.example.com\0\0"
    assert (tmp_path / "qq.msg").read_bytes().endswith(b"\nSubject: hello\n\nbody\n")


@pytest.mark.parametrize("code,custom", CASES)
def test_inject_chain_passes_every_qmail_queue_answer(qhome: QHome, tmp_path: Path, code: int,
                                                       custom: bytes) -> None:
    """$QMAILQUEUE names a script running qmail-qfilter; qmail-inject exits and says as without it."""
    qq = fake_queue(tmp_path, code, custom)
    wrapper = script(tmp_path / "qfilter-wrapper", f"exec {qhome.bin('qmail-qfilter')} /bin/cat -- /bin/cat")
    res = run([qhome.bin("qmail-inject"), "-fme@here.example", "friend@far.example"], input=b"Subject: x\n\nhi\n",
              env={"PATH": "/usr/bin:/bin", "QMAILQUEUE": wrapper, "QQF_QMAILQUEUE": qq})
    report = exits.report(code, custom)
    want = (0, b"") if not report else (100 if report[:1] == b"D" else 111,
                                         b"qmail-inject: fatal: " + report[1:] + b"\n")
    assert (res.returncode, res.stderr) == want, res.explain()
    assert (tmp_path / "qq.seen").read_text() == "1\n"


def test_filters_rewrite_see_the_envelope_and_change_it(qhome: QHome, tmp_path: Path) -> None:
    """A header rewritten and one added, the environment each filter sees, an envelope changed on fd 4."""
    seen = tmp_path / "seen"
    add = script(tmp_path / "add", "echo 'X-Filtered: yes'; cat")
    rewrite = script(tmp_path / "rewrite", "sed -e 's/^Subject: hello$/Subject: rewritten/'")
    look = script(tmp_path / "look", f'echo "$QMAILUSER|$QMAILHOST|$QMAILRCPTS|$NUMRCPTS|$MSGSIZE|$ENVSIZE|'
                  f'${{QMAILNAME-unset}}|$QMAILPPID" >>"{seen}"; cat <&3 >>"{seen}"; echo >>"{seen}"')
    readdress = script(tmp_path / "readdress", "printf 'Fnew@sender.example\\0Tu@test.example.com\\0"
                                               "Tv@test.example.com\\0\\0' >&4")
    qhome.control("smtpfilters", f"{look}\n{add}\n{rewrite}\n{readdress}\n{look}\n")
    reply = smtp_send(qhome, {"QMAILNAME": "Some One"})
    assert ACCEPTED.match(reply), reply
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"new@sender.example", [b"u@test.example.com", b"v@test.example.com"])
    rest = mess.split(b"\n", 1)[1]  # after qmail-queue's Received line
    assert rest.startswith(b"X-Filtered: yes\nReceived: from ") and rest.endswith(b"\nSubject: rewritten\n\nbody\n")
    smtpd_received = rest[len(b"X-Filtered: yes\n"):rest.index(b"Subject: rewritten")]
    first, second = seen.read_bytes().split(b"\0\n")[:2]
    ppid = first.split(b"|")[7].split(b"\n")[0]
    assert ppid.isdigit() and int(ppid) > 1
    envelope = b"Fa@b.example\0Tu@test.example.com\0"
    assert first == (b"a|b.example|u@test.example.com\n|1|%d|%d|unset|%s\n%s"
                     % (len(smtpd_received + b"Subject: hello\n\nbody\n"), len(envelope) + 1, ppid, envelope))
    new_envelope = b"Fnew@sender.example\0Tu@test.example.com\0Tv@test.example.com\0\0"
    assert second == (b"new|sender.example|u@test.example.com\nv@test.example.com\n|2|%d|%d|unset|%s\n%s"
                      % (len(rest), len(new_envelope), ppid, new_envelope[:-1]))


@pytest.mark.parametrize("body,reply", [
    ("cat >/dev/null; exit 31", b"554 mail server permanently rejected message (#5.3.0)\r\n"),
    ("cat >/dev/null; exit 71", b"451 mail server temporarily rejected message (#4.3.0)\r\n"),
    ("printf 'Dvirus found: Eicar-Test-Signature (#5.7.1)' >&6; exit 82",
     b"554 virus found: Eicar-Test-Signature (#5.7.1)\r\n"),
    ("printf 'Zscanner is down (#4.3.0)' >&6; exit 82", b"451 scanner is down (#4.3.0)\r\n"),
    ("exit 99", None),
])
def test_filter_rejects_defers_drops(qhome: QHome, tmp_path: Path, body: str, reply: bytes | None) -> None:
    later = tmp_path / "later-ran"
    qhome.control("smtpfilters", f"{script(tmp_path / 'f', body)}\n{script(tmp_path / 'g', f'touch {later}; cat')}\n")
    got = smtp_send(qhome, {})
    if reply is None:
        assert ACCEPTED.match(got), got  # dropped: the client is told it was taken
    else:
        assert got == reply
    assert not later.exists()
    assert files(qhome.queue)["todo"] == [] and files(qhome.queue)["mess"] == []


def test_large_message_in_bounded_memory(qhome: QHome, tmp_path: Path) -> None:
    """50 MB through qmail-smtpd, qmail-qfilter (a filter and qmail-queue): peak under the bound."""
    qhome.control("smtpfilters", "/bin/cat\n")
    line = b"x" * 1022 + b"\r\n"
    count = 52 * 1024  # 53 MB on the wire, 50 MiB and more queued (LF line ends)
    wire = (b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<u@test.example.com>\r\nDATA\r\nSubject: big\r\n\r\n"
            + line * count + b".\r\nQUIT\r\n")
    code, out, peak = measured(qhome.bin("qmail-smtpd"), wire, {}, tmp_path)
    assert code == 0, out
    assert out.split(b"\r\n")[5].startswith(b"250 ok "), out
    ((mess, _, _),) = queued(qhome.queue)
    assert len(mess) > 50 * 1024 * 1024 and mess.endswith(b"x" * 1022 + b"\n")
    print(f"qmail-smtpd with qmail-qfilter and qmail-queue: {len(mess)} bytes, peak {peak:.1f} MiB")
    assert peak < PEAK_MIB, f"qmail-smtpd with qmail-qfilter peaked at {peak:.1f} MiB"


# --- qmail-qfilter as a process -----------------------------------------------------------------

def qfilter(qhome: QHome, args: list[str], envelope: bytes, env: dict[str, str] | None = None,
            message: bytes = b"Subject: s\n\nhi\n") -> subprocess.CompletedProcess[bytes]:
    r, w = os.pipe()
    os.write(w, envelope)
    os.close(w)
    try:
        return subprocess.run([str(qhome.bin("qmail-qfilter")), *args], input=message, stdout=r,
                              stderr=subprocess.PIPE, timeout=60, env={"PATH": "/usr/bin:/bin", **(env or {})})
    finally:
        os.close(r)


def test_qfilter_failures(qhome: QHome, tmp_path: Path) -> None:
    env = b"Fa@b\0Tc@d\0\0"
    assert qfilter(qhome, ["/bin/cat", "--", "--", "/bin/cat"], env).returncode == 81  # an empty command
    assert qfilter(qhome, ["--", "/bin/cat"], env).returncode == 81
    assert qfilter(qhome, [str(tmp_path / "missing")], env).returncode == 81
    assert qfilter(qhome, [script(tmp_path / "k", "kill -9 $$")], env).returncode == 81
    assert qfilter(qhome, ["/bin/cat"], b"Xa@b\0\0").returncode == 91
    assert qfilter(qhome, ["/bin/cat"], b"Fa@b\0Tc").returncode == 91
    assert qfilter(qhome, ["/bin/cat"], b"F" + b"x" * 2000 + b"\0\0").returncode == 11
    assert files(qhome.queue)["todo"] == []


def test_qfilter_queue_program_choice(qhome: QHome, tmp_path: Path) -> None:
    """$QQF_QMAILQUEUE, else QMAILHOME/bin/qmail-queue; never $QMAILQUEUE; fd 5 overrides both."""
    env = b"Fa@b\0Tu@test.example.com\0\0"
    qq = fake_queue(tmp_path, 0, b"")
    p = qfilter(qhome, ["/bin/cat"], env, {"QMAILQUEUE": str(tmp_path / "missing")})
    assert p.returncode == 0, p.stderr
    assert len(queued(qhome.queue)) == 1  # the real qmail-queue
    assert qfilter(qhome, ["/bin/cat"], env, {"QQF_QMAILQUEUE": qq}).returncode == 0
    assert (tmp_path / "qq.seen").read_text() == "1\n"
    (tmp_path / "qq.seen").unlink()
    other = script(tmp_path / "other", f"cat >/dev/null; touch {tmp_path}/other-ran; exit 31")
    p = qfilter(qhome, ["/bin/cat", "--", script(tmp_path / "f5", f"printf '{other}\\0junk' >&5")], env,
                {"QQF_QMAILQUEUE": qq})
    assert p.returncode == 31 and (tmp_path / "other-ran").exists() and not (tmp_path / "qq.seen").exists()
    assert len(queued(qhome.queue)) == 1


def test_without_filters_it_is_qmail_queue(qhome: QHome) -> None:
    p = qfilter(qhome, [], b"Fa@b\0Tu@test.example.com\0\0")
    assert p.returncode == 0, p.stderr
    ((mess, sender, rcpts),) = queued(qhome.queue)
    assert (sender, rcpts) == (b"a@b", [b"u@test.example.com"]) and mess.endswith(b"\nSubject: s\n\nhi\n")


def test_qmtpd_and_qmqpd_read_smtpfilters(qhome: QHome, tmp_path: Path) -> None:
    """The other network receivers go through the chain too: a rewriting filter, then a rejecting one."""
    from test_qmtp import TCP as QMTP_TCP
    from test_qmtp import ns, qmqp, qmtp
    from smtpdkit import Conversation

    qhome.control("smtpfilters", f"{script(tmp_path / 'add', 'echo X-Filtered: yes; cat')}\n")
    c = Conversation(qhome.bin("qmail-qmtpd"), dict(QMTP_TCP))
    c.send(qmtp(b"Subject: q\n\nhi\n", b"a@b", b"u@test.example.com"))
    c.sock.shutdown(socket.SHUT_WR)
    assert c.rest().split(b":", 1)[1].startswith(b"Kok ")
    c = Conversation(qhome.bin("qmail-qmqpd"), dict(QMTP_TCP))
    c.send(qmqp(b"Subject: q\n\nhi\n", b"a@b", b"u@test.example.com"))
    assert c.rest().split(b":", 1)[1].startswith(b"Kok ")
    assert [m.split(b"\n")[1] for m, _, _ in queued(qhome.queue)] == [b"X-Filtered: yes"] * 2
    qhome.control("smtpfilters", f"{script(tmp_path / 'no', 'exit 31')}\n")
    c = Conversation(qhome.bin("qmail-qmtpd"), dict(QMTP_TCP))
    c.send(qmtp(b"Subject: q\n\nhi\n", b"a@b", b"u@test.example.com"))
    c.sock.shutdown(socket.SHUT_WR)
    assert c.rest() == ns(b"Dmail server permanently rejected message (#5.3.0)")
    Conversation.close_all()


def test_root_mode_smtpd_through_the_chain(root_home: QHome) -> None:
    """Root mode: qmail-smtpd as qmaild runs qmail-qfilter and the filter as qmaild; qmail-queue then
    hands the filtered message to qmail-queued, which names the network as its source."""
    from conftest import world_dir
    from test_intake_root import Queued, _queued, _smtp, _wait

    d = world_dir()
    try:
        filt = script(d / "add", "echo 'X-Filtered: as '$(id -un); cat")
        root_home.control("smtpfilters", filt + "\n")
        q = Queued(root_home)
        try:
            assert _smtp(root_home, "chain").startswith(b"250 ")
            _wait(lambda: bool(files(root_home.queue)["todo"]), what="the message in todo/")
        finally:
            assert q.stop() == 0
        ((who, uid, subject),) = _queued(root_home)
        assert (who, subject) == (b"invoked from network", b"chain")
        (todo,) = files(root_home.queue)["todo"]
        mess = (root_home.queue / "mess" / str(int(todo) % 23) / todo).read_bytes()
        assert mess.split(b"\n")[1] == b"X-Filtered: as qmaild"
    finally:
        shutil.rmtree(d, ignore_errors=True)
