"""One network transport: a timed, buffered connection over a descriptor pair, in plain text or TLS.

qmail's network programs read the client on descriptor 0 and write it on
descriptor 1 (under tcpserver both are the socket); qmail-remote has one
socket for both. `Conn` is that pair with qmail's rules:

- every wait for the peer is bounded: `timeout` seconds per wait (qmail's
  timeoutread/timeoutwrite: qmail-smtpd, qmail-popup, qmail-pop3d, qmail-remote)
  and/or a `deadline` on time.monotonic() for the whole session (qmail-qmtpd's
  and qmail-qmqpd's alarm(3600));
- output is buffered and sent before every read (substdio's flush-before-read),
  in writes of at most `write_size` bytes, each after poll said it may go;
- input is read in chunks of at most `read_size` bytes, and `line()` keeps a
  bounded part of an overlong line;
- a failure is an exception, never an exit: `Timeout` (with `reading`, since
  qmail-smtpd answers a read timeout with "451 timeout" and a write timeout with
  nothing), `Gone` (end of input, an I/O error, a TLS error after the
  handshake), `TlsFailed` (the handshake). Each program maps them to its own
  death (its reply texts and exit codes stay in its own module).

`starttls(context)` switches the same connection to TLS (RFC 3207 STARTTLS, STLS,
or TLS from the first byte for SMTPS/POP3S when called before any I/O). The ssl
module's MemoryBIO does the record layer: the encrypted bytes go through the same
two descriptors with the same timed reads and writes, so TLS works whether or not
descriptors 0 and 1 are one socket (a socket under tcpserver, a pair of pipes under
another wrapper), the timeout rules stay the ones above, and no byte reaches
OpenSSL that this object did not read itself: the input read ahead of the
handshake (plain text pipelined after STARTTLS, CVE-2011-0411) is dropped by
`starttls`. The ssl module is imported only by `starttls`: a plain connection does
not load OpenSSL.
"""

from __future__ import annotations

import os
import select
import time

from pyqmail import wait

TYPE_CHECKING = False  # typing costs milliseconds per connection; mypy sees the imports
if TYPE_CHECKING:
    import ssl

READ_SIZE = 65536
POLL_MAX_MS = (1 << 31) - 1  # poll() takes a C int: a longer wait (24.8 days) is cut to this


class NetError(Exception):
    """The connection cannot go on."""


class Timeout(NetError):
    """The peer did not send (reading) or take (not reading) bytes within the time allowed."""

    def __init__(self, reading: bool) -> None:
        super().__init__("timed out")
        self.reading = reading


class Gone(NetError):
    """The peer closed the connection, or reading or writing it failed (TLS errors included).

    `error` is the ssl.SSLError when TLS failed after the handshake, else None.
    """

    def __init__(self, reason: str, error: BaseException | None = None) -> None:
        super().__init__(reason)
        self.error = error


