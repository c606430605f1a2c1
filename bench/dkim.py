"""qmail-dkim: signing cost per 4 KB message, and the SMTP rate with signing beside the plain rate.

usage: python bench/dkim.py [N] [K]

1. Signing cost: pyqmail.filter.dkim.sign_message on a 4 KB message, RSA-2048
   (OpenSSL's RSA through ctypes), RSA-2048 with dkimpy's pure-Python RSA
   (what dkimpy alone costs), Ed25519, and both keys (what qmail-dkim does
   when both exist), in ms per message.
2. SMTP rate: N messages of 4 KB (default 1000) over K client threads
   (default 10), one connection each, to pyqmail's tcpserver + qmail-smtpd
   of a fresh single-user home: plain, and with QMAILQUEUE=bin/qmail-dkim
   and RELAYCLIENT set (every message signed with RSA-2048 and Ed25519), two
   servers taking turns in the same run. Prints both rates and their ratio; the floor is 70%.
"""

from __future__ import annotations

import os
import shutil
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
ROUNDS = 5
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
    from pyqmail.filter import rsa as fast

    saved, load = dict(fast._keys), fast.load_key
    fast._keys.clear()  # dkimpy's own RSA for these
    fast.load_key = lambda pem, modulus: False  # type: ignore[assignment]
    try:
        report("sign RSA-2048 (dkimpy's pure-Python RSA)", timed(lambda: dkim.sign_message(msg, rsa, fields), 50))
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


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 1000
    k = int(args[1]) if len(args) > 1 else 10
    home = fresh_home(DOMAIN)
    subprocess.run([os.path.join(BIN, "qmail"), "dkim", "keygen", "--home", home, "--both", DOMAIN],
                   check=True, stdout=subprocess.DEVNULL)
    signing_costs(home)
    # Both servers run at once and take turns, ROUNDS rounds each: a machine whose load
    # changes during the run (other jobs) weighs on both rates alike.
    servers = {}
    for label, env in (("plain", {}),
                       ("signing", {"QMAILQUEUE": os.path.join(home, "bin", "qmail-dkim"), "RELAYCLIENT": ""})):
        servers[label] = start_tcpserver(home, env)
    sent = {label: 0 for label in servers}
    secs = {label: 0.0 for label in servers}
    errors: list[str] = []
    try:
        for _label, (_p, port) in servers.items():
            rate(port, 20, 4)  # warm-up
        for _ in range(ROUNDS):
            for label, (_p, port) in servers.items():
                got, took, errs = rate(port, n // ROUNDS, k)
                sent[label] += got
                secs[label] += took
                errors += errs
    finally:
        for server, _port in servers.values():
            server.terminate()
            server.wait()
    results = {}
    for label in servers:
        results[label] = sent[label] / secs[label]
        print(f"SMTP {label}: {sent[label]} x 4 KB in {secs[label]:.2f} s = {results[label]:.1f} messages/s")
    if errors:
        print(f"{len(errors)} errors, first: {errors[0]}")
    print(f"messages signed with both keys in the queue: {signed_in_queue(home)}")
    ratio = results["signing"] / results["plain"]
    print(f"signing rate / plain rate: {ratio:.0%} (floor {FLOOR:.0%}): {'ok' if ratio >= FLOOR else 'BELOW FLOOR'}")
    shutil.rmtree(os.path.dirname(home), ignore_errors=True)


if __name__ == "__main__":
    main()
