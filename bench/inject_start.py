"""Where one qmail-inject or sendmail run's time goes: medians per phase, A/B alternated.

usage (root, a root-mode home run by `qmail up`):
  python bench/inject_start.py --home DIR [--lib A_LIB] [--lib B_LIB] [--user pqtest] [-n 200]
  python bench/inject_start.py --home A --home B          (each home's own lib, against itself)

Each run starts the program as its stub would (`python3.11 -IS` + the stub's
lines) from a copy of the stub that adds timestamps: CLOCK_MONOTONIC, which
this process and its children share, read at the driver's first line, after
the stub's own imports, after the program's module, and at audit events
(the first import of pyqmail.queue.qq: the header work is done; os.fork: the
qmail-queue child starts; socket.connect: the hand-over to qmail-queued) and
at os._exit of the program and of a forked qmail-queue. The phases:

  start    posix_spawn -> the driver's first line (exec, the interpreter, -IS)
  stub     pyqmail.entry, home, proctitle (what every stub imports)
  import   the program's module
  headers  reading control files and the message, the header work
  qimport  pyqmail.queue.qq and what it imports, up to the fork or the connect
  commit   fork/connect -> the program's os._exit (qmail-queue's or qmail-queued's
           durable commit included)
  exit     os._exit -> waitpid returns (the interpreter's teardown, the kernel's)

The driver calls the stub's program in its own process, the path a stub takes
when no qmail-queued worker serves it (docs/DESIGN.md "Injection served by
qmail-queued"): bench/compare.py's injection loop times the served path.

Several --lib give several lib dirs (a home's lib/pyqmail-VERSION-HASH) run
alternately in one loop against the same running home, so that a change is
measured before/after under the same load. The audit hook itself costs a few
microseconds per event. Every message goes to the queue (postmaster), so the
home's qmail-send delivers them.
"""

from __future__ import annotations

import argparse
import os
import pwd
import statistics
import sys
import tempfile
import time

PHASES = ("start", "stub", "import", "headers", "qimport", "commit", "exit", "total")

DRIVER = """\
import time as _t
_T0 = _t.monotonic_ns()
import sys, os
sys.path[0:0] = {path!r}
_marks = [("main", _T0)]
_seen = set()
def _hook(event, args, _marks=_marks, _seen=_seen, _ns=_t.monotonic_ns):
    if event == "import":
        if args[0] == "pyqmail.queue.qq" and "qq" not in _seen:
            _seen.add("qq"); _marks.append(("qq", _ns()))
    elif event in ("os.fork", "socket.connect") and event not in _seen:
        _seen.add(event); _marks.append((event, _ns()))
sys.addaudithook(_hook)
_exit = os._exit
def _timed_exit(rc, _marks=_marks, _fd={fd}):
    _marks.append(("exit", _t.monotonic_ns()))
    try:
        os.write(_fd, (" ".join(f"{{k}}={{v}}" for k, v in _marks) + f" pid={{os.getpid()}}\\n").encode())
    except OSError:
        pass  # a forked qmail-queue has its descriptors closed by spawn: only the program reports
    _exit(rc)
os._exit = _timed_exit
from pyqmail.entry import stub
import pyqmail.home, pyqmail.proctitle
_marks.append(("stub", _t.monotonic_ns()))
__import__({module!r}, fromlist=["main"])
_marks.append(("import", _t.monotonic_ns()))
sys.argv[0] = {argv0!r}
stub({module!r}, {home!r})
"""


def stub_lib(home: str) -> str:
    """Return the lib dir the home's qmail-inject stub puts on sys.path."""
    with open(os.path.join(home, "bin", "qmail-inject")) as f:
        for line in f:
            if line.startswith("sys.path[0:0] = "):
                return eval(line.split("=", 1)[1])[0]  # noqa: S307 - the stub's own literal
    raise SystemExit(f"{home}/bin/qmail-inject: no sys.path line")


def message() -> bytes:
    head = (b"From: Bench Sender <sender@bench.example>\nTo: Bench Recipient <rcpt@bench.example>\n"
            b"Subject: bench\nDate: 1 Jan 2000 00:00:00 -0000\nMessage-ID: <bench@bench.example>\n\n")
    return (head + (b"x" * 75 + b"\n") * 60)[:4095] + b"\n"


