"""qmail-send's loop in this process, with a clock the test sets and spawners the test plays.

The real qmail-clean and qmail-queue run as processes; qmail-lspawn and
qmail-rspawn are pipes on which the test reads commands and writes reports.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import QHome
from pyqmail import home as _home
from pyqmail.send import qmail_send, schedule, spawnproto
from pyqmail.send.schedule import LOCAL, REMOTE
from queuefmt import files, messages
from sendkit import qqueue

ME = "test.example.com"


class Clock:
    def __init__(self) -> None:
        self.t = int(time.time())

    def __call__(self) -> int:
        return self.t


class Harness:
    """A Send in this process, in qhome's queue, with pipes for its descriptors."""

    def __init__(self, qhome: QHome, monkeypatch: pytest.MonkeyPatch, clock: Clock | None = None) -> None:
        self.qhome = qhome
        monkeypatch.setenv("QMAILHOME", str(qhome.path))
        _home.reset()
        monkeypatch.chdir(qhome.path)
        self.controls = qmail_send.read_controls()
        assert self.controls is not None
        monkeypatch.chdir(qhome.queue)
        self.clock = clock or Clock()
        self.fds: list[int] = []
        self.log_r, log_w = self._pipe()
        self.cmd_r: list[int] = []
        cmd_w: list[int] = []
        rep_r: list[int] = []
        self.rep_w: list[int] = []
        for _ in (LOCAL, REMOTE):
            r, w = self._pipe()
            self.cmd_r.append(r)
            cmd_w.append(w)
            r, w = self._pipe()
            rep_r.append(r)
            self.rep_w.append(w)
        self.clean = subprocess.Popen([str(qhome.bin("qmail-clean"))], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
        assert self.clean.stdin is not None and self.clean.stdout is not None
        for fd in (self.log_r, *self.cmd_r):
            os.set_blocking(fd, False)
        self.sleeps: list[float] = []
        self.send = qmail_send.Send(
            self.controls, 23, self.clock, sleep=self.sleeps.append, spawn_max=(120, 120),
            fds=(log_w, (cmd_w[0], cmd_w[1]), (rep_r[0], rep_r[1]), self.clean.stdin.fileno(),
                 self.clean.stdout.fileno()))
        self.readers = [spawnproto.CommandReader(), spawnproto.CommandReader()]
        self.log = b""

    def _pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.fds += [r, w]
        return r, w

    def close(self) -> None:
        if not self.fds:
            return
        assert self.clean.stdin is not None and self.clean.stdout is not None
        self.clean.stdin.close()
        self.clean.wait(10)
        self.clean.stdout.close()
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.send.close()

    def steps(self, n: int = 20) -> None:
        """Run n turns of the loop without waiting, collecting the log."""
        for _ in range(n):
            self.send.step(max_wait=0)
            # qmail-clean is a process: hear its answers before the next turn, so
            # that the turns do not race it.
            while self.send.clean_pending and self.send.clean_alive:
                self.send.clean_answers(block=True)
            self._drain_log()

    def _drain_log(self) -> None:
        while True:
            try:
                data = os.read(self.log_r, 65536)
            except BlockingIOError:
                return
            self.log += data

    def lines(self) -> list[bytes]:
        return self.log.split(b"\n")[:-1]

    def commands(self, c: int = LOCAL) -> list[tuple[int, bytes, bytes, bytes, bool]]:
        """Return the delivery commands qmail-send has written to the spawner of channel c."""
        try:
            data = os.read(self.cmd_r[c], 65536)
        except BlockingIOError:
            return []
        return list(self.readers[c].feed(data))

    def report(self, slot: int, report: bytes, c: int = LOCAL) -> None:
        os.write(self.rep_w[c], bytes([slot]) + report + b"\0")

    def queue(self, recips: list[bytes], sender: bytes = b"s@x.example", body: bytes = b"Subject: t\n\n") -> int:
        before = set(files(self.qhome.queue)["todo"])
        qqueue(self.qhome, sender, recips, body)
        (name,) = set(files(self.qhome.queue)["todo"]) - before
        return int(name)

    def birth(self, num: int) -> int:
        return int((self.qhome.queue / "info" / str(num % 23) / str(num)).stat().st_mtime)


@pytest.fixture
def h(qhome: QHome, monkeypatch: pytest.MonkeyPatch) -> Harness:
    harness = Harness(qhome, monkeypatch)
    harness.send.start()
    yield harness
    harness.close()


def test_retry_schedule_with_an_injected_clock(h: Harness) -> None:
    num = h.queue([b"joe@" + ME.encode()])
    h.steps()
    ((slot, messid, sender, recip, ok),) = h.commands()
    assert (messid, sender, recip, ok) == (f"{num % 23}/{num}".encode(), b"s@x.example", b"joe@" + ME.encode(), True)
    birth = h.birth(num)
    tried = h.clock.t
    h.report(slot, b"ZTry later.\n")
    h.steps()
    assert b"delivery 1: deferral: Try_later./" in h.lines()
    want = schedule.next_retry(birth, tried, LOCAL)
    assert h.send.pqchan[LOCAL][0][0] == want and want - birth in range(100, 102)
    h.clock.t = want - 1
    h.steps()
    assert h.commands() == []
    h.clock.t = want
    h.steps()
    ((slot, _, _, _, _),) = h.commands()
    assert h.lines()[-2:] == [b"starting delivery 2: msg %d to local joe@%s" % (num, ME.encode()),
                              b"status: local 1/10 remote 0/20"]
    h.report(slot, b"ZStill not.\n")
    h.steps()
    assert h.send.pqchan[LOCAL][0][0] == schedule.next_retry(birth, want, LOCAL) == birth + 400
    h.clock.t = birth + 400
    h.steps()
    ((slot, _, _, _, _),) = h.commands()
    h.report(slot, b"Kdid 1+0+0\n")
    h.steps()
    assert h.lines()[-3:] == [b"delivery 3: success: did_1+0+0/", b"status: local 0/10 remote 0/20",
                              b"end msg %d" % num]
    assert messages(h.qhome.queue) == {}


def test_queue_lifetime_turns_a_deferral_into_a_bounce(h: Harness, qhome: QHome) -> None:
    h.controls.lifetime = 1000
    num = h.queue([b"joe@" + ME.encode()], sender=b"")  # a bounce itself: the result is a double bounce
    h.steps()
    ((slot, _, _, _, _),) = h.commands()
    h.report(slot, b"ZNot now.\n")
    h.steps()
    birth = h.birth(num)
    h.clock.t = birth + 1001
    h.send.runasap = True  # ALRM
    h.steps()
    ((slot, _, _, _, _),) = h.commands()
    h.report(slot, b"ZNot now.\n")
    h.steps(40)
    lines = h.lines()
    assert (b"delivery 2: failure: Not_now./I'm_not_going_to_try_again;"
            b"_this_message_has_been_in_the_queue_too_long./") in lines
    assert any(x.startswith(b"bounce msg %d qp " % num) for x in lines)
    assert b"end msg %d" % num in lines
    # The double bounce: queued from #@[] to postmaster@me, with qmail's text.
    ((slot, _, sender, recip, _),) = h.commands()
    assert (sender, recip) == (b"#@[]", b"postmaster@" + ME.encode())
    mess = [p for p in (qhome.queue / "mess").rglob("*") if p.is_file()]
    (bounce_file,) = mess
    text = bounce_file.read_bytes()
    assert (b"<joe@test.example.com>:\nNot now.\nI'm not going to try again; this message has been in the queue too long.\n\n"
            b"--- Below this line is the original bounce.\n\nReturn-Path: <>\n") in text


def test_exit_saves_retry_times_and_start_reads_them(h: Harness, qhome: QHome,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    num = h.queue([b"joe@" + ME.encode(), b"r@far.example"])
    h.steps()
    ((slot, _, _, _, _),) = h.commands()
    ((rslot, _, _, _, _),) = h.commands(REMOTE)
    h.report(slot, b"Zlater\n")
    h.report(rslot, b"Zlater\n", REMOTE)
    h.steps()
    retry_l = h.send.pqchan[LOCAL][0][0]
    retry_r = h.send.pqchan[REMOTE][0][0]
    assert retry_r - h.birth(num) in range(400, 402)
    h.send.exitasap = True
    assert h.send.done()
    h.send.finish()
    h._drain_log()
    assert h.lines()[-1] == b"status: exiting"
    local = qhome.queue / "local" / str(num % 23) / str(num)
    remote = qhome.queue / "remote" / str(num % 23) / str(num)
    assert int(local.stat().st_mtime) == retry_l and int(remote.stat().st_mtime) == retry_r
    h.close()
    h2 = Harness(qhome, monkeypatch)
    try:
        h2.send.start()
        assert [e[0] for e in h2.send.pqchan[LOCAL]] == [retry_l]
        assert [e[0] for e in h2.send.pqchan[REMOTE]] == [retry_r]
        h2.steps()
        assert h2.commands() == [] and h2.commands(REMOTE) == []
        h2.send.runasap = True  # ALRM: everything due now
        h2.steps()
        assert len(h2.commands()) == 1 and len(h2.commands(REMOTE)) == 1
    finally:
        h2.close()


def test_marking_done_and_partial_progress(h: Harness, qhome: QHome) -> None:
    num = h.queue([b"a@" + ME.encode(), b"b@" + ME.encode(), b"c@" + ME.encode()])
    h.steps()
    cmds = h.commands()
    assert [c[3] for c in cmds] == [b"a@" + ME.encode(), b"b@" + ME.encode(), b"c@" + ME.encode()]
    h.report(cmds[0][0], b"Kok\n")
    h.report(cmds[1][0], b"Zlater\n")
    h.report(cmds[2][0], b"DNo such user.\n")
    h.steps()
    local = qhome.queue / "local" / str(num % 23) / str(num)
    me = ME.encode()
    assert local.read_bytes() == b"Da@" + me + b"\0Tb@" + me + b"\0Dc@" + me + b"\0"
    assert (qhome.queue / "bounce" / str(num)).read_bytes() == b"<c@" + me + b">:\nNo such user.\n\n"
    # Only b is tried again.
    h.send.runasap = True
    h.steps()
    ((slot, _, _, recip, _),) = h.commands()
    assert recip == b"b@" + me


def test_concurrency_limit(h: Harness) -> None:
    h.send.concurrency[LOCAL] = 2
    h.send.dels[LOCAL] = [None, None]
    for i in range(4):
        h.queue([b"u%d@%s" % (i, ME.encode())])
    h.steps(60)
    first = h.commands()
    assert len(first) == 2 and {c[0] for c in first} == {0, 1}
    assert b"status: local 2/2 remote 0/20" in h.lines()
    for slot, *_ in first:
        h.report(slot, b"K\n")
    h.steps(60)
    assert len(h.commands()) == 2


def test_bad_reports(h: Harness) -> None:
    h.queue([b"joe@" + ME.encode()])
    h.steps()
    ((slot, _, _, _, _),) = h.commands()
    h.report(slot + 7, b"Kwho?\n")
    h.report(slot, b"Xgarbage")
    h.steps()
    lines = h.lines()
    assert b"warning: internal error: delivery report out of range" in lines
    assert b"delivery 1: report mangled, will defer" in lines


def test_old_s2_messages_are_cleaned_up(h: Harness, qhome: QHome) -> None:
    old = h.queue([b"x@y"])
    young = h.queue([b"x@y"])
    # S2: mess/N alone, as a crash while eliminating a message leaves it.
    for n in (old, young):
        (qhome.queue / "todo" / str(n)).unlink()
        (qhome.queue / "intd" / str(n)).unlink()
    long_ago = time.time() - qmail_send.OSSIFIED - 100
    os.utime(qhome.queue / "mess" / str(old % 23) / str(old), (long_ago, long_ago))
    h.send.cleanuptime = h.clock.t
    h.steps()
    assert messages(qhome.queue) == {young: "S2"}
    assert h.send.cleanuptime == h.clock.t + qmail_send.SLEEP_CLEANUP


def test_interrupted_preprocessing_is_redone(qhome: QHome, monkeypatch: pytest.MonkeyPatch) -> None:
    hh = Harness(qhome, monkeypatch)
    try:
        num = hh.queue([b"joe@" + ME.encode()])
        # A crash after writing info/N and part of local/N, before todo/N went.
        (qhome.queue / "info" / str(num % 23) / str(num)).write_bytes(b"Fgarbage")
        (qhome.queue / "local" / str(num % 23) / str(num)).write_bytes(b"Tpartial")
        hh.send.start()
        assert hh.send.pqchan == [[], []] and hh.send.pqdone == []
        hh.steps()
        assert (qhome.queue / "info" / str(num % 23) / str(num)).read_bytes() == b"Fs@x.example\0"
        assert (qhome.queue / "local" / str(num % 23) / str(num)).read_bytes() == b"Tjoe@" + ME.encode() + b"\0"
        assert len(hh.commands()) == 1
    finally:
        hh.close()


def test_pending_bounce_is_sent_at_start(qhome: QHome, monkeypatch: pytest.MonkeyPatch) -> None:
    hh = Harness(qhome, monkeypatch)
    try:
        num = hh.queue([b"joe@" + ME.encode()], sender=b"joe@" + ME.encode())
        # S5 with every recipient done and a bounce noted, as a crash before the bounce leaves it.
        (qhome.queue / "todo" / str(num)).unlink()
        (qhome.queue / "intd" / str(num)).unlink()
        (qhome.queue / "info" / str(num % 23) / str(num)).write_bytes(b"Fjoe@" + ME.encode() + b"\0")
        (qhome.queue / "bounce" / str(num)).write_bytes(b"<gone@x>:\nbye\n\n")
        hh.send.start()
        hh.steps(40)
        lines = hh.lines()
        assert any(x.startswith(b"bounce msg %d qp " % num) for x in lines), lines
        assert b"end msg %d" % num in lines
        ((slot, _, sender, recip, _),) = hh.commands()
        assert (sender, recip) == (b"", b"joe@" + ME.encode())
    finally:
        hh.close()


def test_bounce_that_cannot_be_queued_is_kept(h: Harness, qhome: QHome, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QMAILQUEUE", "/bin/false")  # qmail-queue exits 1: a temporary failure
    num = h.queue([b"joe@" + ME.encode()])
    h.steps()
    ((slot, _, _, _, _),) = h.commands()
    h.report(slot, b"Dgone\n")
    h.steps()
    assert b"warning: trouble injecting bounce message, will try later" in h.lines()
    assert (qhome.queue / "bounce" / str(num)).exists()
    assert not any(x.startswith(b"end msg") for x in h.lines())
    monkeypatch.delenv("QMAILQUEUE")
    h.clock.t += qmail_send.SLEEP_SYSFAIL
    h.steps()
    assert any(x.startswith(b"bounce msg %d qp" % num) for x in h.lines())
    assert b"end msg %d" % num in h.lines()


def test_unknown_record_and_unreadable_list(h: Harness, qhome: QHome) -> None:
    num = h.queue([b"joe@" + ME.encode()])
    h.steps()
    ((slot, _, _, _, _),) = h.commands()
    h.report(slot, b"Zlater\n")
    h.steps()
    local = qhome.queue / "local" / str(num % 23) / str(num)
    local.write_bytes(b"Qodd\0")
    h.send.runasap = True
    h.steps()
    assert b"warning: unknown record type in local/%d/%d!" % (num % 23, num) in h.lines()
    local.unlink()
    (qhome.queue / "info" / str(num % 23) / str(num)).unlink()
    h.send._push(h.send.pqchan[LOCAL], h.clock.t, num)
    h.steps()
    assert b"warning: trouble opening local/%d/%d; will try again later" % (num % 23, num) in h.lines()


def test_todo_scan_is_periodic_without_a_trigger(h: Harness, qhome: QHome) -> None:
    h.steps()  # the scan at start
    os.close(h.send.trigger)
    h.send.trigger = -1  # nobody hears the trigger now
    h.queue([b"joe@" + ME.encode()])
    h.steps()
    assert not any(x.startswith(b"new msg") for x in h.lines())
    h.clock.t += qmail_send.SLEEP_TODO
    h.steps()
    assert any(x.startswith(b"new msg") for x in h.lines())


def test_concurrency_zero_holds_deliveries(qhome: QHome, monkeypatch: pytest.MonkeyPatch) -> None:
    qhome.control("concurrencylocal", "0\n")
    hh = Harness(qhome, monkeypatch)
    try:
        hh.send.start()
        assert hh.lines() == [] and hh.send.concurrency == [0, 20]
        hh._drain_log()
        assert hh.lines() == [b"status: local 0/0 remote 0/20"]
        hh.queue([b"joe@" + ME.encode(), b"r@far.example"])
        hh.steps()
        assert hh.commands() == []
        assert len(hh.commands(REMOTE)) == 1
    finally:
        hh.close()


def test_concurrency_is_capped_by_the_spawner(qhome: QHome, monkeypatch: pytest.MonkeyPatch) -> None:
    qhome.control("concurrencylocal", "500\n")
    hh = Harness(qhome, monkeypatch)
    try:
        assert hh.send.concurrency == [120, 20]
    finally:
        hh.close()
