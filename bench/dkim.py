"""qmail-dkim: signing cost per 4 KB message, and the SMTP rate with signing beside the plain rate.

usage: python bench/dkim.py [N] [K] [ROUNDS]

1. Signing cost: pyqmail.filter.dkim.sign_message on a 4 KB message (what
   qmail-dkim runs: pyqmail.filter.dkimsign, OpenSSL's RSA through ctypes,
   PyNaCl's Ed25519) with RSA-2048, Ed25519 and both keys (what qmail-dkim
   does when both exist); then the same through dkimpy (the path before
   dkimsign, still the fallback), and RSA-2048 with dkimpy's pure-Python RSA;
   in ms per message.
2. SMTP rate: N messages of 4 KB (default 1600) over K client threads
   (default 10), one connection each, to pyqmail's tcpserver + qmail-smtpd
   of a fresh single-user home: plain, and with QMAILQUEUE=bin/qmail-dkim
   and RELAYCLIENT set (every message signed with RSA-2048 and Ed25519). Both
   servers run at once and take turns, ROUNDS rounds (default 8) of N/ROUNDS
   messages each: a machine whose load changes (other jobs) weighs on both
   alike. Prints each rate's median over the rounds with min-max, and the
   median of the rounds' ratios (signing / the plain round just before it)
   with min-max; the floor is 70%.

Also printed: each server's CPU per message (tcpserver and the children it reaped, read from
/proc), steadier than the rates on a shared machine.

Measured (2026-12-06, the shared 2-core machine at load average 8-25 from other sessions,
1600 x 4 KB, 10 clients, 8 rounds; four runs): ratio median of rounds 74, 86, 89, 86% (each
run's rounds spread 42-129%), ratio of the median rates 71, 86, 84, 83%, CPU per message
13.5-14.2 ms signing against 11.6-11.9 ms plain (82-87%); signing with both keys 0.34-0.55 ms
(dkimpy: 1.0-1.2 ms). More in docs/DESIGN.md (qmail-dkim).
"""

from __future__ import annotations

import os
import shutil
import statistics
import smtplib
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import BIN, fresh_home, report, timed  # noqa: E402

# This file is named dkim.py: keep its directory off the path, or it hides dkimpy's package `dkim`.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

SIZE = 4096
FLOOR = 0.70
ROUNDS = 8
DOMAIN = "bench.example.com"


