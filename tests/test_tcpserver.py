"""tcpserver against ucspi-tcp 0.88's: the same log lines, environment, rules decisions and
exit codes for the same connections on 127.0.0.1; -c limits, floods, ident, the fork fast path."""

from __future__ import annotations

import os
import pwd
import re
import socket
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CI, IS_ROOT, TEST_USER, QHome, run
from pyqmail.ucspi import ident, netinfo
from ucspikit import DEADLINE, IdentServer, Served, normalize, ours, real, rules_file

ENV_PROGRAM = ["sh", "-c", 'env | grep -E "^(TCP|PROTO|RELAYCLIENT|X=)" | sort']


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without tcp-environ variables, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCP") and k not in ("PROTO", "RELAYCLIENT")}
    env.update(extra)
    return env


def session(binary: str, args: list[str], steps: list[tuple[bytes, str | None]],
            env: dict[str, str] | None = None) -> tuple[list[bytes], list[str], int]:
    """Start binary -1 args, make one connection per step (data sent, log regex awaited after it);
    return (replies with ports named, normalized log lines, exit code after SIGTERM)."""
    with Served([binary, "-1", *args], env=env or clean_env()) as srv:
        ports = [srv.port]
        replies = []
        for i, (data, await_re) in enumerate(steps):
            out, cport = srv.connect(data)
            ports.append(cport)
            replies.append(out)
            if await_re is not None:
                srv.wait_for(await_re, count=i + 1)
                if await_re == END:
                    # Idle again (the status line after the end line) before the next one.
                    srv.wait_for(r"tcpserver: status: 0/", count=i + 2)
        rc = srv.stop()
        lines = list(srv.lines)
    named = []
    for out in replies:
        for i, port in enumerate(ports):
            out = re.sub(rb"(?<![0-9])%d(?![0-9])" % port, b"PORT%d" % i, out)
        named.append(out)
    return named, normalize(lines, ports), rc


def compare(args: list[str], steps: list[tuple[bytes, str | None]],
            env: dict[str, str] | None = None) -> tuple[list[bytes], list[str], int]:
    """Run the same session on ucspi-tcp's tcpserver and ours; assert they agree; return ours."""
    theirs = session(real("tcpserver"), args, steps, env)
    mine = session(ours("tcpserver"), args, steps, env)
    assert mine == theirs
    return mine


END = r"tcpserver: end \d+ status"
VERBOSE = ["-v", "-HR", "-l", "lname", "127.0.0.1", "0"]


def test_log_lines_and_environment() -> None:
    replies, lines, rc = compare(VERBOSE + ENV_PROGRAM, [(b"", END), (b"", END)])
    assert rc == 0
    assert replies[0] == (b"PROTO=TCP\nTCPLOCALHOST=lname\nTCPLOCALIP=127.0.0.1\nTCPLOCALPORT=PORT0\n"
                          b"TCPREMOTEIP=127.0.0.1\nTCPREMOTEPORT=PORT1\n")
    assert lines == [
        "tcpserver: status: 0/40",
        "tcpserver: status: 1/40",
        "tcpserver: pid PID0 from 127.0.0.1",
        "tcpserver: ok PID0 lname:127.0.0.1:PORT0 :127.0.0.1::PORT1",
        "tcpserver: end PID0 status 0",
        "tcpserver: status: 0/40",
        "tcpserver: status: 1/40",
        "tcpserver: pid PID1 from 127.0.0.1",
        "tcpserver: ok PID1 lname:127.0.0.1:PORT0 :127.0.0.1::PORT2",
        "tcpserver: end PID1 status 0",
        "tcpserver: status: 0/40",
    ]


def test_inherited_variables_removed() -> None:
    """-H and -R remove TCPREMOTEHOST and TCPREMOTEINFO even if tcpserver inherited them."""
    env = clean_env(TCPREMOTEHOST="stale", TCPREMOTEINFO="stale", TCPLOCALHOST="stale")
    replies, _, _ = compare(["-HR", "-l", "x", "-D", "-o", "-b", "3", "-t", "1", "127.0.0.1", "0", *ENV_PROGRAM],
                           [(b"", None)], env)
    assert b"stale" not in replies[0]


