"""Greylisting in qmail-smtpd: a new (client network, sender, recipient) waits a while.

Off by default; control/greylist turns it on. Its first line is
`DELAY [RETRY [EXPIRY]]` in seconds (an empty file: 300 172800 3024000, as
postgrey): a triplet first seen less than DELAY seconds ago gets

    451 greylisted, try again in N seconds (#4.7.1)

at RCPT; a retry after DELAY and within RETRY seconds of the first attempt
passes, and the triplet stays passed while it is seen at least once every
EXPIRY seconds. A pending triplet not retried within RETRY is forgotten (the
next attempt starts over). The client network is the /24 of an IPv4 address,
the /64 of an IPv6 one; sender and recipient are lowercased, <> is empty.
At most 1000 triplets of one client network wait for their retry at once
(PENDING_MAX); a new one past that is deferred alike but not recorded, so
that a client naming a new sender or recipient in every RCPT cannot fill
the disk (2.5 KB a triplet, 1800 a second from one connection).

Never greylisted: RELAYCLIENT, authenticated and tlsclients clients, a client
with $NOGREYLIST set (tcprules), one whose address is in control/greylistips
(an address, a tcprules-style prefix ending in `.`, or a CIDR network, one a
line), one whose host name ($TCPREMOTEHOST) is in or under a domain of
control/greylistdomains and has the client's address (an A or AAAA record:
the PTR name alone is the address owner's word), and a sender whose domain is listed there when SPF
passed for it (a listed domain cannot be forged past SPF).

The state is one SQLite file (stdlib sqlite3, WAL journal, synchronous=FULL):
QMAILHOME/greylist/triplets.sqlite ($GREYLISTDB names another), made by
qmail-smtpd in a directory the admin makes for it (as root: owned by qmaild,
mode 0700; the file gets 0600; SQLite keeps its -wal and -shm files beside it
while it is open). A write is one transaction, fsync'd at commit, so a
qmail-smtpd killed in the middle leaves the last committed state (frames
without a commit are ignored); many qmail-smtpd processes share it through
SQLite's locks: readers never wait, a writer waits up to BUSY_TIMEOUT for
another. Expired
rows are deleted whenever a new triplet is written, so the file holds only
live triplets (`sqlite3 FILE 'select * from triplet'` shows them). If the
file cannot be used, the RCPT is accepted and the reason logged: a broken
greylist must not hold all mail.

$PYQMAIL_GREYLIST_NOW (seconds since the epoch) replaces the clock in tests.
"""

from __future__ import annotations

import os
import posix
import time

from pyqmail import control
from pyqmail.smtpd import policy

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Mapping, Sequence

    from pyqmail.smtpd.policy import View

CONTROL = "greylist"
DEFAULT_DELAY = 300
DEFAULT_RETRY = 2 * 86400
DEFAULT_EXPIRY = 35 * 86400
REFRESH = 3600  # a passed triplet's last-seen time is rewritten at most this often (reads stay reads)
PENDING_MAX = 1000  # new triplets of one client network waiting for their retry; past it, deferred unrecorded
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another process's lock
DB_DIR = "greylist"
DB_NAME = "triplets.sqlite"
NOW_ENV = b"PYQMAIL_GREYLIST_NOW"  # test seam: the clock
STOP_ENV = b"PYQMAIL_GREYLIST_STOP_IN_WRITE"  # test seam: SIGSTOP inside the write transaction

PASS = 0
DEFER = 1

# What a row lookup leads to (decide's second value).
NOTHING = 0
INSERT = 1  # a new triplet (or a forgotten one starting over)
MARK_PASSED = 2
TOUCH = 3  # a passed triplet seen again after REFRESH


def deferred(wait: int) -> bytes:
    """Return the 451 reply for a triplet that must wait wait more seconds."""
    return b"451 greylisted, try again in %d seconds (#4.7.1)\r\n" % max(wait, 1)


