"""The silly qmail syndrome (issue 17 item 4): a flood in todo/ never stalls deliveries.

A message already preprocessed waits (deferred once, due again by ALRM) while
FLOOD messages wait in todo/; once a quarter of the flood is preprocessed, ALRM
makes the waiting message due, and qmail-send must start its delivery at once,
before the flood has been preprocessed. With qmail-todo (qmail-start's default)
and without it (no bin/qmail-todo: qmail-send preprocesses in its own loop, as
qmail 1.03's); the figures are printed (DESIGN quotes them; bench/todoflood.py).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from pyqmail.send import log
from queuefmt import files
from sendkit import Running, Site, fill, make_site, qqueue, remove_site

FQDN = "test.example.com"
FLOOD = int(os.environ.get("PYQMAIL_FLOOD", "2000"))


def _children(pid: int) -> list[str]:
    """Return the command lines of pid's children."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                ppid = int(f.read().rpartition(b")")[2].split()[1])
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("latin-1").strip()
        except (OSError, ValueError):
            continue
        if ppid == pid:
            out.append(cmd)
    return out


def flood_run(site: Site, flood: int) -> dict[str, float]:
    """Queue a waiting message and a flood; return the figures of the run (see the module's docstring)."""
    joe = site.mkdir("joe")
    site.assign([site.user_line("joe", joe)])
    site.home.control("concurrencyremote", "0\n")  # the flood goes to the remote channel and stays there
    assert qqueue(site.home, b"a@b.example", [b"joe@" + FQDN.encode()], b"Subject: waiting\n\nx\n",
                  user=site.user) == 0
    d = Running(site)
    try:
        d.wait_for(lambda ls: any(b": deferral: " in x for x in ls))  # no Maildir yet: qmail-local defers
    finally:
        assert d.stop() == 0
    site.maildir("joe/Maildir")
    fill(site, flood, b"x@remote.example", size=1)
    assert len(files(site.home.queue)["todo"]) == flood
    d = Running(site)
    try:
        started = time.monotonic()
        d.wait_for(lambda ls: sum(x.startswith(b"new msg ") for x in ls) >= flood // 4, timeout=300)
        children = _children(d.proc.pid)
        sent = time.monotonic()
        d.signal(signal.SIGALRM)
        lines = d.wait_for(lambda ls: any(x.startswith(b"starting delivery ") for x in ls), timeout=300)
        latency = time.monotonic() - sent
        first = next(i for i, x in enumerate(lines) if x.startswith(b"starting delivery "))
        before = sum(x.startswith(b"new msg ") for x in lines[:first])
        d.wait_for(lambda ls: sum(x.startswith(b"new msg ") for x in ls) >= flood, timeout=600)
        drained = time.monotonic() - started
    finally:
        assert d.stop() == 0
    lines = d.lines()
    # Every flood message was preprocessed once and logged the lines qmailanalog reads, in order.
    assert sum(x.startswith(b"new msg ") for x in lines) == flood
    assert sum(x.startswith(b"info msg ") for x in lines) == flood
    assert not [x for x in lines if x.startswith((b"alert:", b"warning:"))], lines
    return {"latency_ms": latency * 1000, "preprocessed_before": before, "preprocess_s": drained,
            "qmail_todo": float(any(c.startswith("qmail-todo") for c in children))}


@pytest.mark.parametrize("todo,layout", [("qmail-todo", "--big-todo"), ("qmail-todo", "--flat-todo"),
                                         ("in qmail-send", "--big-todo")])
def test_a_flood_in_todo_never_stalls_a_waiting_delivery(todo: str, layout: str) -> None:
    site = make_site(FQDN, todo=layout)
    try:
        if todo == "in qmail-send":
            (site.home.path / "bin" / "qmail-todo").unlink()  # qmail-start then runs none
        f = flood_run(site, FLOOD)
    finally:
        remove_site(site)
    print(f"\n{todo} {layout}: flood {FLOOD}: waiting delivery started {f['latency_ms']:.0f} ms after ALRM, "
          f"{f['preprocessed_before']:.0f} of the flood preprocessed by then; flood preprocessed in "
          f"{f['preprocess_s']:.1f} s")
    assert f["qmail_todo"] == (todo == "qmail-todo")
    assert f["preprocessed_before"] < FLOOD
    assert f["latency_ms"] < 5000


# qmail-todo in this process: its records and qmail-send's commands on pipes the test holds.

def _records(fd: int) -> list[bytes]:
    from pyqmail.send import todoproto

    r = todoproto.Records()
    out: list[bytes] = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return out
        out += r.feed(data)


def test_qmail_todo_hands_over_kept_and_committed_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from pyqmail import home as _home
    from pyqmail.send import qmail_send, qmail_todo, todoproto

    site = make_site(FQDN, todo="--big-todo")
    fds: list[int] = []
    clean = None
    try:
        q = site.home.queue
        for i in range(3):
            assert qqueue(site.home, b"a@b.example", [b"joe@" + FQDN.encode(), b"x@remote.example"],
                          b"Subject: m%d\n\nx\n" % i, user=site.user) == 0
        nums = sorted(int(n.split("/")[1]) for n in files(q)["todo"])
        monkeypatch.setenv("QMAILHOME", str(site.home.path))
        _home.reset()
        monkeypatch.chdir(site.home.path)
        controls = qmail_send.read_controls()
        assert controls is not None
        monkeypatch.chdir(q)
        cmd_r, cmd_w = os.pipe()
        rec_r, rec_w = os.pipe()
        fds += [cmd_r, cmd_w, rec_r, rec_w]
        os.set_blocking(rec_r, False)
        clean = subprocess.Popen([str(site.home.bin("qmail-clean"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 env={"PATH": "/usr/bin:/bin"})
        assert clean.stdin is not None and clean.stdout is not None
        todo = qmail_todo.Todo(controls, 23, lambda: int(time.time()), sleep=lambda s: None,
                               fds=(cmd_r, rec_w, clean.stdin.fileno(), clean.stdout.fileno()))
        monkeypatch.setattr(qmail_send, "KEEP_MAX", 2)  # two kept, the third committed here
        todo.nexttodorun = 0
        for _ in range(5):
            todo.step(max_wait=0.2)
        recs = _records(rec_r)
        kept = [int(r[2:]) for r in recs if r[:2] == b"KB"]
        done = [int(r[2:]) for r in recs if r[:2] == b"DB"]
        assert len(kept) == 2 and len(done) == 1 and sorted(kept + done) == nums, recs
        assert sum(r.startswith(b"Lnew msg ") for r in recs) == 3
        assert sum(r.startswith(b"Linfo msg ") and r.endswith(b" qp %d uid %d\n" % (
            int(r.split(b" qp ")[1].split()[0]), site.uid)) for r in recs) == 3
        assert files(q)["todo"] == sorted(f"{n % 23}/{n}" for n in kept)  # the kept ones' record stays
        # A scan now preprocesses nothing again: the kept messages are qmail-send's.
        todo.nexttodorun = 0
        todo.step(max_wait=0.2)
        assert _records(rec_r) == []
        # qmail-send says G: todo/N of that number is a new message, preprocessed when found.
        os.write(cmd_w, todoproto.gone(kept[0]))
        todo.nexttodorun = 0
        for _ in range(3):
            todo.step(max_wait=0.2)
        recs = _records(rec_r)
        assert [int(r[2:]) for r in recs if r[:1] in (b"K", b"D")] == [kept[0]], recs
        # H rereads, anything else is an obscure dialect; X: finish, say X.
        os.write(cmd_w, b"?X")
        todo.step(max_wait=0.2)
        assert todo.done()
        todo.finish()
        recs = _records(rec_r)
        assert recs[-1] == b"X" and b"L" + qmail_send.log.SEND_DIALECT in recs
    finally:
        for fd in fds:
            os.close(fd)
        if clean is not None:
            assert clean.stdin is not None and clean.stdout is not None
            clean.stdin.close()
            clean.wait(10)
            clean.stdout.close()
        remove_site(site)


def _pid_of_child(parent: int, name: str) -> int:
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                head, _, tail = f.read().rpartition(b")")
            if int(tail.split()[1]) == parent and head.endswith(b"(" + name.encode()):
                return int(p)
        except (OSError, ValueError):
            continue
    raise AssertionError(f"no {name} under {parent}")


def test_an_idle_qmail_clean_of_qmail_todo_killed_is_noticed_at_once() -> None:
    """Killed while nothing is asked of it, qmail-todo's qmail-clean ends qmail-todo at once, and qmail-send with it.

    The whole of qmail-start then exits and supervise starts it again, instead of
    running without a qmail-clean until the next commit needs one.
    """
    site = make_site(FQDN)
    try:
        d = Running(site)
        try:
            d.wait_for(lambda ls: any(x.startswith(b"status:") for x in ls))
            todo = _pid_of_child(d.proc.pid, "qmail-todo")
            pipe = os.readlink(f"/proc/{todo}/fd/2")  # ext-todo: qmail-todo's 2 writes to its qmail-clean
            clean = next(pid for pid in (int(p) for p in os.listdir("/proc") if p.isdigit())
                         if _readlink(f"/proc/{pid}/fd/0") == pipe and pid != todo)
            os.kill(clean, signal.SIGKILL)
            rc = d.wait(timeout=30)  # qmail-todo dies at once, and qmail-send follows it out
        except BaseException:
            d.stop()
            raise
        lines = d.lines()
        assert rc == 0  # as qmail-send after its alert: exitasap, then the normal end
        assert log.LOST_CLEAN.rstrip(b"\n") in lines, lines
        assert lines[-1] == b"status: exiting", lines  # qmail-todo said X; qmail-send ends with it
    finally:
        remove_site(site)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""