@pytest.mark.parametrize("which", ["ours", "real"])
def test_book_rules_with_either_cdb(tmp_path: Path, which: str) -> None:
    """The book's rules, compiled by either tcprules, followed by either tcpserver."""
    text = ('127.0.0.2:deny\n127.0.0.:allow,RELAYCLIENT="",X="rule one"\n'
            '=www.example.com:allow,RELAYCLIENT=""\n=:allow\n:deny\n')
    cdb_path = rules_file(tmp_path, text, ours("tcprules") if which == "ours" else real("tcprules"))
    replies, lines, _ = compare(["-v", "-x", str(cdb_path), *VERBOSE[1:], *ENV_PROGRAM], [(b"", END)])
    assert b"RELAYCLIENT=\n" in replies[0] and b"X=rule one\n" in replies[0]
    cdb_path = rules_file(tmp_path, "127.0.0.1:deny,X=/y/\n", ours("tcprules") if which == "ours" else real("tcprules"))
    replies, lines, _ = compare(["-v", "-x", str(cdb_path), *VERBOSE[1:], *ENV_PROGRAM], [(b"", END)])
    assert replies == [b""]
    assert "tcpserver: deny PID0 lname:127.0.0.1:PORT0 :127.0.0.1::PORT1" in lines
    assert "tcpserver: end PID0 status 25600" in lines


def test_rules_override_tcp_variables(tmp_path: Path) -> None:
    cdb_path = rules_file(tmp_path, '127.0.0.1:allow,RELAYCLIENT="",TCPLOCALHOST="movie.edu",X=/a=b/\n',
                          ours("tcprules"))
    replies, lines, _ = compare(["-v", "-x", str(cdb_path), *VERBOSE[1:], *ENV_PROGRAM], [(b"", END)])
    assert b"TCPLOCALHOST=movie.edu\n" in replies[0] and b"X=a=b\n" in replies[0]
    assert "tcpserver: ok PID0 lname:127.0.0.1:PORT0 :127.0.0.1::PORT1" in lines


