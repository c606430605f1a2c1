"""Test kit for the ucspi-tcp programs: the real ucspi-tcp binaries, a DNS server and an
ident server on 127.0.0.1, and tcpserver processes whose log lines can be awaited."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from conftest import CI, IS_ROOT, VENV_BIN

DEADLINE = 20.0  # seconds any single wait in these tests may take before it fails


def real(name: str) -> str:
    """Return the path of ucspi-tcp's program name; fail in CI, skip elsewhere, if it is missing."""
    path = shutil.which(name, path="/usr/bin:/usr/local/bin:/bin")
    if path is None:
        if CI:
            pytest.fail(f"ucspi-tcp's {name} missing: .ci/run installs package ucspi-tcp")
        pytest.skip(f"ucspi-tcp's {name} not installed (apt-get install ucspi-tcp)")
    return path


def ours(name: str) -> str:
    """Return the path of pyqmail's program name (the venv's console script)."""
    return str(VENV_BIN / name)


class DNSServer:
    """A UDP DNS server on a loopback address answering from a table of records.

    records maps a lowercased name without the final dot to {type: [value, ...]};
    TXT values are bytes (one character-string each) or tuples of bytes; A values
    are dotted quads; PTR values are names. Names in servfail get SERVFAIL;
    any other unknown name gets NXDOMAIN.
    """

    def __init__(self, records: dict[str, dict[str, list[object]]], ip: str = "127.0.0.1",
                 port: int = 0, servfail: Sequence[str] = ()) -> None:
        self.records = records
        self.servfail = set(servfail)
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, port))
        self.address = self.sock.getsockname()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def dnscacheip(self) -> str:
        """The $DNSCACHEIP value naming this server (with its port unless 53)."""
        ip, port = self.address
        return ip if port == 53 else f"{ip}:{port}"

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:  # noqa: BLE001 - a test server ignores garbage
                continue
            self.sock.sendto(self.answer(query).to_wire(), peer)

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        q = query.question[0]
        name = q.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(q.rdtype)
        self.queries.append((name, rdtype))
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        entry = self.records.get(name)
        if entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        values = entry.get(rdtype, [])
        for value in values:
            if rdtype == "TXT":
                strings = value if isinstance(value, tuple) else (value,)
                text = " ".join('"' + "".join(f"\\{c:03d}" for c in s) + '"' for s in strings)
            else:
                text = str(value)
            rrset = dns.rrset.from_text(q.name, 60, dns.rdataclass.IN, q.rdtype, text)
            response.answer.append(rrset)
        return response

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> DNSServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def root_loopback_port53() -> str:
    """Return a loopback address whose port 53 a test may bind (root only; skip otherwise)."""
    if not IS_ROOT:
        pytest.skip("port 53 needs root (djbdns clients ask port 53 only)")
    for last in range(1, 250):
        ip = f"127.0.53.{last}"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((ip, 53))
        except OSError:
            continue
        finally:
            s.close()
        return ip
    pytest.fail("no loopback address with a free port 53")


class IdentServer:
    """An RFC 1413 server that answers every request with reply (or stays silent)."""

    def __init__(self, reply: bytes | None, ip: str = "127.0.0.1", port: int = 0) -> None:
        self.reply = reply
        self.requests: list[bytes] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(16)
        self.address = self.sock.getsockname()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while not data.endswith(b"\n"):
                        chunk = conn.recv(100)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data)
                    if self.reply is None:
                        time.sleep(3)
                    else:
                        conn.sendall(self.reply)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> IdentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Served:
    """A tcpserver process started with -1: its port, and its log lines as they come."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, cwd=cwd)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else b""
            self.proc.wait()
            raise AssertionError(f"{self.argv!r} did not start: {err!r}")
        self.port = int(line)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode("latin-1").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = DEADLINE) -> list[str]:
        """Wait until count log lines match pattern (a regex); return all lines so far."""
        rx = re.compile(pattern)
        end = time.monotonic() + timeout
        with self._cond:
            while sum(1 for x in self.lines if rx.search(x)) < count:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {count}x {pattern!r} in {self.lines!r}")
                self._cond.wait(left)
            return list(self.lines)

    def connect(self, data: bytes = b"", source: str | None = None,
                shut: bool = True) -> tuple[bytes, int]:
        """Connect, send data, read to the end; return (what came back, client port)."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(DEADLINE)
        if source is not None:
            s.bind((source, 0))
        s.connect(("127.0.0.1", self.port))
        cport = s.getsockname()[1]
        try:
            if data:
                s.sendall(data)
            if shut:
                s.shutdown(socket.SHUT_WR)
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        finally:
            s.close()
        return out, cport

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        rc = self.proc.wait(DEADLINE)
        self._reader.join(2)
        if self._reader.is_alive():
            # Children still running hold the log pipe open: end them (the
            # pids are in the log) so that the pipe closes.
            for m in re.finditer(r"tcpserver: pid (\d+) ", "\n".join(self.lines)):
                try:
                    os.kill(int(m.group(1)), 9)
                except OSError:
                    pass  # already gone
            self._reader.join(DEADLINE)
        return rc

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.proc.stderr:
            self.proc.stderr.close()


def normalize(lines: Sequence[str], ports: Iterator[int] | Sequence[int] = ()) -> list[str]:
    """Return log lines with pids replaced by PID0, PID1... in order of appearance and ports by names."""
    text = "\n".join(lines)
    for i, port in enumerate(ports):
        text = re.sub(rf"(?<![0-9]){port}(?![0-9])", f"PORT{i}", text)
    pids: list[str] = []
    for m in re.finditer(r"(?:pid|ok|deny|end) (\d+)", text):
        if m.group(1) not in pids:
            pids.append(m.group(1))
    for i, pid in enumerate(pids):
        text = re.sub(rf"(?<![0-9]){pid}(?![0-9])", f"PID{i}", text)
    return text.split("\n") if text else []


def rules_file(tmp: Path, text: str, program: str = "tcprules") -> Path:
    """Compile rules text with program (a path) into tmp/rules.cdb; return its path."""
    out = tmp / "rules.cdb"
    p = subprocess.run([program, str(out), str(tmp / "rules.tmp")], input=text.encode("latin-1"),
                       capture_output=True, timeout=DEADLINE)
    assert p.returncode == 0, p
    return out
