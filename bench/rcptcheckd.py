"""The cost of recipient validation per RCPT in root mode (issue 15.2), qmail-rcptcheckd then and now.

    sudo .venv/bin/python bench/rcptcheckd.py [--rounds N] [--rcpts N] [--old-rev REV]

A root-mode home; qmail-smtpd runs as qmaild on a pipe with one session of
--rcpts RCPTs (a quarter unknown, the rest alternately to two users' homes,
pqtest's and alias's), with $RCPTCHECK_LOCAL=0 (plain), and =1 asking the
qmail-rcptcheckd of --old-rev (a fork per question before the per-user
workers) and of this tree. Rounds alternate the three; each daemon is
started afresh for its turn and answers two sessions: the first pays for
its workers' forks, the second finds them running. Prints the medians and
the cost per RCPT over plain.

--miss: every RCPT misses users/cdb (pqtest's own address and pqtest-nobodyN,
found by qmail-getpw's rules, a stat of pqtest's home), to measure the user
lookup child of the review of session 5 (finding 2) against --old-rev.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)
FQDN = "bench.example.com"
SRC = "src/pyqmail/local/qmail_rcptcheckd.py"


def make_home(base: str) -> str:
    home = os.path.join(base, "qmail")
    subprocess.run([os.path.join(BIN, "qmail"), "init", "--home", home, FQDN], check=True, stdout=subprocess.DEVNULL)
    users = os.path.join(base, "users")
    os.mkdir(users, 0o755)
    lines = []
    for name, acct in (("joe", "pqtest"), ("ann", "alias")):
        pw = pwd.getpwnam(acct)
        d = os.path.join(users, name)
        os.mkdir(d, 0o700)
        with open(os.path.join(d, ".qmail-box"), "w") as f:
            f.write("./Maildir/\n")
        os.chown(d, pw.pw_uid, pw.pw_gid)
        lines.append(f"+{name}-:{acct}:{pw.pw_uid}:{pw.pw_gid}:{d}:-::\n")
    with open(os.path.join(home, "users", "assign"), "w") as f:
        f.write("".join(lines) + ".\n")
    subprocess.run([os.path.join(home, "bin", "qmail-newu")], check=True)
    return home


def old_daemon(home: str, rev: str) -> str:
    """Install --old-rev's qmail-rcptcheckd beside this tree's in home; return its stub."""
    stub = os.path.join(home, "bin", "qmail-rcptcheckd")
    text = open(stub).read()
    lib = next(line.split("'")[1] for line in text.splitlines() if line.startswith("sys.path"))
    old_lib = lib + "-old"
    shutil.copytree(lib, old_lib)
    src = subprocess.run(["git", "show", f"{rev}:{SRC}"], check=True, capture_output=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
    with open(os.path.join(old_lib, "pyqmail", "local", "qmail_rcptcheckd.py"), "wb") as f:
        f.write(src)
    for cached in ("__pycache__",):
        shutil.rmtree(os.path.join(old_lib, "pyqmail", "local", cached), ignore_errors=True)
    path = stub + "-old"
    with open(path, "w") as f:
        f.write(text.replace(lib, old_lib))
    os.chmod(path, 0o755)
    return path


def start(prog: str, home: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([prog], env={"PATH": "/usr/bin:/bin"}, cwd=home, stderr=subprocess.DEVNULL)
    sock = os.path.join(home, "run", "qmail-rcptcheck.sock")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(sock)
            return p
        except OSError:
            time.sleep(0.02)
    raise SystemExit("qmail-rcptcheckd did not start")


MISS = False  # --miss


def session(home: str, rcpts: int, check: bool) -> float:
    """Run one qmail-smtpd session as qmaild; return its wall seconds (checked: every reply as expected)."""
    names = []
    for i in range(rcpts):
        if i % 4 == 3:
            names.append(f"pqtest-nobody{i}" if MISS else f"joe-nobody{i}")
        elif MISS:
            names.append("pqtest")
        else:
            names.append("joe-box" if i % 2 else "ann-box")
    lines = [b"HELO client.example", b"MAIL FROM:<a@b.example>"]
    lines += [f"RCPT TO:<{n}@{FQDN}>".encode() for n in names] + [b"QUIT"]
    qd = pwd.getpwnam("qmaild")
    t = time.perf_counter()
    r = subprocess.run([os.path.join(home, "bin", "qmail-smtpd")], input=b"".join(x + b"\r\n" for x in lines),
                       capture_output=True, timeout=600, user=qd.pw_uid, group=qd.pw_gid, extra_groups=[],
                       env={"PATH": "/usr/bin:/bin", "TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "127.0.0.1",
                            "RCPTCHECK_LOCAL": "1" if check else "0", "BRTLIMIT": "0"})
    took = time.perf_counter() - t
    got = [int(x[:3]) for x in r.stdout.split(b"\r\n")[3:3 + rcpts]]
    want = [550 if check and i % 4 == 3 else 250 for i in range(rcpts)]
    if got != want:
        raise SystemExit(f"unexpected replies: {r.stdout[:2000]!r} {r.stderr[-2000:]!r}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rcpts", type=int, default=200)
    ap.add_argument("--old-rev", default="f37d666~1")
    ap.add_argument("--miss", action="store_true")
    a = ap.parse_args()
    global MISS
    MISS = a.miss
    if os.geteuid() != 0:
        raise SystemExit("root mode: run as root")
    base = tempfile.mkdtemp(prefix="pyqmail-bench-rcptcheckd-")
    os.chmod(base, 0o755)
    try:
        home = make_home(base)
        progs = {"old": old_daemon(home, a.old_rev), "new": os.path.join(home, "bin", "qmail-rcptcheckd")}
        samples: dict[str, list[float]] = {k: [] for k in ("plain", "old 1st", "old 2nd", "new 1st", "new 2nd")}
        for r in range(a.rounds):
            order = ["plain", "old", "new"] if r % 2 == 0 else ["new", "old", "plain"]
            for which in order:
                if which == "plain":
                    samples["plain"].append(session(home, a.rcpts, False))
                    continue
                d = start(progs[which], home)
                try:
                    samples[f"{which} 1st"].append(session(home, a.rcpts, True))
                    samples[f"{which} 2nd"].append(session(home, a.rcpts, True))
                finally:
                    d.terminate()
                    d.wait(timeout=30)
        plain = statistics.median(samples["plain"])
        print(f"{a.rcpts} RCPTs per session, {a.rounds} alternated rounds, load {os.getloadavg()[0]:.1f}")
        for k, v in samples.items():
            med = statistics.median(v)
            extra = "" if k == "plain" else f"  check: {(med - plain) / a.rcpts * 1000:.2f} ms/RCPT"
            print(f"{k:8s} median {med * 1000:7.1f} ms  min {min(v) * 1000:7.1f}  max {max(v) * 1000:7.1f}{extra}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