def test_missing_and_bad_rules(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.cdb")
    _, lines, _ = compare(["-x", missing, "-HR", "-l", "x", "127.0.0.1", "0", "echo", "hi"], [(b"", None)])
    assert lines == [f"tcpserver: warning: dropping connection, unable to read {missing}: file does not exist"]
    replies, lines, _ = compare(["-v", "-X", "-x", missing, *VERBOSE[1:], "echo", "hi"], [(b"", END)])
    assert replies == [b"hi\n"]
    truncated = tmp_path / "t.cdb"
    truncated.write_bytes(b"\0" * 100)
    _, lines, _ = compare(["-x", str(truncated), "-HR", "-l", "x", "127.0.0.1", "0", "echo", "hi"], [(b"", None)])
    assert lines == [f"tcpserver: warning: dropping connection, unable to read {truncated}: protocol error"]


def test_banner_and_unsafe_log_fields() -> None:
    args = ["-v", "-B", "ban%:ner\n", "-l", "my:host%name\t" + "x" * 120, "-HR", "127.0.0.1", "0",
            "sh", "-c", "echo $TCPLOCALHOST; kill -9 $$"]
    replies, lines, _ = compare(args, [(b"", END)])
    assert replies[0].startswith(b"ban%:ner\nmy:host%name ")  # the shell's echo splits at the tab
    assert f"tcpserver: ok PID0 my?host?name?{'x' * 87}...:127.0.0.1:PORT0 :127.0.0.1::PORT1" in lines
    assert "tcpserver: end PID0 status 9" in lines


def test_program_that_cannot_run() -> None:
    for prog in ("/nonexistent", "nonexistent-program-name"):
        _, lines, _ = compare(["-v", *VERBOSE[1:], prog], [(b"", END)])
        assert any(x.startswith(f"tcpserver: warning: dropping connection, unable to run {prog}: ")
                   for x in lines)
        assert "tcpserver: end PID0 status 28416" in lines


def test_quiet_and_default_verbosity(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.cdb")
    _, lines, _ = compare(["-q", "-x", missing, "-HR", "-l", "x", "127.0.0.1", "0", "echo"], [(b"", None)])
    assert lines == []
    replies, lines, _ = compare(["-HR", "-l", "x", "127.0.0.1", "0", "echo", "hi"], [(b"", None)])
    assert replies == [b"hi\n"] and lines == []


@pytest.mark.parametrize("argv", [
    [], ["-Z"], ["-j", "0", "0", "true"], ["0"], ["0", "0"], ["-q"], ["-q", "0", "0"], ["-q", "-Z"],
    ["0", "nosuchservice"], ["0", "nosuchservice", "true"], ["-q", "0", "nosuchservice", "true"],
    ["1.2.3.4", "0", "true"], ["nosuch.invalid", "0", "true"], ["-u", "-1"],
])
def test_startup_errors(argv: list[str]) -> None:
    a = run([real("tcpserver"), *argv], timeout=DEADLINE)
    b = run([ours("tcpserver"), *argv], timeout=DEADLINE)
    assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr), (a.explain(), b.explain())


def test_port_numbers_wrap_and_names() -> None:
    """A numeric port is kept modulo 65536, as ucspi-tcp's uint16 keeps it; names come from services."""
    for port in ("99999",):
        got = []
        for binary in (real("tcpserver"), ours("tcpserver")):
            with Served([binary, "-1", "127.0.0.1", port, "true"], env=clean_env()) as srv:
                got.append(srv.port)
        if got[0] != 99999 % 65536:
            pytest.skip("port 34463 busy")
        assert got[1] == got[0]
    from pyqmail.ucspi.tcpserver import port_number

    assert port_number("smtp") == 25 and port_number("") == 0 and port_number("65536") == 0


def test_sigterm_exits_zero_children_go_on() -> None:
    with Served([ours("tcpserver"), "-1", "-v", "-HR", "-l", "x", "127.0.0.1", "0", "sh", "-c",
                 "read x; echo got $x"], env=clean_env()) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE)
        srv.wait_for(r"tcpserver: ok ")
        srv.proc.terminate()
        assert srv.proc.wait(DEADLINE) == 0
        s.sendall(b"late\n")
        assert s.makefile("rb").read() == b"got late\n"
        s.close()


def test_connection_limit() -> None:
    """-c 2: a third connection waits until one of two running programs ends; the same
    status lines as ucspi-tcp's."""
    def scenario(binary: str) -> tuple[list[str], list[bytes]]:
        with Served([binary, "-1", "-v", "-c", "2", "-HR", "-l", "x", "127.0.0.1", "0",
                     "sh", "-c", "read x; echo $x"], env=clean_env()) as srv:
            conns = []
            ports = [srv.port]
            for i in range(2):
                c = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE)
                conns.append(c)
                ports.append(c.getsockname()[1])
                srv.wait_for(r"tcpserver: ok ", count=i + 1)
            third = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE)
            ports.append(third.getsockname()[1])
            third.sendall(b"three\n")
            # The third is only in the backlog: nobody has answered it.
            third.settimeout(0.3)
            with pytest.raises(socket.timeout):
                third.recv(10)
            third.settimeout(DEADLINE)
            assert [x for x in srv.wait_for(r"status:") if "status:" in x][-1] == "tcpserver: status: 2/2"
            conns[0].sendall(b"one\n")
            out = [conns[0].makefile("rb").read()]
            srv.wait_for(r"tcpserver: ok ", count=3)
            out.append(third.makefile("rb").read())
            conns[1].sendall(b"two\n")
            out.append(conns[1].makefile("rb").read())
            srv.wait_for(END, count=3)
            srv.wait_for(r"status: 0/2", count=2)
            for c in (*conns, third):
                c.close()
            srv.stop()
            return normalize(srv.lines, ports), out

    theirs = scenario(real("tcpserver"))
    mine = scenario(ours("tcpserver"))
    assert mine[1] == theirs[1] == [b"one\n", b"three\n", b"two\n"]
    assert [x for x in mine[0] if "status:" in x] == [x for x in theirs[0] if "status:" in x]
    assert sorted(mine[0]) == sorted(theirs[0])


