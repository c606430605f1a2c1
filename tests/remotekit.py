"""Test peers for qmail-remote: a scriptable SMTP server and a tiny DNS server, on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

# A handler gets the server and the received command line (without CRLF) and returns the reply
# bytes to send, or None to say nothing. Special values of the reply: DROP closes the connection.
DROP = b"<drop>"
SILENT = b"<silent>"


@dataclass
class Session:
    """What one client did: its command lines and the raw DATA bytes (up to the final dot)."""

    commands: list[bytes] = field(default_factory=list)
    data: bytes = b""
    quit: bool = False
    peer: str = ""


class SmtpServer:
    """An SMTP server on 127.0.0.1, port 0, in a thread, answering from a script.

    replies maps a command verb (HELO, MAIL, RCPT, DATA, ".", QUIT) to a reply or a list of
    replies used in turn; greeting is sent first. DROP as a reply closes the connection;
    SILENT sends nothing and waits for the client to go away.
    """

    def __init__(self, greeting: bytes = b"220 peer ESMTP\r\n",
                 replies: dict[str, bytes | list[bytes]] | None = None,
                 drop_in_data: bool = False, host: str = "127.0.0.1", port: int = 0) -> None:
        self.greeting = greeting
        self.replies: dict[str, bytes | list[bytes]] = {
            "HELO": b"250 peer\r\n", "MAIL": b"250 ok\r\n", "RCPT": b"250 ok\r\n",
            "DATA": b"354 go ahead\r\n", ".": b"250 ok 12345 qp 1\r\n", "QUIT": b"221 bye\r\n"}
        self.replies.update(replies or {})
        self.drop_in_data = drop_in_data
        self.sessions: list[Session] = []
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _reply(self, verb: str) -> bytes:
        r = self.replies.get(verb, b"502 unimplemented\r\n")
        if isinstance(r, list):
            return r.pop(0) if len(r) > 1 else r[0]
        return r

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(30)
                s = Session(peer=addr[0])
                self.sessions.append(s)
                try:
                    self._talk(conn, s)
                except OSError:
                    pass

    def _send(self, conn: socket.socket, reply: bytes) -> bool:
        if reply == DROP:
            return False
        if reply == SILENT:
            while conn.recv(65536):
                pass
            return False
        conn.sendall(reply)
        return True

    def _talk(self, conn: socket.socket, s: Session) -> None:
        if not self._send(conn, self.greeting):
            return
        buf = b""
        while True:
            while b"\r\n" not in buf:
                got = conn.recv(65536)
                if not got:
                    return
                buf += got
            line, buf = buf.split(b"\r\n", 1)
            s.commands.append(line)
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper().decode("latin-1")
            reply = self._reply(verb)
            if not self._send(conn, reply):
                return
            if verb == "QUIT":
                s.quit = True
                return
            if verb == "DATA" and reply.startswith(b"3"):
                if self.drop_in_data:
                    return
                while b"\r\n.\r\n" not in b"\r\n" + buf:
                    got = conn.recv(65536)
                    if not got:
                        return
                    buf += got
                full = b"\r\n" + buf
                end = full.index(b"\r\n.\r\n")
                s.data = full[2:end + 2]
                buf = full[end + 5:]
                if not self._send(conn, self._reply(".")):
                    return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> SmtpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DnsServer:
    """A UDP DNS server on 127.0.0.1, port 0, answering from records.

    records maps (name, type) to a list of rdata texts, e.g. ("example.com", "MX"):
    ["10 mx1.example.com."]; a name with a CNAME is answered with the chain.
    Names in servfail get SERVFAIL; names with no records at all get NXDOMAIN.
    """

    def __init__(self, records: dict[tuple[str, str], list[str]], servfail: set[str] | None = None) -> None:
        self.records = {(n.lower().rstrip("."), t): v for (n, t), v in records.items()}
        self.servfail = {n.lower().rstrip(".") for n in (servfail or set())}
        self.queries: list[tuple[str, str]] = []
        self.transports: list[str] = []  # "udp", "udp-truncated" or "tcp", one per query answered
        # DNS over TCP on the same port (RFC 7766): truncated UDP answers are asked again there.
        for _ in range(50):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:  # that TCP port is taken: another UDP port
                self.tcp.close()
                self.sock.close()
        else:
            raise OSError("no port free for both UDP and TCP")
        self.sock.settimeout(0.2)
        self.tcp.listen(8)
        self.tcp.settimeout(0.2)
        self.env = {"DNSCACHEIP": f"127.0.0.1:{self.port}"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._tcp_thread = threading.Thread(target=self._serve_tcp, daemon=True)
        self._tcp_thread.start()

    def _answer(self, q: dns.message.Message) -> dns.message.Message:
        r = dns.message.make_response(q)
        r.flags |= dns.flags.RA
        question = q.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.servfail:
            r.set_rcode(dns.rcode.SERVFAIL)
            return r
        for _ in range(8):
            if (name, rdtype) in self.records:
                r.answer.append(dns.rrset.from_text(name + ".", 60, "IN", rdtype, *self.records[name, rdtype]))
                return r
            if (name, "CNAME") in self.records and rdtype != "CNAME":
                target = self.records[name, "CNAME"][0]
                r.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "CNAME", target))
                name = target.lower().rstrip(".")
                continue
            break
        if not any(n == name for n, _ in self.records):
            r.set_rcode(dns.rcode.NXDOMAIN)
        return r

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self.sock.sendto(self._wire(dns.message.from_wire(data), tcp=False), addr)
            except Exception:  # noqa: BLE001 - a bad query gets no answer
                pass

    def _wire(self, q: dns.message.Message, tcp: bool) -> bytes:
        """Return the answer to q; over UDP one larger than the client's EDNS0 size (512 without
        EDNS0, RFC 6891) is cut to its header and question with TC set (RFC 1035 4.2.1)."""
        wire = self._answer(q).to_wire(max_size=65535)
        limit = 65535 if tcp else (max(512, q.payload) if q.edns >= 0 else 512)
        if len(wire) > limit:
            t = dns.message.make_response(q)
            t.flags |= dns.flags.RA | dns.flags.TC
            self.transports.append("udp-truncated")
            return t.to_wire()
        self.transports.append("tcp" if tcp else "udp")
        return wire

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    while True:
                        head = conn.recv(2, socket.MSG_WAITALL)
                        if len(head) < 2:
                            break
                        data = conn.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)
                        wire = self._wire(dns.message.from_wire(data), tcp=True)
                        conn.sendall(len(wire).to_bytes(2, "big") + wire)
                except Exception:  # noqa: BLE001 - a bad query or a gone client ends the connection
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._tcp_thread.join(5)
        self.sock.close()
        self.tcp.close()

    def __enter__(self) -> DnsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dead_port() -> int:
    """Return a port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BlackHole:
    """A port on 127.0.0.1 whose accept queue is full, so connections time out."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(c)

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


