"""IPv6 in the ucspi-tcp programs (issue 18.1), against ucspi-tcp-ipv6 (Debian's package of the
IPv6 patch, unpacked by .ci/run in /opt/ucspi-tcp-ipv6): tcpserver's environment and log lines over
::1, -I, -4/-6 and host 0, tcprules' IPv6 line forms and pyqmail's CIDR prefixes, tcprulescheck,
rblsmtpd for an IPv6 client, tcpclient (also against 0.88's)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import CI, QHome
from pyqmail.ucspi import rules
from ucspikit import DEADLINE, Served, normalize, ours, rules_file

IPV6_BIN = Path("/opt/ucspi-tcp-ipv6/usr/bin")
ENV_PROGRAM = ["sh", "-c", 'env | grep -E "^(TCP|PROTO|RELAYCLIENT|X=)" | sort']
END = r"tcpserver: end \d+ status"


def real6(name: str) -> str:
    """Return the path of ucspi-tcp-ipv6's program name; fail in CI, skip elsewhere, if missing."""
    path = IPV6_BIN / name
    if not os.access(path, os.X_OK):
        if CI:
            pytest.fail(f"{path} missing: .ci/run unpacks Debian's ucspi-tcp-ipv6 there")
        pytest.skip(f"{path} missing (apt-get download ucspi-tcp-ipv6; dpkg-deb -x it in /opt/ucspi-tcp-ipv6)")
    return str(path)