class Settings:
    """The delays, and the whitelists."""

    __slots__ = ("delay", "retry", "expiry", "ips", "domains", "db", "pending_max")

    def __init__(self, delay: int = DEFAULT_DELAY, retry: int = DEFAULT_RETRY, expiry: int = DEFAULT_EXPIRY,
                 ips: Sequence[str] = (), domains: Sequence[str] = (), db: str = "",
                 pending_max: int = PENDING_MAX) -> None:
        self.pending_max = pending_max
        self.delay = delay
        self.retry = max(retry, delay)
        self.expiry = expiry
        self.ips = tuple(ips)
        self.domains = tuple(d.lower().strip(".") for d in domains if d.strip("."))
        self.db = db

    @classmethod
    def load(cls, env: Mapping[bytes, bytes] | None = None) -> Settings | None:
        """Read control/greylist (None: off), greylistips, greylistdomains; ControlError if unreadable."""
        line = control.read_line(CONTROL)
        if line is None:
            return None
        nums = [int(w) for w in line.split()[:3] if w.isdigit()]
        delay, retry, expiry = nums + [DEFAULT_DELAY, DEFAULT_RETRY, DEFAULT_EXPIRY][len(nums):]
        e = posix.environ if env is None else env
        db = e.get(b"GREYLISTDB")
        from pyqmail import home

        path = os.fsdecode(db) if db else os.path.join(home.home(), DB_DIR, DB_NAME)
        return cls(delay, retry, expiry, control.read_lines("greylistips") or (),
                   control.read_lines("greylistdomains") or (), path)

    def ip_listed(self, ip: str) -> bool:
        """Whether control/greylistips lists ip (address, prefix ending in '.', or CIDR)."""
        if not self.ips:
            return False
        import ipaddress

        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        for entry in self.ips:
            if entry.endswith((".", ":")) and "/" not in entry:
                if ip.startswith(entry):
                    return True
                continue
            try:
                if addr in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue  # a line that is no address: ignored
        return False

    def domain_listed(self, name: str) -> bool:
        """Whether name is a domain of control/greylistdomains or under one."""
        name = name.lower().rstrip(".")
        return bool(name) and any(name == d or name.endswith("." + d) for d in self.domains)


def network(ip: str) -> str:
    """Return the client's network for the triplet: a.b.c.0/24, or the /64 of an IPv6 address."""
    if ":" not in ip:
        parts = ip.split(".")
        if len(parts) == 4:
            return ".".join(parts[:3]) + ".0/24"
        return ip
    import ipaddress

    try:
        addr = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return network(str(addr.ipv4_mapped))
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


def decide(row: tuple[int, int, int] | None, now: int, s: Settings) -> tuple[int, int, int]:
    """Return (PASS or DEFER, the write to make, seconds left to wait) for a triplet's row.

    row is (first seen, last seen, passed) or None for a new triplet.
    """
    if row is None:
        return DEFER, INSERT, s.delay
    first, last, passed = row
    if passed:
        if now - last > s.expiry:
            return DEFER, INSERT, s.delay
        return PASS, TOUCH if now - last >= REFRESH else NOTHING, 0
    age = now - first
    if age > s.retry:
        return DEFER, INSERT, s.delay
    if age < s.delay:
        return DEFER, NOTHING, s.delay - age
    return PASS, MARK_PASSED, 0


class Trouble(Exception):
    """The greylist file could not be used."""