def message() -> bytes:
    head = (f"From: Sender <sender@{DOMAIN}>\nTo: rcpt@{DOMAIN}\nSubject: bench\n"
            f"Date: Wed, 1 Jan 2025 00:00:00 +0000\nMessage-ID: <1@{DOMAIN}>\nMIME-Version: 1.0\n"
            "Content-Type: text/plain\n\n").encode()
    return head + (b"x" * 74 + b"\n") * ((SIZE - len(head)) // 75)


def signing_costs(home: str) -> None:
    os.environ["QMAILHOME"] = home
    from pyqmail.filter import dkim

    msg = message()
    fields, _ = dkim.split_header(msg)
    keys = dkim.find_keys(DOMAIN, {})
    rsa = [k for k in keys if k.algorithm == b"rsa-sha256"]
    ed = [k for k in keys if k.algorithm == b"ed25519-sha256"]
    dkim.sign_message(msg, keys, fields)  # warm: imports, key loading
    report("sign RSA-2048 (OpenSSL)", timed(lambda: dkim.sign_message(msg, rsa, fields), 200))
    report("sign Ed25519", timed(lambda: dkim.sign_message(msg, ed, fields), 200))
    report("sign RSA-2048 + Ed25519", timed(lambda: dkim.sign_message(msg, keys, fields), 200))
    include = [h for h in dkim.SIGN_HEADERS if h in {name for name, _raw in fields}]

    def dkimpy(ks: list[dkim.Key]) -> None:
        for key in ks:
            dkim._sign_dkimpy(msg, key, include)

    dkimpy(keys)
    report("dkimpy: sign RSA-2048 (OpenSSL) + Ed25519", timed(lambda: dkimpy(keys), 200))
    from pyqmail.filter import rsa as fast

    saved, load = dict(fast._keys), fast.load_key
    fast._keys.clear()  # dkimpy's own RSA for these
    fast.load_key = lambda pem, modulus: False  # type: ignore[assignment]
    try:
        report("dkimpy: sign RSA-2048 (its pure-Python RSA)", timed(lambda: dkimpy(rsa), 50))
    finally:
        fast._keys.update(saved)
        fast.load_key = load  # type: ignore[assignment]


def start_tcpserver(home: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    p = subprocess.Popen([os.path.join(home, "bin", "tcpserver"), "-1", "-HR", "-l", DOMAIN, "-c", "100",
                          "127.0.0.1", "0", os.path.join(home, "bin", "qmail-smtpd")],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", **env})
    assert p.stdout is not None
    return p, int(p.stdout.readline())


def rate(port: int, n: int, k: int) -> tuple[int, float, list[str]]:
    body = message().replace(b"\n", b"\r\n")
    counts = [0] * k
    errors: list[str] = []

    def client(i: int, todo: int) -> None:
        for _ in range(todo):
            try:
                with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.client", timeout=60) as s:
                    s.sendmail(f"sender@{DOMAIN}", [f"rcpt@{DOMAIN}"], body)
                counts[i] += 1
            except (OSError, smtplib.SMTPException) as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i, n // k + (i < n % k))) for i in range(k)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - start, errors


def signed_in_queue(home: str) -> int:
    count = 0
    mess = os.path.join(home, "queue", "mess")
    for d in os.listdir(mess):
        for name in os.listdir(os.path.join(mess, d)):
            with open(os.path.join(mess, d, name), "rb") as f:
                count += f.read(8192).count(b"DKIM-Signature:") == 2
    return count


def cpu_seconds(pid: int) -> float:
    """Return the CPU time of process pid and of its children it has waited for (utime stime cutime cstime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def spread(values: list[float], fmt: str) -> str:
    """Return 'median (min-max)' of values, each formatted with fmt."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 1600
    k = int(args[1]) if len(args) > 1 else 10
    rounds = int(args[2]) if len(args) > 2 else ROUNDS
    home = fresh_home(DOMAIN)
    subprocess.run([os.path.join(BIN, "qmail"), "dkim", "keygen", "--home", home, "--both", DOMAIN],
                   check=True, stdout=subprocess.DEVNULL)
    signing_costs(home)
    servers = {}
    for label, env in (("plain", {}),
                       ("signing", {"QMAILQUEUE": os.path.join(home, "bin", "qmail-dkim"), "RELAYCLIENT": ""})):
        servers[label] = start_tcpserver(home, env)
    rates: dict[str, list[float]] = {label: [] for label in servers}
    cpu = {label: 0.0 for label in servers}
    sent = {label: 0 for label in servers}
    errors: list[str] = []
    try:
        for _label, (_p, port) in servers.items():
            rate(port, 20, 4)  # warm-up
        for _ in range(rounds):
            for label, (p, port) in servers.items():
                before = cpu_seconds(p.pid)
                got, took, errs = rate(port, n // rounds, k)
                cpu[label] += cpu_seconds(p.pid) - before
                sent[label] += got
                rates[label].append(got / took)
                errors += errs
    finally:
        for server, _port in servers.values():
            server.terminate()
            server.wait()
    for label in servers:
        print(f"SMTP {label}: {sent[label]} x 4 KB in {rounds} rounds, messages/s median (min-max): "
              f"{spread(rates[label], '{:.1f}')}")
    for label in servers:
        # tcpserver's own time and its reaped children's (qmail-smtpd, qmail-dkim, qmail-queue): the
        # CPU per message, steadier than a rate on a shared machine (clock ticks: 10 ms resolution).
        print(f"server CPU per message, {label}: {cpu[label] / sent[label] * 1000:.2f} ms")
    print(f"plain CPU / signing CPU per message: {cpu['plain'] / sent['plain'] / (cpu['signing'] / sent['signing']):.0%}")
    if errors:
        print(f"{len(errors)} errors, first: {errors[0]}")
    print(f"messages signed with both keys in the queue: {signed_in_queue(home)}")
    ratios = [s / p for s, p in zip(rates["signing"], rates["plain"])]
    ratio = statistics.median(ratios)
    print(f"signing rate / plain rate, median of {rounds} rounds (min-max): {spread(ratios, '{:.0%}')}; "
          f"of the medians: {statistics.median(rates['signing']) / statistics.median(rates['plain']):.0%} "
          f"(floor {FLOOR:.0%}): {'ok' if ratio >= FLOOR else 'BELOW FLOOR'}")
    shutil.rmtree(os.path.dirname(home), ignore_errors=True)


if __name__ == "__main__":
    main()