def test_connection_flood_bounded() -> None:
    """200 connections, a third reset at once: never more than -c children, all served, in bounded time."""
    n, limit = 200, 5
    start = time.monotonic()
    with Served([ours("tcpserver"), "-1", "-v", "-c", str(limit), "-b", "50", "-HR", "-l", "x",
                 "127.0.0.1", "0", "sh", "-c", "echo ok"], env=clean_env()) as srv:
        served = []
        errors = []

        def client(i: int) -> None:
            try:
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE * 3)
                if i % 3 == 0:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()  # a reset before the program even starts
                    return
                served.append(s.makefile("rb").read())
                s.close()
            except OSError as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE * 3)
        accepted = len(srv.wait_for(r"tcpserver: pid "))
        lines = srv.wait_for(END, count=sum(1 for x in srv.lines if "tcpserver: pid " in x))
        srv.stop()
    assert not errors
    assert served == [b"ok\n"] * len(served) and len(served) == n - len(range(0, n, 3))
    counts = [int(m.group(1)) for m in (re.search(r"status: (\d+)/", x) for x in lines) if m]
    assert max(counts) <= limit
    assert accepted >= len(served)
    assert time.monotonic() - start < DEADLINE * 6


def test_fast_path_runs_stub_in_forked_child(qhome: QHome) -> None:
    """A QMAILHOME/bin program runs in tcpserver's forked child: no exec, no new interpreter."""
    env = clean_env(RBLSMTPD="blocked for test")
    with Served([ours("tcpserver"), "-1", "-v", "-HR", "-l", "x", "127.0.0.1", "0",
                 str(qhome.bin("rblsmtpd")), "-t", "30", "true"], env=env) as srv:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE)
        f = s.makefile("rb")
        assert f.readline() == b"220 rblsmtpd.local\r\n"
        lines = srv.wait_for(r"rblsmtpd: 127\.0\.0\.1 pid ")
        pid = int(re.search(r"tcpserver: pid (\d+)", "\n".join(lines)).group(1))  # type: ignore[union-attr]
        # The kernel writes a process's auxiliary vector at exec (new AT_RANDOM and
        # AT_EXECFN addresses); fork copies it. The title (ps) is the program's own now.
        assert Path(f"/proc/{pid}/auxv").read_bytes() == Path(f"/proc/{srv.proc.pid}/auxv").read_bytes()
        assert Path(f"/proc/{pid}/comm").read_text() == "rblsmtpd\n"
        assert f"rblsmtpd: 127.0.0.1 pid {pid}: 451 blocked for test" in lines
        s.sendall(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nQUIT\r\n")
        assert f.read() == b"250 rblsmtpd.local\r\n451 blocked for test\r\n221 rblsmtpd.local\r\n"
        s.close()
        srv.wait_for(rf"tcpserver: end {pid} status 0")


def test_remote_host_lookup() -> None:
    """-h: TCPREMOTEHOST from the system resolver, lowercased; -p keeps it when it maps back."""
    name = netinfo.ptr("127.0.0.1")
    if name is None:
        pytest.skip("127.0.0.1 has no name here")
    for args in (["-h"], ["-h", "-p"]):
        with Served([ours("tcpserver"), "-1", "-v", *args, "-R", "127.0.0.1", "0", *ENV_PROGRAM],
                    env=clean_env()) as srv:
            out, cport = srv.connect()
            lines = srv.wait_for(r"tcpserver: ok ")
        assert f"TCPREMOTEHOST={name}\n".encode() in out
        assert f"TCPLOCALHOST={name}\n".encode() in out
        # The ok line, not the last one: the end and status lines may follow it by now.
        assert [x for x in lines if x.startswith("tcpserver: ok ")][-1].endswith(f"{name}:127.0.0.1::{cport}")


RESOLVER_SETUP = ("/etc/nsswitch.conf", "/etc/host.conf", "/etc/resolv.conf", "/etc/services")


def test_child_lookup_does_not_set_the_resolver_up_again(tmp_path: Path) -> None:
    """Without -H each child asks for TCPREMOTEHOST: the C library's set-up (nsswitch.conf,
    host.conf, resolv.conf) is done once in the parent, and no service name is looked up
    (/etc/services): the child reads no resolver configuration (strace -f of a connection)."""
    if shutil.which("strace") is None:
        if CI:
            pytest.fail("strace missing: .ci/run installs it")
        pytest.skip("strace missing")
    trace = tmp_path / "strace.out"
    with Served([ours("tcpserver"), "-1", "-v", "-R", "-l", "lname", "127.0.0.1", "0", "true"],
                env=clean_env()) as srv:
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=openat,open", "-o", str(trace),
                                   "-p", str(srv.proc.pid)], stderr=subprocess.DEVNULL)
        try:
            end = time.monotonic() + DEADLINE
            while "TracerPid:\t0\n" in Path(f"/proc/{srv.proc.pid}/status").read_text():
                assert time.monotonic() < end, "strace did not attach"
                time.sleep(0.01)
            srv.connect()
            lines = srv.wait_for(END)
        finally:
            tracer.terminate()
            tracer.wait(timeout=DEADLINE)
    opened = trace.read_text()
    assert "/etc/hosts" in opened, opened  # the child did look the name up
    assert [f for f in RESOLVER_SETUP if f in opened] == [], opened
    assert any(line.startswith("tcpserver: ok ") for line in lines)