class Greylist:
    """The triplet file, opened on first use."""

    __slots__ = ("settings", "now", "_db")

    def __init__(self, settings: Settings, now: Callable[[], int] | None = None) -> None:
        self.settings = settings
        self.now = now or clock()
        self._db: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        import sqlite3

        old = os.umask(0o077)
        try:
            db = sqlite3.connect(self.settings.db, timeout=BUSY_TIMEOUT, isolation_level=None)
        except sqlite3.Error as e:
            raise Trouble(f"{self.settings.db}: {e}") from e
        finally:
            os.umask(old)
        self._db = db
        return db

    def _row(self, db: sqlite3.Connection, key: tuple[str, str, str]) -> tuple[int, int, int] | None:
        import sqlite3

        query = "SELECT first, last, passed FROM triplet WHERE net = ? AND sender = ? AND rcpt = ?"
        try:
            return db.execute(query, key).fetchone()  # type: ignore[no-any-return]
        except sqlite3.OperationalError:
            if db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'triplet'").fetchone()[0]:
                raise
            _create(db)  # a new file (made once: its pragmas cost milliseconds)
            return None

    def check(self, ip: str, sender: bytes, recipient: bytes) -> tuple[int, int]:
        """Return (PASS, 0) or (DEFER, seconds to wait) for a triplet; raise Trouble if the file fails."""
        import sqlite3

        key = (network(ip), sender.decode("latin-1").lower(), recipient.decode("latin-1").lower())
        now = self.now()
        try:
            db = self._open()
            verdict, write, wait = decide(self._row(db, key), now, self.settings)
            if write == NOTHING:
                return verdict, wait  # a read only: the common case, a passed triplet
            if write == INSERT and self._pending(db, key[0], now) >= self.settings.pending_max:
                # A client making new triplets by the thousand (a sender or recipient per RCPT) would
                # grow the file by megabytes a second for RETRY seconds: deferred, not recorded.
                return verdict, wait
            db.execute("PRAGMA synchronous = FULL")  # this commit is fsync'd (about 1 ms in WAL mode)
            db.execute("BEGIN IMMEDIATE")
            try:
                if write == INSERT:
                    db.execute("INSERT OR REPLACE INTO triplet VALUES (?, ?, ?, ?, ?, 0)", key + (now, now))
                    self._prune(db, now)
                elif write == MARK_PASSED:
                    db.execute("UPDATE triplet SET passed = 1, last = ? WHERE net = ? AND sender = ? AND rcpt = ?",
                               (now,) + key)
                else:
                    db.execute("UPDATE triplet SET last = ? WHERE net = ? AND sender = ? AND rcpt = ?",
                               (now,) + key)
                if STOP_ENV in posix.environ:
                    import signal

                    os.kill(os.getpid(), signal.SIGSTOP)  # a test kills us here, inside the transaction
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return verdict, wait
        except sqlite3.Error as e:
            raise Trouble(f"{self.settings.db}: {e}") from e

    def _pending(self, db: sqlite3.Connection, net: str, now: int) -> int:
        """Return how many of net's triplets wait for their retry (counted up to pending_max)."""
        query = ("SELECT count(*) FROM (SELECT 1 FROM triplet WHERE net = ? AND passed = 0 AND first >= ? "
                 "LIMIT ?)")
        return int(db.execute(query, (net, now - self.settings.retry, self.settings.pending_max)).fetchone()[0])

    def _prune(self, db: sqlite3.Connection, now: int) -> None:
        """Delete pending triplets older than RETRY and passed ones unseen for EXPIRY."""
        s = self.settings
        gone = db.execute("DELETE FROM triplet WHERE last < ? AND (passed = 0 OR last < ?)",
                          (now - min(s.retry, s.expiry), now - s.expiry)).rowcount
        if gone > 0:
            db.execute("PRAGMA incremental_vacuum")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _create(db: sqlite3.Connection) -> None:
    """Give a new file its settings and table; another process doing the same at once is harmless."""
    # auto_vacuum must come before the first table: freed pages go back to the file system.
    db.execute("PRAGMA auto_vacuum = INCREMENTAL")
    db.execute("PRAGMA journal_mode = WAL")  # kept in the file: readers never wait for a writer
    db.execute("CREATE TABLE IF NOT EXISTS triplet (net TEXT NOT NULL, sender TEXT NOT NULL, "
               "rcpt TEXT NOT NULL, first INTEGER NOT NULL, last INTEGER NOT NULL, "
               "passed INTEGER NOT NULL, PRIMARY KEY (net, sender, rcpt)) WITHOUT ROWID")
    db.execute("CREATE INDEX IF NOT EXISTS triplet_last ON triplet (last)")


def clock(env: Mapping[bytes, bytes] | None = None) -> Callable[[], int]:
    """Return the clock: time.time, or the fixed $PYQMAIL_GREYLIST_NOW of a test."""
    e = posix.environ if env is None else env
    fixed = e.get(NOW_ENV)
    if fixed is not None:
        value = int(fixed)
        return lambda: value
    return lambda: int(time.time())


def exempt(settings: Settings, ip: str, remotehost: bytes, sender: bytes, spf_passed: bool,
           env: Mapping[bytes, bytes] | None = None,
           confirm: Callable[[bytes, str], bool] | None = None) -> bool:
    """Whether a (non-relay) client skips greylisting: $NOGREYLIST, greylistips, greylistdomains.

    confirm(remotehost, ip), when given, must say that the host name has the
    client's address (tcpserver without -p sets $TCPREMOTEHOST from the PTR
    record alone, which the owner of the address writes).
    """
    e = posix.environ if env is None else env
    if b"NOGREYLIST" in e:
        return True
    if settings.ip_listed(ip):
        return True
    if settings.domains:
        if remotehost and remotehost != b"unknown" and settings.domain_listed(remotehost.decode("latin-1")) \
                and (confirm is None or confirm(remotehost, ip)):
            return True
        at = sender.rfind(b"@")
        if spf_passed and at != -1 and settings.domain_listed(sender[at + 1:].decode("latin-1")):
            return True
    return False


