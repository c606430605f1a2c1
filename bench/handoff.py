"""Queueing through qmail-queued in root mode, from the client's side: qmail-smtpd and qmail-inject.

usage (as root): python bench/handoff.py [N]

Makes a fresh root-mode home (`qmail init`), starts its qmail-queued, and measures:

- qmail-smtpd as qmaild on a socketpair, one SMTP session of N messages of 4 KB
  (default 300): messages/s, and the CPU of qmail-smtpd with every child it
  waited for (wait4's rusage: the qmail-queue processes it starts, if any) per
  message. qmail-queued's own CPU is not counted (the same either way).
- N sequential `qmail-inject RCPT` as pqtest (a local user: its QQ goes to
  qmail-queued), started by /bin/sh one after another: messages/s.

Nothing is delivered (no qmail-send). Every message must reach todo/. The
figures are for comparing two versions run one after the other (alternate
them: the machine may be shared).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
ENV = {"PATH": "/usr/bin:/bin"}
USER = "pqtest"


def message(size: int = 4096) -> bytes:
    head = b"From: a@example.org\r\nTo: b@bench.example.com\r\nSubject: handoff\r\n\r\n"
    body = (b"x" * 75 + b"\r\n") * (size // 77 + 1)
    return (head + body)[:size - 2] + b"\r\n"


def todo_count(home: str) -> int:
    return len(os.listdir(os.path.join(home, "queue", "todo")))


def smtpd_session(home: str, n: int) -> tuple[float, float]:
    """Send n messages in one qmail-smtpd session as qmaild; return (seconds, CPU seconds with children)."""
    pw = pwd.getpwnam("qmaild")
    mine, theirs = socket.socketpair()
    env = {**ENV, "TCPREMOTEIP": "127.0.0.1", "TCPLOCALIP": "127.0.0.1", "RELAYCLIENT": ""}
    start = time.perf_counter()
    proc = subprocess.Popen([os.path.join(home, "bin", "qmail-smtpd")], stdin=theirs, stdout=theirs, env=env,
                            user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    theirs.close()
    f = mine.makefile("rwb")

    def reply() -> bytes:
        while True:
            line = f.readline()
            if not line:
                raise EOFError("qmail-smtpd closed")
            if line[3:4] != b"-":
                return line

    assert reply().startswith(b"220")
    f.write(b"HELO bench\r\n")
    f.flush()
    assert reply().startswith(b"250")
    data = message()
    for _ in range(n):
        f.write(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@bench.example.com>\r\nDATA\r\n")
        f.flush()
        for _ in range(3):
            r = reply()
            assert r[:1] in (b"2", b"3"), r
        f.write(data + b".\r\n")
        f.flush()
        r = reply()
        assert r.startswith(b"250"), r
    f.write(b"QUIT\r\n")
    f.flush()
    reply()
    f.close()
    mine.close()
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.returncode
    return wall, ru.ru_utime + ru.ru_stime


def inject_loop(home: str, n: int) -> float:
    """Run n qmail-inject as pqtest from one shell; return the seconds taken."""
    pw = pwd.getpwnam(USER)
    fd, msgfile = tempfile.mkstemp()
    os.write(fd, message().replace(b"\r\n", b"\n"))
    os.close(fd)
    os.chmod(msgfile, 0o644)
    cmd = f"{home}/bin/qmail-inject b@bench.example.com"
    script = f'i=0; while [ $i -lt {n} ]; do {cmd} <"{msgfile}" || exit 1; i=$((i+1)); done'
    start = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", script], check=True, env={**ENV, "HOME": pw.pw_dir}, user=pw.pw_uid,
                   group=pw.pw_gid, extra_groups=[])
    wall = time.perf_counter() - start
    os.unlink(msgfile)
    return wall


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("handoff: run as root (a root-mode home)")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    base = tempfile.mkdtemp(prefix="pyqmail-handoff-")
    os.chmod(base, 0o755)
    home = os.path.join(base, "qmail")
    subprocess.run([os.path.join(BIN, "qmail"), "init", "--home", home, "bench.example.com"], check=True,
                   stdout=subprocess.DEVNULL, env=ENV)
    server = subprocess.Popen([os.path.join(home, "bin", "qmail-queued")], env=ENV, start_new_session=True)
    try:
        sock = os.path.join(home, "run", "qmail-queue.sock")
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("handoff: qmail-queued did not start")
            time.sleep(0.02)
        print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        wall, cpu = smtpd_session(home, n)
        assert todo_count(home) == n, todo_count(home)
        print(f"qmail-smtpd, one session of {n}: {n / wall:.1f} msgs/s, "
              f"{cpu / n * 1000:.2f} ms CPU per message (qmail-smtpd and its children)")
        wall = inject_loop(home, n)
        assert todo_count(home) == 2 * n, todo_count(home)
        print(f"{n} sequential qmail-inject as {USER}: {n / wall:.1f} msgs/s")
        print(f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