def test_ident_client_unit() -> None:
    """The RFC 1413 exchange, against an ident server on an ephemeral port."""
    cases = [
        (b"6193, 23 : USERID : UNIX : stjohns\r\n", ident.UCSPI_LIMIT, b"stjohns"),
        (b"1 , 2 : USERID : OTHER :  j o e:x \r\n", ident.UCSPI_LIMIT, b"joe:x"),
        (b"1 , 2 : ERROR : NO-USER\r\n", ident.UCSPI_LIMIT, b""),
        (b"1,2:USERID:UNIX:" + b"u" * 400 + b"\n", ident.UCSPI_LIMIT, b"u" * 257),
        (b"1,2:USERID:UNIX:" + b"u" * 1200 + b"\n", ident.QMAIL_LIMIT, b"u" * 998),
        (b"1,2:USERID:UNIX:joe", ident.UCSPI_LIMIT, None),
    ]
    for reply, limit, expected in cases:
        with IdentServer(reply) as srv:
            got = ident.remoteinfo(("127.0.0.1", 4444), ("127.0.0.1", 25), 5, limit=limit, port=srv.address[1])
            assert got == expected, reply
            assert srv.requests == [b"4444 , 25\r\n"]
    with IdentServer(None) as srv:
        start = time.monotonic()
        assert ident.remoteinfo(("127.0.0.1", 1), ("127.0.0.1", 2), 0.5, port=srv.address[1]) is None
        assert time.monotonic() - start < 2.5
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert ident.remoteinfo(("127.0.0.1", 1), ("127.0.0.1", 2), 2, port=port) is None


def test_ident_as_ucspi_tcp() -> None:
    """-r: TCPREMOTEINFO and the log's info field from the client's ident server (port 113:
    the client connects from 127.0.113.1, where the test's ident server listens)."""
    if not IS_ROOT:
        pytest.skip("an ident server needs port 113 (root)")
    source = "127.0.113.1"
    for reply in (b"0 , 0 : USERID : UNIX : Joe:%x\r\n", b"0,0:ERROR:NO-USER\r\n"):
        results = []
        try:
            server = IdentServer(reply, ip=source, port=113)
        except OSError:
            pytest.skip("port 113 busy on 127.0.113.1")
        with server:
            for binary in (real("tcpserver"), ours("tcpserver")):
                with Served([binary, "-1", "-v", "-H", "-l", "x", "-t", "5", "127.0.0.1", "0", *ENV_PROGRAM],
                            env=clean_env()) as srv:
                    out, cport = srv.connect(source=source)
                    srv.wait_for(END)
                    lines = srv.wait_for(r"status: 0/", count=2)
                results.append((re.sub(rb"PORT=\d+", b"PORT=N", out),
                                normalize(lines, [srv.port, cport])))
        assert results[1] == results[0]
        assert (b"TCPREMOTEINFO=Joe:%x\n" if b"USERID" in reply else b"TCPREMOTEINFO=\n") in results[1][0]