def forward_confirmed(name: bytes, ip: str) -> bool:
    """Whether name's A (or AAAA) records hold ip; False when DNS cannot say."""
    from pyqmail.ucspi import dnsq

    text = ip
    if ":" in ip:
        import ipaddress

        try:
            a = ipaddress.IPv6Address(ip.split("%", 1)[0])
        except ValueError:
            return False
        text = str(a.ipv4_mapped) if a.ipv4_mapped is not None else a.compressed
    try:
        if ":" in text:
            import ipaddress

            return any(ipaddress.IPv6Address(x).compressed == text for x in dnsq.ip6(name))
        return text in dnsq.ip4(name)
    except (dnsq.Temporary, ValueError):
        return False


def preload() -> None:
    """Import what a session's first greylist check needs (tcpserver's parent calls this)."""
    import sqlite3  # noqa: F401


class GreylistCheck(policy.Check):
    """The check qmail-smtpd runs (pyqmail.smtpd.policy): 451 at RCPT for a new triplet."""

    name = "greylist"

    def __init__(self, settings: Settings, now: Callable[[], int]) -> None:
        self.settings = settings
        self.list = Greylist(settings, now)
        self.confirmed: dict[tuple[bytes, str], bool] = {}  # forward_confirmed's answers, this session

    def _confirm(self, name: bytes, ip: str) -> bool:
        key = (name, ip)
        if key not in self.confirmed:
            self.confirmed[key] = forward_confirmed(name, ip)
        return self.confirmed[key]

    def rcpt(self, s: View, addr: bytes) -> policy.Verdict | None:
        if s.relaying or not s.rcpt_allowed:
            return None  # relay clients pass; a recipient refused anyway leaves no entry
        ip = s.remoteip.decode("latin-1")
        if not ip or ip == "unknown":
            return None  # no client address (tcpserver's parent warming up): nothing to key on
        if exempt(self.settings, ip, s.remotehost, s.mailfrom, posix.environ.get(b"SPFRESULT") == b"pass",
                  confirm=self._confirm):
            return None
        try:
            verdict, wait = self.list.check(ip, s.mailfrom, addr)
        except Trouble as e:
            try:
                os.write(2, b"qmail-smtpd: greylist: not greylisting: " + str(e).encode("utf-8", "replace") + b"\n")
            except OSError:
                pass  # safe: no log to write to; the recipient is accepted as without greylisting
            return None
        return policy.Verdict(deferred(wait)) if verdict == DEFER else None


def load(env: Mapping[bytes, bytes]) -> GreylistCheck | None:
    """Return the greylisting check when control/greylist exists; sqlite3 is imported here (preload)."""
    settings = Settings.load(env)
    if settings is None:
        return None
    preload()
    if b"TCPREMOTEIP" not in env:
        _warm(settings)  # no client: tcpserver's parent preloading (a child always has TCPREMOTEIP)
    return GreylistCheck(settings, clock(env))


WARM_ROUNDS = 12  # CPython specialises a function's code after 8 calls


def _warm(settings: Settings) -> None:
    """Run the triplet check in tcpserver's parent on a database in memory, so no child runs it cold.

    tcpserver's warm-up sessions have no client address, so the check never
    reaches the file there. This runs its whole path (a new triplet, its
    retry, then reads of the passed triplet, as a bench's or a regular
    sender's session) against SQLite's in-memory database: the real file is
    not opened (an SQLite connection must not cross fork()), nothing is
    written to disk. Best effort: a failure only leaves the children colder.
    """
    when = [0]
    warm = Settings(settings.delay, settings.retry, settings.expiry, settings.ips, settings.domains, ":memory:",
                    settings.pending_max)
    g = Greylist(warm, lambda: when[0])
    try:
        for k in range(WARM_ROUNDS + 2):
            when[0] = 1_000_000 + (settings.delay + 1) * min(k, 1)  # new, then passed and read
            exempt(warm, "192.0.2.1", b"", b"warm@warm.invalid", False, {})
            g.check("192.0.2.1", b"warm@warm.invalid", b"warm@warm.invalid")
    except Trouble:
        pass  # safe: warming only; the children open the real file and report what fails
    finally:
        g.close()


policy.register("greylist", load)