def need_ipv6_loopback() -> None:
    """Fail (in CI) or skip if ::1 cannot be bound."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        if CI:
            pytest.fail("no IPv6 loopback (::1)")
        pytest.skip("no IPv6 loopback")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCP") and k not in ("PROTO", "RELAYCLIENT")}
    env.update(extra)
    return env


def connect(host: str, port: int, data: bytes = b"") -> tuple[bytes, int]:
    """Connect to host (either family), send data, read to the end; return (reply, client port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(DEADLINE)
        s.connect((host, port))
        cport = s.getsockname()[1]
        if data:
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out, cport


def session(binary: str, args: list[str], hosts: list[str]) -> tuple[list[bytes], list[str]]:
    """Start binary -1 args; connect once from each of hosts; return (replies, normalized log)."""
    with Served([binary, "-1", *args], env=clean_env()) as srv:
        ports = [srv.port]
        replies = []
        for i, host in enumerate(hosts):
            out, cport = connect(host, srv.port)
            ports.append(cport)
            replies.append(out)
            srv.wait_for(END, count=i + 1)
            srv.wait_for(r"tcpserver: status: 0/", count=i + 2)
        srv.stop()
        lines = list(srv.lines)
    named = []
    for out in replies:
        for i, port in enumerate(ports):
            out = re.sub(rb"(?<![0-9])%d(?![0-9])" % port, b"PORT%d" % i, out)
        named.append(out)
    return named, normalize(lines, ports)


def test_tcpserver_ipv6_as_ucspi_tcp_ipv6() -> None:
    """Over ::1: PROTO=TCP6, the TCP6* copies, the ok line, as the IPv6 patch's tcpserver."""
    need_ipv6_loopback()
    args = ["-v", "-HR", "-l", "lname", "::1", "0", *ENV_PROGRAM]
    theirs = session(real6("tcpserver"), args, ["::1"])
    mine = session(ours("tcpserver"), args, ["::1"])
    assert mine == theirs
    assert mine[0][0] == (b"PROTO=TCP6\nTCP6LOCALHOST=lname\nTCP6LOCALIP=::1\nTCP6LOCALPORT=PORT0\n"
                          b"TCP6REMOTEIP=::1\nTCP6REMOTEPORT=PORT1\nTCPLOCALHOST=lname\nTCPLOCALIP=::1\n"
                          b"TCPLOCALPORT=PORT0\nTCPREMOTEIP=::1\nTCPREMOTEPORT=PORT1\n")
    assert "tcpserver: ok PID0 lname:::1:PORT0 :::1::PORT1" in mine[1]


def test_tcpserver_interface_option() -> None:
    """-I lo binds ::1 with lo's scope; an unknown interface is ignored, as the patch does."""
    need_ipv6_loopback()
    for interface in ("lo", "no-such-if"):
        args = ["-v", "-HR", "-l", "x", "-I", interface, "::1", "0", *ENV_PROGRAM]
        theirs = session(real6("tcpserver"), args, ["::1"])
        mine = session(ours("tcpserver"), args, ["::1"])
        assert mine == theirs
        assert b"PROTO=TCP6\n" in mine[0][0]


def test_tcpserver_host_0_both_families_and_6() -> None:
    """Host 0 takes IPv4 and IPv6 clients; -6 writes IPv4 clients mapped, with PROTO=TCP6 (as the patch).

    An IPv4 client without -6 gets 0.88's environment exactly: the patch's TCP6* copies
    are not set for it (DESIGN: IPv4 stays byte-identical).
    """
    need_ipv6_loopback()
    replies, _ = session(ours("tcpserver"), ["-v", "-HR", "-l", "x", "0", "0", *ENV_PROGRAM], ["127.0.0.1", "::1"])
    assert replies[0] == (b"PROTO=TCP\nTCPLOCALHOST=x\nTCPLOCALIP=127.0.0.1\nTCPLOCALPORT=PORT0\n"
                          b"TCPREMOTEIP=127.0.0.1\nTCPREMOTEPORT=PORT1\n")
    assert b"TCP6REMOTEIP=::1\n" in replies[1] and b"PROTO=TCP6\n" in replies[1]
    args = ["-6", "-v", "-HR", "-l", "x", "0", "0", *ENV_PROGRAM]
    theirs = session(real6("tcpserver"), args, ["127.0.0.1", "::1"])
    mine = session(ours("tcpserver"), args, ["127.0.0.1", "::1"])
    assert mine == theirs
    assert b"TCPREMOTEIP=::ffff:127.0.0.1\n" in mine[0][0]
    # -4: IPv4 only.
    with Served([ours("tcpserver"), "-1", "-4", "0", "0", "true"], env=clean_env()) as srv:
        with pytest.raises(OSError):
            connect("::1", srv.port)


RULES6 = ('::1:allow,X="loop"\n'
          '2001:db8:1::allow,X="colon prefix"\n'
          '2001:db8::/32:allow,RELAYCLIENT="",X="cidr32"\n'
          '2001:db8:ab00::/40:deny\n'
          'fe80::1%eth0:allow,X="scoped"\n'
          '1.2.3.4:allow,X="c:d"\n'
          '127.:allow,X="v4"\n'
          ':deny\n')


def cdb_records(path: Path) -> list[tuple[bytes, bytes]]:
    """Return a cdb's records in file order."""
    data = path.read_bytes()
    end = min(int.from_bytes(data[i * 8:i * 8 + 4], "little") for i in range(256))
    pos, out = 2048, []
    while pos < end:
        klen = int.from_bytes(data[pos:pos + 4], "little")
        dlen = int.from_bytes(data[pos + 4:pos + 8], "little")
        out.append((data[pos + 8:pos + 8 + klen], data[pos + 8 + klen:pos + 8 + klen + dlen]))
        pos += 8 + klen + dlen
    return out


def test_tcprules_ipv6_lines_as_ucspi_tcp_ipv6(tmp_path: Path) -> None:
    """The patch's IPv6 line forms compile to the same cdb bytes; its refusals are ours."""
    text = RULES6.replace('2001:db8::/32:allow,RELAYCLIENT="",X="cidr32"\n', "").replace(
        "2001:db8:ab00::/40:deny\n", "")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    theirs = rules_file(tmp_path / "a", text, real6("tcprules")).read_bytes()
    mine = rules_file(tmp_path / "b", text, ours("tcprules")).read_bytes()
    assert mine == theirs
    # A canonical CIDR line is stored as written, as the patch does (it then never matches there).
    theirs = rules_file(tmp_path / "a", "2001:db8::/32:deny\n", real6("tcprules")).read_bytes()
    assert rules_file(tmp_path / "b", "2001:db8::/32:deny\n", ours("tcprules")).read_bytes() == theirs
    # (The patch's tcprules never ends on "::1:allo"; ours refuses that line.)
    for bad in ("2001:db8:2::5-7:allow\n",):
        a = subprocess.run([real6("tcprules"), str(tmp_path / "r.cdb"), str(tmp_path / "r.tmp")],
                           input=bad.encode(), capture_output=True, timeout=DEADLINE)
        b = subprocess.run([ours("tcprules"), str(tmp_path / "r.cdb"), str(tmp_path / "r.tmp")],
                           input=bad.encode(), capture_output=True, timeout=DEADLINE)
        assert (b.returncode, b.stderr) == (a.returncode, a.stderr), bad
    b = subprocess.run([ours("tcprules"), str(tmp_path / "r.cdb"), str(tmp_path / "r.tmp")],
                       input=b"::1:allo\n", capture_output=True, timeout=DEADLINE)
    assert (b.returncode, b.stderr) == (100, b"tcprules: fatal: unable to parse this line: ::1:allo\n")


@pytest.mark.parametrize("ip, expected", [
    ("::1", b"rule ::1:\nset environment variable X=loop\nallow connection\n"),
    ("2001:db8:1::7", b"rule 2001:db8:1::\nset environment variable X=colon prefix\nallow connection\n"),
    ("2001:db8:1:0:0:0:0:7", b"rule 2001:db8:1::\nset environment variable X=colon prefix\nallow connection\n"),
    ("fe80::1%eth0", b"rule fe80::1%eth0:\nset environment variable X=scoped\nallow connection\n"),
    ("127.0.0.1", b"rule 127.:\nset environment variable X=v4\nallow connection\n"),
    ("2001:db9::1", b"rule :\ndeny connection\n"),
])
def test_tcprulescheck_ipv6_as_ucspi_tcp_ipv6(tmp_path: Path, ip: str, expected: bytes) -> None:
    """Decisions for IPv6 clients where the patch has an answer: the same answer."""
    text = RULES6.replace('2001:db8::/32:allow,RELAYCLIENT="",X="cidr32"\n', "")
    text = text.replace("2001:db8:ab00::/40:deny\n", "")
    cdb_path = rules_file(tmp_path, text, ours("tcprules"))
    env = clean_env(TCPREMOTEIP=ip)
    a = subprocess.run([real6("tcprulescheck"), str(cdb_path)], env=env, capture_output=True, timeout=DEADLINE)
    b = subprocess.run([ours("tcprulescheck"), str(cdb_path)], env=env, capture_output=True, timeout=DEADLINE)
    assert (b.returncode, b.stdout) == (a.returncode, a.stdout) == (0, expected)


@pytest.mark.parametrize("ip, expected", [
    ("2001:db8:1::7", b"rule 2001:db8:1::\nset environment variable X=colon prefix\nallow connection\n"),
    ("2001:db8::1", b"rule 2001:db8::/32:\nset environment variable RELAYCLIENT=\n"
                    b"set environment variable X=cidr32\nallow connection\n"),
    ("2001:0db8:ffff:0:0:0:0:1", b"rule 2001:db8::/32:\nset environment variable RELAYCLIENT=\n"
                                 b"set environment variable X=cidr32\nallow connection\n"),
    ("2001:db8:ab12::9", b"rule 2001:db8:ab00::/40:\ndeny connection\n"),
    ("2001:db8:ac00::9", b"rule 2001:db8::/32:\nset environment variable RELAYCLIENT=\n"
                         b"set environment variable X=cidr32\nallow connection\n"),
    ("2001:db9::1", b"rule :\ndeny connection\n"),
    ("::ffff:1.2.3.4", b"rule :\ndeny connection\n"),
])
def test_tcprules_cidr_prefixes(tmp_path: Path, ip: str, expected: bytes) -> None:
    """pyqmail's extension: 2001:db8::/32 matches every address in it, the longest prefix first."""
    cdb_path = rules_file(tmp_path, RULES6, ours("tcprules"))
    b = subprocess.run([ours("tcprulescheck"), str(cdb_path)], env=clean_env(TCPREMOTEIP=ip),
                       capture_output=True, timeout=DEADLINE)
    assert (b.returncode, b.stdout) == (0, expected)


def test_tcpserver_follows_ipv6_rules(tmp_path: Path) -> None:
    """tcpserver -x: a CIDR rule sets RELAYCLIENT for ::1; a deny rule drops ::1."""
    need_ipv6_loopback()
    cdb_path = rules_file(tmp_path, '::/64:allow,RELAYCLIENT="",X="net"\n:deny\n', ours("tcprules"))
    replies, lines = session(ours("tcpserver"), ["-v", "-HR", "-l", "x", "-x", str(cdb_path), "::1", "0",
                                                 *ENV_PROGRAM], ["::1"])
    assert b"RELAYCLIENT=\n" in replies[0] and b"X=net\n" in replies[0]
    cdb_path = rules_file(tmp_path, "::1:deny\n", ours("tcprules"))
    replies, lines = session(ours("tcpserver"), ["-v", "-HR", "-l", "x", "-x", str(cdb_path), "::1", "0",
                                                 *ENV_PROGRAM], ["::1"])
    assert replies == [b""] and "tcpserver: deny PID0 x:::1:PORT0 :::1::PORT1" in lines


def test_rules_units() -> None:
    assert rules.compile_line(b'::1:allow,X="a"\n') == [(b"::1", b"+X=a\x00")]
    assert rules.compile_line(b"2001:DB8::1/32:deny\n") == [(b"2001:db8::/32", b"D\x00")]
    assert rules.compile_line(b'1.2.3.4:allow,X="c:d"\n') == [(b"1.2.3.4", b"+X=c:d\x00")]
    assert rules.cidr_key(b"1.2.3.0/24") is None  # IPv4 stays 0.88's: no CIDR
    keys = list(rules.candidates(b"2001:db8::1", None, None, cidr=True))
    assert keys[:4] == [b"2001:db8::1", b"2001:db8::", b"2001:db8:", b"2001:"]
    assert keys[4] == b"2001:db8::1/128" and keys[-3:] == [b"::/1", b"::/0", b""]
    with pytest.raises(rules.RuleError):
        rules.compile_line(b"a:b:allow\n")  # 0.88 refuses it; not an IPv6 address either
    assert list(rules.candidates(b"10.1.2.3", None, None, cidr=True)) == [b"10.1.2.3", b"10.1.2.", b"10.1.", b"10.", b""]


def test_rblsmtpd_ipv6_client_under_tcpserver(qhome: QHome) -> None:
    """tcpserver on ::1 runs rblsmtpd, which asks the nibble name of ::1 (RFC 5782) and blocks."""
    from ucspikit import DNSServer

    need_ipv6_loopback()
    nibbles = ".".join("1" + "0" * 31) + ".rbl.test"
    assert rules_nibbles("::1") == nibbles
    with DNSServer({nibbles: {"TXT": [b"v6 listed"]}}) as dns_server:
        env = clean_env(DNSCACHEIP=dns_server.dnscacheip)
        argv = [ours("tcpserver"), "-1", "-v", "-HR", "-l", "x", "::1", "0", str(qhome.bin("rblsmtpd")),
                "-r", "rbl.test", "sh", "-c", "echo 220 real smtpd $TCPREMOTEIP"]
        with Served(argv, env=env) as srv:
            out, _ = connect("::1", srv.port, b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<a@b>\r\nQUIT\r\n")
            assert out == (b"220 rblsmtpd.local\r\n250 rblsmtpd.local\r\n250 rblsmtpd.local\r\n"
                           b"451 v6 listed\r\n221 rblsmtpd.local\r\n")
            srv.wait_for(r"rblsmtpd: ::1 pid \d+: 451 v6 listed")
        assert (nibbles, "TXT") in dns_server.queries


def rules_nibbles(ip: str) -> str:
    """The RBL name of ip under rbl.test, through the one shared function."""
    from pyqmail.ucspi.rbl import reverse

    return reverse(ip.encode()).decode() + "rbl.test"


class Listener:
    """A TCP server on ip that accepts connections, reads one line and answers it, in a thread."""

    def __init__(self, ip: str) -> None:
        import threading

        self.sock = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        self.sock.bind((ip, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.peers: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self.peers.append(peer[:2])
                conn.settimeout(5)
                try:
                    line = conn.recv(100)
                    conn.sendall(b"echo " + line)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def client_run(binary: str, args: list[str], listener: Listener | None) -> tuple[int, bytes, bytes]:
    """Run a tcpclient; return (exit code, stdout, stderr) with the ports named."""
    p = subprocess.run([binary, *args], capture_output=True, timeout=DEADLINE, env=clean_env())
    out, err = p.stdout, p.stderr
    if listener is not None:
        for port, name in [(listener.port, b"PORT")] + [(cport, b"CPORT") for _, cport in listener.peers]:
            out = re.sub(rb"(?<![0-9])%d(?![0-9])" % port, name, out)
            err = re.sub(rb"(?<![0-9])%d(?![0-9])" % port, name, err)
    return p.returncode, out, err


CLIENT_ENV = ["sh", "-c", 'echo hello >&7; head -c 11 <&6; echo; env | grep -E "^(TCP|PROTO)" | sort']


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1"])
def test_tcpclient_as_ucspi_tcp(ip: str) -> None:
    """tcpclient: descriptors 6 and 7, the environment and -v line, as 0.88's (IPv4) and the IPv6
    patch's (both families)."""
    if ":" in ip:
        need_ipv6_loopback()
    bins = [real6("tcpclient")] + ([str(Path("/usr/bin/tcpclient"))] if ":" not in ip else [])
    results = []
    for binary in [*bins, ours("tcpclient")]:
        lis = Listener(ip)
        try:
            results.append(client_run(binary, ["-v", "-HR", "-l", "lname", ip, str(lis.port), *CLIENT_ENV], lis))
        finally:
            lis.close()
    assert all(r == results[-1] for r in results), results
    proto = b"TCP6" if ":" in ip else b"TCP"
    assert results[-1] == (0, b"echo hello\n\nPROTO=" + proto + b"\nTCPLOCALHOST=lname\nTCPLOCALIP=" + ip.encode()
                           + b"\nTCPLOCALPORT=CPORT\nTCPREMOTEIP=" + ip.encode() + b"\nTCPREMOTEPORT=PORT\n",
                           b"tcpclient: connected to " + ip.encode() + b" port PORT\n")


def test_tcpclient_errors_as_ucspi_tcp() -> None:
    """Refused, no such host, bad port, usage: the same words and exit codes."""
    need_ipv6_loopback()
    from remotekit import dead_port

    port = str(dead_port())
    cases = [["-HR", "-l", "x", "127.0.0.1", port, "true"], ["-HR", "-l", "x", "nonexistent.invalid", "25", "true"],
             ["-HR", "127.0.0.1", "no-such-service", "true"], ["127.0.0.1", "25"], ["-Z", "a", "b", "c"]]
    for args in cases:
        mine = client_run(ours("tcpclient"), args, None)
        assert client_run("/usr/bin/tcpclient", args, None) == mine, args
        assert mine[0] in (100, 111)
    args = ["-HR", "-l", "x", "::1", port, "true"]
    assert client_run(real6("tcpclient"), args, None) == client_run(ours("tcpclient"), args, None) == (
        111, b"", b"tcpclient: unable to connect to ::1 port " + port.encode() + b": connection refused\n")


def test_tcpclient_4_6_and_local_address() -> None:
    """-6 writes an IPv4 connection mapped (PROTO=TCP6, as the patch); -i/-p choose the local end."""
    need_ipv6_loopback()
    lis = Listener("127.0.0.1")
    try:
        mine = client_run(ours("tcpclient"), ["-6", "-HR", "-l", "x", "127.0.0.1", str(lis.port), *CLIENT_ENV], lis)
        theirs = client_run(real6("tcpclient"), ["-6", "-HR", "-l", "x", "127.0.0.1", str(lis.port), *CLIENT_ENV], lis)
        assert mine == theirs and b"PROTO=TCP6\n" in mine[1] and b"TCPREMOTEIP=::ffff:127.0.0.1\n" in mine[1]
        from remotekit import dead_port

        lport = dead_port()
        rc, out, _ = client_run(ours("tcpclient"), ["-HR", "-l", "x", "-i", "127.0.0.1", "-p", str(lport),
                                                   "127.0.0.1", str(lis.port), *CLIENT_ENV], None)
        assert rc == 0 and b"TCPLOCALPORT=%d\n" % lport in out
    finally:
        lis.close()