def test_user_and_group() -> None:
    if not IS_ROOT:
        pytest.skip("switching users needs root")
    pw = pwd.getpwnam(TEST_USER)
    args = ["-u", str(pw.pw_uid), "-g", str(pw.pw_gid), "-HR", "-l", "x", "127.0.0.1", "0",
            "sh", "-c", "id -u; id -g; id -G"]
    replies, _, _ = compare(args, [(b"", None)])
    assert replies[0] == f"{pw.pw_uid}\n{pw.pw_gid}\n{pw.pw_gid}\n".encode()
    env = clean_env(UID=str(pw.pw_uid), GID=str(pw.pw_gid))
    replies, _, _ = compare(["-U", *args[4:]], [(b"", None)], env)
    assert replies[0] == f"{pw.pw_uid}\n{pw.pw_gid}\n{pw.pw_gid}\n".encode()


def test_user_switch_refused() -> None:
    if IS_ROOT:
        pytest.skip("root may switch")
    a = run([real("tcpserver"), "-u", "1", "127.0.0.1", "0", "true"])
    b = run([ours("tcpserver"), "-u", "1", "127.0.0.1", "0", "true"])
    assert (b.returncode, b.stderr) == (a.returncode, a.stderr)


def test_ipv6_loopback() -> None:
    """Beyond 0.88: an IPv6 address to listen on; PROTO=TCP6."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with Served([ours("tcpserver"), "-1", "-v", "-HR", "-l", "x", "::1", "0", *ENV_PROGRAM],
                env=clean_env()) as srv:
        c = socket.create_connection(("::1", srv.port), timeout=DEADLINE)
        out = c.makefile("rb").read()
        cport = c.getsockname()[1]
        c.close()
        lines = srv.wait_for(END)
    assert b"PROTO=TCP6\n" in out and b"TCPREMOTEIP=::1\n" in out and b"TCPLOCALIP=::1\n" in out
    assert any(f"x:::1:{srv.port} :::1::{cport}" in x for x in lines), lines


def test_accepts_while_children_run() -> None:
    """The loop stays responsive: a slow program does not delay the next connection."""
    with Served([ours("tcpserver"), "-1", "-HR", "-l", "x", "127.0.0.1", "0", "sh", "-c",
                 "read x; echo $x"], env=clean_env()) as srv:
        slow = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE)
        fast = socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE)
        fast.sendall(b"fast\n")
        assert fast.makefile("rb").read() == b"fast\n"
        slow.sendall(b"slow\n")
        assert slow.makefile("rb").read() == b"slow\n"
        fast.close()
        slow.close()



def test_preload_imports_once_in_parent(qhome: QHome) -> None:
    """The modules a child needs (spawn's, the stub's, rblsmtpd's DNS library) are imported
    before the first connection, so that no connection pays for an import."""
    code = ("import sys\nfrom pyqmail.ucspi import tcpserver\n"
            f"tcpserver.preload([{str(qhome.bin('rblsmtpd'))!r}, '-r', 'x', {str(qhome.bin('recordio'))!r}, 'cat'])\n"
            "print(' '.join(m for m in ('pyqmail.home', 'pyqmail.ucspi.rblsmtpd', 'pyqmail.ucspi.recordio',"
            " 'dns.message', 'dns.query') if m in sys.modules))\n")
    res = run([sys.executable, "-c", code])
    assert res.stdout == b"pyqmail.home pyqmail.ucspi.rblsmtpd pyqmail.ucspi.recordio dns.message dns.query\n", res.explain()