def one(python: str, driver: str, args: list[str], msgfd: int, logr: int, uid: int | None) -> dict[str, float]:
    """Run the driver once; return its phases in ms."""
    os.lseek(msgfd, 0, os.SEEK_SET)
    argv = [python, "-IS", driver, *args]
    env = {"PATH": "/usr/bin:/bin", "USER": "bench"}
    t0 = time.monotonic_ns()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(msgfd, 0)
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, 1)
            if uid is not None:
                os.setgroups([])
                os.setgid(pwd.getpwuid(uid).pw_gid)
                os.setuid(uid)
            os.execve(python, argv, env)
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, 0)
    t_end = time.monotonic_ns()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv}: exit {os.waitstatus_to_exitcode(status)}")
    data = b""
    while not data.endswith(b"\n") or data.count(b"pid=") < 1:
        data += os.read(logr, 65536)
    lines = [dict(kv.split("=") for kv in line.split()) for line in data.decode().splitlines()]
    m = {k: int(v) for k, v in next(d for d in lines if int(d["pid"]) == pid).items()}
    fork = m.get("os.fork", m.get("socket.connect", m["exit"]))
    qq = m.get("qq", fork)
    ms = 1e-6
    return {"start": (m["main"] - t0) * ms, "stub": (m["stub"] - m["main"]) * ms,
            "import": (m["import"] - m["stub"]) * ms, "headers": (qq - m["import"]) * ms,
            "qimport": (fork - qq) * ms, "commit": (m["exit"] - fork) * ms,
            "exit": (t_end - m["exit"]) * ms, "total": (t_end - t0) * ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--home", required=True, action="append",
                    help="a running home (repeat as often as --lib: lib i runs against home i)")
    ap.add_argument("--lib", action="append", help="lib dir to run (repeat for A/B); default the stub's")
    ap.add_argument("--user", help="run as this user instead of root")
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--python", default="/usr/bin/python3.11")
    ap.add_argument("--programs", default="qmail-inject,sendmail,qmail-inject -n,pass")
    a = ap.parse_args()
    libs = a.lib or [stub_lib(h) for h in a.home]
    homes = a.home if len(a.home) == len(libs) else [a.home[0]] * len(libs)
    uid = pwd.getpwnam(a.user).pw_uid if a.user else None
    progs = {"qmail-inject": ("pyqmail.inject.qmail_inject", ["qmail-inject", "postmaster"]),
             "sendmail": ("pyqmail.inject.sendmail", ["sendmail", "-t", "-i", "-f", "sender@bench.example"]),
             "qmail-inject -n": ("pyqmail.inject.qmail_inject", ["qmail-inject", "-n", "postmaster"]),
             "pass": (None, [])}
    chosen = [p.strip() for p in a.programs.split(",")]
    tmp = tempfile.mkdtemp(prefix="pyqmail-inject-start-")
    os.chmod(tmp, 0o755)
    msgpath = os.path.join(tmp, "msg")
    with open(msgpath, "wb") as f:
        f.write(message().replace(b"rcpt@bench.example", b"postmaster"))
    msgfd = os.open(msgpath, os.O_RDONLY)
    logr, logw = os.pipe()
    os.set_inheritable(logw, True)
    os.set_blocking(logr, True)
    drivers = {}
    for li, lib in enumerate(libs):
        for name in chosen:
            module, argv = progs[name]
            path = os.path.join(tmp, f"{li}-{name.replace(' ', '_')}")
            with open(path, "w") as f:
                if module is None:
                    f.write(DRIVER.split("from pyqmail.entry")[0].replace("{path!r}", "[]").format(fd=logw)
                            + "_marks += [('stub', _t.monotonic_ns()), ('import', _t.monotonic_ns())]\nos._exit(0)\n")
                else:
                    f.write(DRIVER.format(path=[lib], fd=logw, module=module, home=homes[li],
                                          argv0=os.path.join(homes[li], "bin", argv[0])))
            os.chmod(path, 0o644)
            # argv[0] as the stub's: the program's path in the home
            drivers[(li, name)] = (path, argv[1:])
    samples: dict[tuple[int, str], list[dict[str, float]]] = {k: [] for k in drivers}
    load0 = os.getloadavg()[0]
    for _ in range(a.n):
        for key, (path, args) in drivers.items():
            samples[key].append(one(a.python, path, args, msgfd, logr, uid))
    load1 = os.getloadavg()[0]
    print(f"{a.n} runs each, alternated; as {a.user or 'root'}; load {load0:.1f} -> {load1:.1f}; medians in ms")
    print(f"{'lib':>3} {'program':16} " + " ".join(f"{p:>7}" for p in PHASES) + "   per s")
    for (li, name), runs in samples.items():
        med = {p: statistics.median(r[p] for r in runs) for p in PHASES}
        print(f"{li:>3} {name:16} " + " ".join(f"{med[p]:7.2f}" for p in PHASES) + f"  {1000 / med['total']:6.1f}")
    for li, lib in enumerate(libs):
        print(f"lib {li}: {lib} (home {homes[li]})")


if __name__ == "__main__":
    main()
