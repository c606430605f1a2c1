"""qmail-smtpd under load: accepted messages/s, and memory per idle connection.

usage: python bench/smtpd.py [N] [K] [--loop] [--tls | --checks]

Sends N messages of 4 KB (default 2000) over K parallel client threads
(default 10), one SMTP connection per message, with smtplib, to qmail-smtpd
of a fresh single-user home, and prints accepted messages/s. qmail-smtpd is
started per connection by pyqmail's tcpserver (``tcpserver -1 -HR -l NAME 127.0.0.1
0 qmail-smtpd``), or with --loop (or without a tcpserver) by a small Python
accept loop that starts it through pyqmail.spawn as tcpserver does.

Then it opens 20 connections, reads each greeting, and prints the PSS and RSS
of the 20 idle qmail-smtpd processes from /proc/PID/smaps_rollup.

With --tls the same server is measured twice in the same run: plain text, then
with STARTTLS on every connection (smtplib's starttls() before the message,
no certificate verification, a self-signed ECDSA P-256 control/servercert.pem
made by the openssl command when the home has none); and the idle processes are
measured plain, then after the TLS handshake (EHLO, STARTTLS, handshake, EHLO).

With --checks two homes are measured in the same run, in alternating rounds
(3 of N messages each), clients connecting from 127.0.0.2: a plain one, and one
with recipient validation (control/rcptcheck), SPF (control/spfbehavior 3, the
sender's record served by a DNS server the bench runs on 127.0.0.1,
$DNSCACHEIP) and greylisting (control/greylist, the bench's triplet passed
beforehand) on; it prints the median rate of each with min-max and their
ratio (floor 70%), each round's ratio, the load average, and per message the
CPU and minor page faults of the server's children (qmail-smtpd and the
qmail-queue it starts) and the server's own CPU (its forks): figures a busy
machine moves less than the rates.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import BIN, fresh_home  # noqa: E402

IDLE = 20
SIZE = 4096


def accept_loop(home: str) -> tuple[int, int]:
    """Fork a process accepting on 127.0.0.1:0 that spawns qmail-smtpd per connection; return (pid, port)."""
    from pyqmail import spawn

    prog = os.path.join(home, "bin", "qmail-smtpd")
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    port = lsock.getsockname()[1]
    pid = os.fork()
    if pid:
        lsock.close()
        return pid, port
    try:
        import gc

        __import__("pyqmail.smtpd.qmail_smtpd")
        gc.freeze()  # objects made so far stay shared with the children
        while True:
            conn, peer = lsock.accept()
            env = {"PATH": "/usr/bin:/bin", "PROTO": "TCP", "TCPREMOTEIP": peer[0],
                   "TCPREMOTEPORT": str(peer[1]), "TCPLOCALIP": "127.0.0.1", "TCPLOCALPORT": str(port)}
            spawn.spawn(prog, [prog], env=env, fds={0: conn.fileno(), 1: conn.fileno(), 2: 2})
            conn.close()
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                pass
    finally:
        os._exit(0)


def start_tcpserver(home: str, env: dict[str, str] | None = None) -> tuple[int, int]:
    """Start pyqmail's tcpserver on 127.0.0.1:0; return (pid, port)."""
    # -l as the book's run file has it (-l "$LOCAL"): no lookup of our own name per connection.
    p = subprocess.Popen([os.path.join(home, "bin", "tcpserver"), "-1", "-HR", "-l", "bench.example.com", "-c", "100", "127.0.0.1", "0",
                          os.path.join(home, "bin", "qmail-smtpd")],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", **(env or {})})
    assert p.stdout is not None
    port = int(p.stdout.readline())
    return p.pid, port


def children(ppid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            out.append(int(name))
    return out


def cpu(pid: int) -> tuple[float, float, float]:
    """Return (ms of CPU of pid's reaped children, their minor faults, ms of CPU of pid itself) so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    return ((int(fields[13]) + int(fields[14])) * tick, float(fields[8]), (int(fields[11]) + int(fields[12])) * tick)


def rollup(pid: int) -> dict[str, int]:
    got = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                got[parts[0].rstrip(":")] = int(parts[1])
    return got


def ensure_cert(home: str) -> None:
    """Give home a self-signed control/servercert.pem (certificate and key) unless it has one."""
    path = os.path.join(home, "control", "servercert.pem")
    if os.path.exists(path):
        return
    key, crt = path + ".key", path + ".crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", crt, "-days", "30", "-subj", "/CN=bench.example.com"],
                   check=True, capture_output=True)
    with open(path, "wb") as f:
        for part in (crt, key):
            with open(part, "rb") as g:
                f.write(g.read())
            os.unlink(part)
    os.chmod(path, 0o600)


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # opportunistic, as MTAs deliver
    return ctx


def throughput(port: int, n: int, k: int, tls: bool, source: str | None = None) -> tuple[int, float, list[str]]:
    """Send n messages over k threads, one connection each (from source if given); return (sent, seconds, errors)."""
    body = ("Subject: bench\r\n\r\n" + ("x" * 74 + "\r\n") * (SIZE // 76 + 1))[:SIZE]
    counts = [0] * k
    errors: list[str] = []
    ctx = client_context()

    def client(i: int, todo: int) -> None:
        for _ in range(todo):
            try:
                with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.client", timeout=60,
                                  source_address=(source, 0) if source else None) as s:
                    if tls:
                        s.starttls(context=ctx)
                    s.sendmail("sender@bench.client", ["rcpt@bench.example.com"], body)
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


def idle(pid: int, port: int, tls: bool) -> tuple[float, float, int]:
    """Open IDLE connections (after the TLS handshake if tls); return (mean PSS KiB, mean RSS KiB, count)."""
    before = set(children(pid))
    conns: list[socket.socket] = []
    ctx = client_context()
    for _ in range(IDLE):
        c = socket.create_connection(("127.0.0.1", port))
        f = c.makefile("rb")
        assert f.readline().startswith(b"220 ")
        if tls:
            c.sendall(b"EHLO bench.client\r\n")
            while f.readline()[3:4] == b"-":
                pass
            c.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220 ")
            f.close()
            c = ctx.wrap_socket(c)
            c.sendall(b"EHLO bench.client\r\n")
            got = b""
            while not got.endswith(b"8BITMIME\r\n"):
                got += c.recv(1000)
        else:
            f.close()
        conns.append(c)
    time.sleep(0.5)
    procs = [p for p in children(pid) if p not in before]
    stats = [rollup(p) for p in procs]
    for c in conns:
        c.close()
    time.sleep(0.5)
    pss = [s["Pss"] for s in stats]
    rss = [s["Rss"] for s in stats]
    return sum(pss) / len(pss), sum(rss) / len(rss), len(procs)


def main_tls(n: int, k: int, use_loop: bool, home: str) -> None:
    """Plain, then STARTTLS on every connection, against the same server; then idle PSS both ways."""
    ensure_cert(home)
    pid, port = accept_loop(home) if use_loop else start_tcpserver(home)
    server = "Python accept loop + spawn" if use_loop else "pyqmail tcpserver"
    try:
        rates = {}
        for tls in (False, True):
            done, elapsed, errors = throughput(port, n, k, tls)
            rates[tls] = done / elapsed
            print(f"qmail-smtpd via {server}, {'STARTTLS' if tls else 'plain text'}: {done} messages of {SIZE} "
                  f"bytes over {k} parallel sessions, one connection each, in {elapsed:.2f} s: "
                  f"{rates[tls]:.0f} accepted messages/s ({len(errors)} errors{': ' + errors[0] if errors else ''})")
        print(f"STARTTLS / plain: {100 * rates[True] / rates[False]:.0f}% (floor 50%)")
        for tls in (False, True):
            pss, rss, count = idle(pid, port, tls)
            print(f"{count} idle qmail-smtpd processes, {'after the TLS handshake' if tls else 'plain text'}: "
                  f"PSS {pss / 1024:.2f} MiB ({pss:.0f} KiB) each, RSS {rss / 1024:.2f} MiB each")
    finally:
        os.kill(pid, signal.SIGTERM)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    if use_loop:
        return
    # The same, with $DISABLETLS: STARTTLS not offered, so tcpserver's parent never loads ssl.
    pid, port = start_tcpserver(home, {"DISABLETLS": "1"})
    try:
        pss, rss, count = idle(pid, port, False)
        print(f"{count} idle qmail-smtpd processes, plain text with $DISABLETLS (ssl not loaded): "
              f"PSS {pss / 1024:.2f} MiB ({pss:.0f} KiB) each, RSS {rss / 1024:.2f} MiB each")
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


CLIENT = "127.0.0.2"  # the checks' client address: SPF passes 127.0.0.1 as local without asking DNS
ROUNDS = 3


class BenchDns:
    """A UDP DNS server on 127.0.0.1:0 answering TXT records from a table (NXDOMAIN otherwise).

    It runs in a process of its own: in a thread it would share the GIL with the client threads.
    """

    def __init__(self, txt: dict[str, str]) -> None:
        import mmap

        self.txt = txt
        self._count = mmap.mmap(-1, 8)  # shared with the child: queries answered
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.dnscacheip = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.pid = os.fork()
        if self.pid == 0:
            try:
                self._serve()
            finally:
                os._exit(0)
        self.sock.close()

    @property
    def queries(self) -> int:
        return int.from_bytes(self._count[:8], "little")

    def _serve(self) -> None:
        # Answers are put together from the query's bytes (as tinydns does), not parsed and
        # rebuilt with dnspython: this server stands for dnscache, and its own CPU, on the same
        # cores, should not be what the bench measures.
        names = {}
        for name, text in self.txt.items():
            wire = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
            data = text.encode()
            rdata = b"".join(bytes([len(data[i:i + 255])]) + data[i:i + 255] for i in range(0, len(data), 255))
            # The answer: a pointer to the question's name (offset 12), TXT, IN, TTL 60, the strings.
            names[wire.lower()] = (b"\xc0\x0c\x00\x10\x00\x01\x00\x00\x00\x3c"
                                   + len(rdata).to_bytes(2, "big") + rdata)
        while True:
            q, peer = self.sock.recvfrom(4096)
            end = 12
            while end < len(q) and q[end]:
                end += 1 + q[end]
            question = q[12:end + 5]
            qname, qtype = q[12:end + 1].lower(), q[end + 1:end + 3]
            self._count[:8] = (self.queries + 1).to_bytes(8, "little")
            answer = names.get(qname)
            flags = bytes([0x80 | (q[2] & 0x79), 0x80])  # QR, the query's opcode and RD; RA
            if answer is None:
                reply = q[:2] + flags[:1] + b"\x83" + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
            elif qtype == b"\x00\x10":
                reply = q[:2] + flags + b"\x00\x01\x00\x01\x00\x00\x00\x00" + question + answer
            else:
                reply = q[:2] + flags + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question
            self.sock.sendto(reply, peer)

    def close(self) -> None:
        os.kill(self.pid, signal.SIGTERM)
        os.waitpid(self.pid, 0)


def checks_home(dnscacheip: str) -> str:
    """A home with recipient validation, SPF (spfbehavior 3) and greylisting on, the bench's triplet passed."""
    home = fresh_home()
    ctl = os.path.join(home, "control")
    with open(os.path.join(ctl, "spfbehavior"), "w") as f:
        f.write("3\n")
    with open(os.path.join(ctl, "greylist"), "w") as f:
        f.write("300 172800 3024000\n")
    with open(os.path.join(ctl, "rcptcheck"), "w") as f:
        f.write("1\n")  # recipient validation (issue 15.2)
    os.mkdir(os.path.join(home, "greylist"), 0o700)
    from pyqmail.smtpd import greylist

    now = int(time.time())
    settings = greylist.Settings(300, db=os.path.join(home, "greylist", "triplets.sqlite"))
    for when in (now - 400, now - 60):  # first attempt, then the retry after the delay: passed
        g = greylist.Greylist(settings, lambda: when)
        g.check(CLIENT, b"sender@bench.client", b"rcpt@bench.example.com")
        g.close()
    return home


def main_checks(n: int, k: int, use_loop: bool) -> None:
    """Plain and with SPF and greylisting on, alternating rounds in the same run: medians, min-max, ratio."""
    dns = BenchDns({"bench.client": f"v=spf1 ip4:{CLIENT} -all"})
    homes = {"plain": fresh_home(), "checks": checks_home(dns.dnscacheip)}
    servers = {}
    try:
        for label, home in homes.items():
            env = {"DNSCACHEIP": dns.dnscacheip}
            servers[label] = accept_loop(home) if use_loop else start_tcpserver(home, env)
        rates: dict[str, list[float]] = {label: [] for label in homes}
        costs: dict[str, list[tuple[float, float, float]]] = {label: [] for label in homes}
        load = os.getloadavg()[0]
        for _ in range(ROUNDS):
            for label, (pid, port) in servers.items():
                before = cpu(pid)
                done, elapsed, errors = throughput(port, n, k, False, CLIENT)
                if errors or done != n:
                    raise SystemExit(f"{label}: {done} of {n} sent, {len(errors)} errors: {errors[:1]}")
                rates[label].append(done / elapsed)
                after = cpu(pid)
                costs[label].append(((after[0] - before[0]) / n, (after[1] - before[1]) / n, (after[2] - before[2]) / n))
        for label, r in rates.items():
            c = costs[label]
            print(f"qmail-smtpd {label}: {n} messages of {SIZE} bytes over {k} parallel sessions, one connection "
                  f"each, {ROUNDS} rounds: median {statistics.median(r):.0f} accepted messages/s "
                  f"(min {min(r):.0f}, max {max(r):.0f}); per message: the server's children "
                  f"{statistics.median(x[0] for x in c):.2f} ms of CPU and {statistics.median(x[1] for x in c):.0f} "
                  f"minor faults, the server {statistics.median(x[2] for x in c):.2f} ms")
        ratio = statistics.median(rates["checks"]) / statistics.median(rates["plain"])
        print(f"with recipient validation (control/rcptcheck), SPF (spfbehavior 3, {dns.queries} DNS queries "
              f"answered) and greylisting (passed triplet) / plain: {100 * ratio:.0f}% (floor 70%); "
              f"per-round ratios {', '.join(f'{100 * c / p:.0f}%' for c, p in zip(rates['checks'], rates['plain']))}; "
              f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
        mess = os.path.join(homes["checks"], "queue", "mess")
        sample = next(os.path.join(root, f) for root, _, fs in os.walk(mess) for f in fs)
        with open(sample, "rb") as f:
            spf_line = next(line for line in f.read().split(b"\n") if line.startswith(b"Received-SPF:"))
        print("a message of the checks run: " + spf_line.decode())
    finally:
        for pid, _ in servers.values():
            os.kill(pid, signal.SIGTERM)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        dns.close()
        import shutil

        for home in homes.values():
            shutil.rmtree(os.path.dirname(home), ignore_errors=True)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 2000
    k = int(args[1]) if len(args) > 1 else 10
    home = fresh_home()
    use_loop = "--loop" in sys.argv or not os.path.exists(os.path.join(home, "bin", "tcpserver"))
    if not use_loop:
        try:
            __import__("pyqmail.ucspi.tcpserver")
        except ImportError:
            use_loop = True
    if "--tls" in sys.argv:
        main_tls(n, k, use_loop, home)
        return
    if "--checks" in sys.argv:
        main_checks(n, k, use_loop)
        return
    pid, port = accept_loop(home) if use_loop else start_tcpserver(home)
    server = "Python accept loop + spawn" if use_loop else "pyqmail tcpserver"
    body = ("Subject: bench\r\n\r\n" + ("x" * 74 + "\r\n") * (SIZE // 76 + 1))[:SIZE]
    counts = [0] * k
    errors: list[str] = []

    def client(i: int, todo: int) -> None:
        for _ in range(todo):
            try:
                with smtplib.SMTP("127.0.0.1", port, local_hostname="bench.client", timeout=60) as s:
                    s.sendmail("sender@bench.client", ["rcpt@bench.example.com"], body)
                counts[i] += 1
            except (OSError, smtplib.SMTPException) as e:
                errors.append(repr(e))

    try:
        threads = [threading.Thread(target=client, args=(i, n // k + (i < n % k))) for i in range(k)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        done = sum(counts)
        queued = len(os.listdir(os.path.join(home, "queue", "todo")))
        print(f"qmail-smtpd via {server}: {done} messages of {SIZE} bytes over {k} parallel sessions, "
              f"one connection each, in {elapsed:.2f} s: {done / elapsed:.0f} accepted messages/s "
              f"({queued} in todo/, {len(errors)} errors{': ' + errors[0] if errors else ''})")

        before = set(children(pid))
        conns = []
        for _ in range(IDLE):
            c = socket.create_connection(("127.0.0.1", port))
            assert c.recv(100).startswith(b"220 ")
            conns.append(c)
        time.sleep(0.5)
        idle = [p for p in children(pid) if p not in before]
        stats = [rollup(p) for p in idle]
        pss = [s["Pss"] for s in stats]
        rss = [s["Rss"] for s in stats]
        print(f"{len(idle)} idle qmail-smtpd processes: PSS {sum(pss) / len(pss) / 1024:.2f} MiB each "
              f"(min {min(pss) / 1024:.2f}, max {max(pss) / 1024:.2f}), RSS {sum(rss) / len(rss) / 1024:.2f} MiB each; "
              f"server process PSS {rollup(pid)['Pss'] / 1024:.2f} MiB")
        for c in conns:
            c.close()
    finally:
        os.kill(pid, signal.SIGTERM)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


if __name__ == "__main__":
    main()