class TlsFailed(NetError):
    """The TLS handshake failed; str() is OpenSSL's reason ("timed out" for a stalled peer).

    `error` is the ssl.SSLError (an ssl.SSLCertVerificationError when the peer's
    certificate did not verify), or None for a timeout or the end of input.
    """

    def __init__(self, reason: str, error: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


def reason(e: BaseException) -> str:
    """Return OpenSSL's short reason for an ssl error (e.g. 'wrong version number'), or the OS error's text."""
    verify = getattr(e, "verify_message", None)
    if verify:
        return str(verify)
    r = getattr(e, "reason", None)
    if r:
        return str(r).lower().replace("_", " ")
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _ms(seconds: float | None) -> int:
    if seconds is None:
        return -1
    return max(0, min(int(seconds * 1000), POLL_MAX_MS))


class Conn:
    """A peer on descriptors fd_in (read) and fd_out (write), with qmail's timeouts; plain text or TLS."""

    __slots__ = ("fd_in", "fd_out", "ms", "deadline", "read_size", "write_size", "out_max",
                 "buf", "pos", "out", "tls", "_bio_in", "_bio_out")

    def __init__(self, fd_in: int = 0, fd_out: int = 1, timeout: float | None = 1200, *,
                 deadline: float | None = None, read_size: int = READ_SIZE,
                 write_size: int = READ_SIZE, out_max: int = 0) -> None:
        """timeout: seconds per wait (None: no limit); deadline: time.monotonic() at which every wait ends.

        out_max: when the output buffer holds this many bytes, put() sends it (0: only flush() sends).
        """
        self.fd_in = fd_in
        self.fd_out = fd_out
        self.ms = _ms(timeout)
        self.deadline = deadline
        self.read_size = read_size
        self.write_size = write_size
        self.out_max = out_max
        self.buf = bytearray()
        self.pos = 0
        self.out = bytearray()
        self.tls: ssl.SSLObject | None = None
        self._bio_in: ssl.MemoryBIO | None = None
        self._bio_out: ssl.MemoryBIO | None = None

    def set_timeout(self, timeout: float | None) -> None:
        """Change the time allowed for each wait."""
        self.ms = _ms(timeout)

    # -- waiting and raw I/O ------------------------------------------------

    def _wait(self, fd: int, event: int, reading: bool, until: float | None = None) -> None:
        """Wait until fd is ready for event; raise Timeout(reading) when the time allowed passes."""
        ms = self.ms
        for end in (self.deadline, until):
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    raise Timeout(reading)
                m = min(int(left * 1000) + 1, POLL_MAX_MS)
                if ms < 0 or m < ms:
                    ms = m
        if not wait.ready(fd, event, ms):
            raise Timeout(reading)

    def _raw_read(self, until: float | None = None) -> bytes:
        """Return the next bytes from fd_in (b"" at its end); Timeout or Gone."""
        while True:
            self._wait(self.fd_in, select.POLLIN, True, until)
            try:
                return os.read(self.fd_in, self.read_size)
            except BlockingIOError:
                continue  # a non-blocking descriptor (qmail-remote's socket): poll again
            except OSError as e:
                raise Gone(e.strerror or str(e)) from None

    def _raw_write(self, data: bytes | bytearray, until: float | None = None) -> None:
        """Write all of data (TLS records) to fd_out; Timeout(False) or Gone.

        Not cut at write_size: a flight of small writes would meet Nagle's algorithm
        and the peer's delayed ACK (40 ms each), as the first STARTTLS bench showed.
        """
        view = memoryview(data)
        while view:
            self._wait(self.fd_out, select.POLLOUT, False, until)
            try:
                n = os.write(self.fd_out, view[:READ_SIZE])
            except BlockingIOError:
                continue
            except OSError as e:
                raise Gone(e.strerror or str(e)) from None
            if n <= 0:
                raise Gone("write returned 0")
            view = view[n:]

    # -- output ---------------------------------------------------------------

    def put(self, data: bytes) -> None:
        """Queue data for the peer (sent by flush(), by the next read, or when out_max is reached)."""
        self.out += data
        if self.out_max and len(self.out) >= self.out_max:
            self.flush()

    def flush(self) -> None:
        """Send everything queued; Timeout(reading=False) or Gone if the peer cannot take it."""
        if not self.out:
            return
        if self.tls is None:
            while self.out:
                self._wait(self.fd_out, select.POLLOUT, False)
                try:
                    n = os.write(self.fd_out, self.out[:self.write_size])
                except BlockingIOError:
                    continue
                except OSError as e:
                    raise Gone(e.strerror or str(e)) from None
                if n <= 0:
                    raise Gone("write returned 0")
                del self.out[:n]
            return
        data = bytes(self.out)
        self.out.clear()
        try:
            self.tls.write(data)
        except OSError as e:  # ssl.SSLError is an OSError
            raise Gone(reason(e), e) from None
        self._tls_send()

    # -- input ----------------------------------------------------------------

    def read(self) -> bytes:
        """Send what is queued, then return the next chunk from the peer (never empty); Timeout or Gone."""
        if self.out:
            self.flush()
        if self.tls is not None:
            return self._tls_read()
        data = self._raw_read()
        if not data:
            raise Gone("end of input")
        return data

    def line(self, limit: int) -> bytes:
        """Return the next line without its LF.

        Of a line longer than limit, what is kept is cut: at least its first
        limit bytes (exactly limit once more than limit bytes of it waited in the
        buffer without an LF); the rest, up to the LF, is read and dropped.
        """
        head = None
        while True:
            nl = self.buf.find(b"\n", self.pos)
            if nl != -1:
                line = bytes(self.buf[self.pos:nl])
                self.pos = nl + 1
                return line if head is None else head
            if head is None and len(self.buf) - self.pos > limit:
                head = bytes(self.buf[self.pos:self.pos + limit])
            if head is not None:
                self.buf.clear()  # drop the rest of an overlong line
            else:
                del self.buf[:self.pos]
            self.pos = 0
            self.buf += self.read()

    def pending(self) -> bytes:
        """Return and forget the bytes read but not yet used."""
        data = bytes(self.buf[self.pos:])
        self.buf = bytearray()
        self.pos = 0
        return data

    def unread(self, data: bytes) -> None:
        """Put back bytes to be used before anything read later."""
        self.buf = bytearray(data) + self.buf[self.pos:]
        self.pos = 0

    def buffered(self) -> bool:
        """Return whether bytes read from the peer wait here (or inside TLS) unused: poll would not see them."""
        if self.pos < len(self.buf):
            return True
        if self.tls is None:
            return False
        assert self._bio_in is not None
        return self.tls.pending() > 0 or self._bio_in.pending > 0

    def byte(self) -> int:
        """Return the next byte from the peer."""
        if self.pos >= len(self.buf):
            self.buf = bytearray(self.read())
            self.pos = 0
        c = self.buf[self.pos]
        self.pos += 1
        return c

    def chunk(self, most: int) -> bytes:
        """Return the next 1 to most bytes from the peer (most > 0)."""
        if self.pos >= len(self.buf):
            self.buf = bytearray(self.read())
            self.pos = 0
        data = bytes(self.buf[self.pos:self.pos + most])
        self.pos += len(data)
        return data

    # -- TLS ------------------------------------------------------------------

    def starttls(self, context: ssl.SSLContext, server_side: bool = True,
                 server_hostname: str | None = None) -> None:
        """Send what is queued, drop the input read ahead, and shake hands on the same descriptors.

        The whole handshake must end within the time allowed for one wait (as
        the qmail-tls patch's ssl_timeoutio), and within the deadline. Raises
        TlsFailed (the connection is then unusable but still plain text: a
        reply may still be written), Timeout or Gone while sending what was queued.
        """
        import ssl

        self.flush()
        self.buf = bytearray()  # RFC 3207 section 4.2 / CVE-2011-0411: nothing read before counts
        self.pos = 0
        bio_in = ssl.MemoryBIO()
        bio_out = ssl.MemoryBIO()
        obj = context.wrap_bio(bio_in, bio_out, server_side=server_side, server_hostname=server_hostname)
        self._bio_in = bio_in
        self._bio_out = bio_out
        until = None if self.ms < 0 else time.monotonic() + self.ms / 1000
        try:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self._tls_send(until)
                    data = self._raw_read(until)
                    if data:
                        bio_in.write(data)
                    else:
                        bio_in.write_eof()
        except ssl.SSLError as e:
            self._tls_send_quietly()  # OpenSSL's alert, if the peer still listens
            self._bio_in = self._bio_out = None
            raise TlsFailed(reason(e), e) from None
        except Timeout:
            self._bio_in = self._bio_out = None
            raise TlsFailed("timed out") from None
        except Gone as e:
            self._bio_in = self._bio_out = None
            raise TlsFailed(str(e)) from None
        self.tls = obj
        self._tls_send(until)  # the last flight (and TLS 1.3's session tickets)

    def _tls_send(self, until: float | None = None) -> None:
        """Write the records OpenSSL has made."""
        assert self._bio_out is not None
        if self._bio_out.pending:
            self._raw_write(self._bio_out.read(), until)

    def _tls_send_quietly(self) -> None:
        try:
            self._tls_send(time.monotonic() + 1)
        except NetError:
            pass  # safe: the connection is being given up; this was a courtesy alert

    def _tls_read(self) -> bytes:
        import ssl

        assert self.tls is not None and self._bio_in is not None
        while True:
            try:
                data = self.tls.read(self.read_size)
            except ssl.SSLWantReadError:
                self._tls_send()  # e.g. the answer to a key update
                raw = self._raw_read()
                if raw:
                    self._bio_in.write(raw)
                else:
                    self._bio_in.write_eof()
                continue
            except ssl.SSLZeroReturnError:
                raise Gone("end of input") from None
            except OSError as e:
                raise Gone(reason(e), e) from None
            self._tls_send()
            if not data:
                raise Gone("end of input")
            return data

    def close_tls(self) -> None:
        """Send TLS close_notify, if TLS is on (best effort: errors are ignored)."""
        if self.tls is None:
            return
        try:
            self.flush()
            self.tls.unwrap()
        except OSError:
            pass  # safe: unwrap wants the peer's close_notify, which nobody waits for (as qmail-tls' SSL_shutdown)
        except NetError:
            return  # the peer is gone: nothing more to say
        self._tls_send_quietly()
