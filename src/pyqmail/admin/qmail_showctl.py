"""qmail-showctl: analyze the qmail configuration files (qmail-showctl(8)).

Prints what qmail 1.03 compiles in (home, user-ext delimiter, paternalism,
silent concurrency limit, split, user and group ids), then, for every control
file qmail 1.03 knows, in qmail's order and words, what it says: "(Default.)"
and the default when the file is missing, one line per entry for the list
files, "Oops! Trouble reading this file." when it cannot be read. Files in
control/ that qmail does not know are named last, in directory order, with
"I have no idea what this file does.". Bytes outside 32..126 in values print
as '?'. Control files are read exactly as qmail's control library reads them
(qmail-control(5)): first line only for the one-line files, trailing spaces,
tabs and newlines removed (a CR stays, and shows as '?'), a number is the
leading digits of the first line.

Exit 0; 111 if QMAILHOME/control cannot be entered or control/me cannot be
read.
"""

from __future__ import annotations

import os

from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.outbuf import Output

TYPE_CHECKING = False  # typing costs milliseconds per process start; mypy sees the imports
if TYPE_CHECKING:
    from collections.abc import Iterator

FD_OUT = 1
EXIT_OK = 0
EXIT_FATAL = 111

# What qmail 1.03 takes from conf-break, conf-patrn and conf-spawn; pyqmail
# has the same values built in.
BREAK = b"-"
PATERNALISM = 0o002
SPAWN_LIMIT = 120

OOPS_READ = b"Oops! Trouble reading this file.\n"
OOPS_ME = b"Oops! Trouble reading control/me."  # no newline: qmail prints none
NO_IDEA = b": I have no idea what this file does.\n"
DEFAULT = b"(Default.) "

_READ = 65536
_ULONG = 1 << 64
_SAFE = bytes(c if 32 <= c <= 126 else ord("?") for c in range(256))

# (kind, file, default, prefix, suffix) in qmail 1.03's order. For "str"
# files the third field says whether control/me replaces the default.
INT, STR, LST = "int", "str", "lst"
Item = tuple[str, str, object, bytes, bytes]
ITEMS_BEFORE_RCPTHOSTS: tuple[Item, ...] = (
    (LST, "badmailfrom", b"Any MAIL FROM is allowed.", b"", b" not accepted in MAIL FROM."),
    (STR, "bouncefrom", (False, b"MAILER-DAEMON"), b"Bounce user name is ", b""),
    (STR, "bouncehost", (True, b"bouncehost"), b"Bounce host name is ", b""),
    (INT, "concurrencylocal", b"10", b"Local concurrency is ", b""),
    (INT, "concurrencyremote", b"20", b"Remote concurrency is ", b""),
    (INT, "databytes", b"0", b"SMTP DATA limit is ", b" bytes"),
    (STR, "defaultdomain", (True, b"defaultdomain"), b"Default domain name is ", b""),
    (STR, "defaulthost", (True, b"defaulthost"), b"Default host name is ", b""),
    (STR, "doublebouncehost", (True, b"doublebouncehost"), b"2B recipient host: ", b""),
    (STR, "doublebounceto", (False, b"postmaster"), b"2B recipient user: ", b""),
    (STR, "envnoathost", (True, b"envnoathost"), b"Presumed domain name is ", b""),
    (STR, "helohost", (True, b"helohost"), b"SMTP client HELO host name is ", b""),
    (STR, "idhost", (True, b"idhost"), b"Message-ID host name is ", b""),
    (STR, "localiphost", (True, b"localiphost"), b"Local IP address becomes ", b""),
    (LST, "locals", b"Messages for me are delivered locally.", b"Messages for ", b" are delivered locally."),
    (STR, "me", (False, b"undefined! Uh-oh"), b"My name is ", b""),
    (LST, "percenthack", b"The percent hack is not allowed.", b"The percent hack is allowed for user%host@", b"."),
    (STR, "plusdomain", (True, b"plusdomain"), b"Plus domain name is ", b""),
    (LST, "qmqpservers", b"No QMQP servers.", b"QMQP server: ", b"."),
    (INT, "queuelifetime", b"604800", b"Message lifetime in the queue is ", b" seconds"),
)
RCPTHOSTS: Item = (LST, "rcpthosts", b"SMTP clients may send messages to any recipient.",
                   b"SMTP clients may send messages to recipients at ", b".")
MORERCPTHOSTS_USED: Item = (LST, "morercpthosts", b"No effect.",
                            b"SMTP clients may send messages to recipients at ", b".")
MORERCPTHOSTS_IRRELEVANT: Item = (LST, "morercpthosts", b"No rcpthosts; morercpthosts is irrelevant.",
                                  b"No rcpthosts; doesn't matter that morercpthosts has ", b".")
MORERCPTHOSTS_CDB = b"\nmorercpthosts.cdb: "
CDB_NONE = b"(Default.) No effect.\n"
CDB_ONLY = b"Oops! morercpthosts.cdb exists but morercpthosts doesn't.\n"
CDB_MISSING = b"Oops! morercpthosts exists but morercpthosts.cdb doesn't.\n"
CDB_OLDER = b"Oops! morercpthosts.cdb is older than morercpthosts.\n"
CDB_OK = b"Modified recently enough; hopefully up to date.\n"
ITEMS_AFTER_RCPTHOSTS: tuple[Item, ...] = (
    (STR, "smtpgreeting", (True, b"smtpgreeting"), b"SMTP greeting: 220 ", b""),
    (LST, "smtproutes", b"No artificial SMTP routes.", b"SMTP route: ", b""),
    (INT, "timeoutconnect", b"60", b"SMTP client connection timeout is ", b" seconds"),
    (INT, "timeoutremote", b"1200", b"SMTP client data timeout is ", b" seconds"),
    (INT, "timeoutsmtpd", b"1200", b"SMTP server data timeout is ", b" seconds"),
    (LST, "virtualdomains", b"No virtual domains.", b"Virtual domain: ", b""),
)
KNOWN = frozenset(
    [item[1].encode() for item in ITEMS_BEFORE_RCPTHOSTS + (RCPTHOSTS,) + ITEMS_AFTER_RCPTHOSTS]
    + [b"morercpthosts", b"morercpthosts.cdb", b".", b".."])


def safe(data: bytes | bytearray) -> bytes:
    """Return data with every byte outside 32..126 replaced by '?'."""
    return bytes(data).translate(_SAFE)


def strip_trailing(line: bytes) -> bytes:
    """Remove trailing newlines, spaces and tabs (never CRs), as qmail's control library does."""
    return line.rstrip(b"\n \t")


class ReadError(Exception):
    """A control file exists but could not be read."""


class Controls:
    """qmail 1.03's control library, reading files in the current directory.

    read_int reads into a line buffer that read_list shares. For a control
    file whose first line is empty, qmail's number scan has no length to stop
    at and reads the digits left in that buffer by the last line read; this
    class keeps that buffer too, so that `concurrencyremote` left empty after
    a `concurrencylocal` of 5 shows 5, as qmail's qmail-showctl does.
    """

    def __init__(self) -> None:
        self._line_mem = bytearray()

    def _remember(self, raw: bytes) -> None:
        if len(raw) > len(self._line_mem):
            self._line_mem.extend(bytes(len(raw) - len(self._line_mem)))
        self._line_mem[:len(raw)] = raw

    @staticmethod
    def _open(name: str) -> int | None:
        try:
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ReadError(name) from e

    @staticmethod
    def _first_line(fd: int) -> bytes:
        data = bytearray()
        while True:
            try:
                chunk = os.read(fd, _READ)
            except OSError as e:
                raise ReadError() from e
            if not chunk:
                return bytes(data)
            nl = chunk.find(b"\n")
            if nl != -1:
                data += chunk[:nl + 1]
                return bytes(data)
            data += chunk

    def read_line(self, name: str) -> bytes | None:
        """Return the first line of name, stripped; None if missing. Raise ReadError."""
        fd = self._open(name)
        if fd is None:
            return None
        try:
            return strip_trailing(self._first_line(fd))
        finally:
            os.close(fd)

    def read_int(self, name: str) -> int | None:
        """Return the number name holds as qmail's int; None if missing or no number. Raise ReadError."""
        fd = self._open(name)
        if fd is None:
            return None
        try:
            raw = self._first_line(fd)
        finally:
            os.close(fd)
        self._remember(raw)
        line = strip_trailing(raw)
        # An empty line gives qmail's scan no bound: it reads on into the buffer.
        source = line if line else bytes(self._line_mem)
        digits = 0
        while digits < len(source) and 48 <= source[digits] <= 57:
            digits += 1
        if not digits:
            return None
        u = int(source[:digits]) % _ULONG
        i = u & 0xFFFFFFFF  # stored into a C int
        return i - (1 << 32) if i >= 1 << 31 else i

    def read_list(self, name: str) -> list[bytes] | None:
        """Return the entries of list file name; None if missing. Raise ReadError."""
        fd = self._open(name)
        if fd is None:
            return None
        entries = bytearray()
        try:
            for raw in self._lines(fd):
                line = strip_trailing(raw)
                self._remember(raw)
                self._remember_nul(len(line))
                # qmail keeps a line by its first byte: not empty, not NUL, not '#'.
                if line[:1] not in (b"", b"\0", b"#"):
                    entries += line + b"\0"
        finally:
            os.close(fd)
        return bytes(entries).split(b"\0")[:-1]

    @staticmethod
    def _lines(fd: int) -> Iterator[bytes]:
        """Yield the lines of fd, each with its newline; the last may lack one. Raise ReadError."""
        buf = bytearray()
        while True:
            try:
                chunk = os.read(fd, _READ)
            except OSError as e:
                raise ReadError() from e
            if not chunk:
                if buf:
                    yield bytes(buf)
                return
            start = 0
            scan = len(buf)
            buf += chunk
            while True:
                nl = buf.find(b"\n", scan)
                if nl == -1:
                    break
                yield bytes(buf[start:nl + 1])
                start = scan = nl + 1
            del buf[:start]

    def _remember_nul(self, pos: int) -> None:
        # qmail terminates each list line with a NUL in the buffer, after the
        # trailing blanks it removed.
        if pos >= len(self._line_mem):
            self._line_mem.extend(bytes(pos + 1 - len(self._line_mem)))
        self._line_mem[pos] = 0


def _header(out: Output, home: bytes) -> None:
    inst = _home.install()

    def uid(role: str) -> int:
        acct = inst.users.get(role)
        if acct is not None:
            return acct.uid
        if role == "root" and not inst.single:
            return 0
        # Single-user mode: the one user is every qmail user, root included.
        any_acct = next(iter(inst.users.values()), None)
        return any_acct.uid if any_acct is not None else os.getuid()

    def gid(role: str) -> int:
        return inst.groups.get(role, os.getgid())

    uids = (uid(r) for r in ("alias", "qmaild", "qmaill", "root", "qmailp", "qmailq", "qmailr", "qmails"))
    out.put(b"qmail home directory: " + home + b".\n")
    out.put(b"user-ext delimiter: " + BREAK + b".\n")
    out.put(b"paternalism (in decimal): %d.\n" % PATERNALISM)
    out.put(b"silent concurrency limit: %d.\n" % SPAWN_LIMIT)
    out.put(b"subdirectory split: %d.\n" % inst.split)
    out.put(b"user ids: " + b", ".join(b"%d" % u for u in uids) + b".\n")
    out.put(b"group ids: %d, %d.\n" % (gid("nofiles"), gid("qmail")))


def show_item(out: Output, ctl: Controls, item: Item, me: bytes | None) -> int:
    """Print one control file's paragraph; return 1 if read, 0 if defaulted, -1 on trouble."""
    kind, name, default, pre, post = item
    out.put(b"\n" + name.encode() + b": ")
    try:
        if kind == INT:
            assert isinstance(default, bytes)
            number = ctl.read_int(name)
            if number is None:
                out.put(DEFAULT + pre + default + post + b".\n")
                return 0
            out.put(pre + b"%d" % max(number, 0) + post + b".\n")
            return 1
        if kind == STR:
            assert isinstance(default, tuple)
            flag_me, value = default
            line = ctl.read_line(name)
            if line is None:
                shown = me if flag_me and me is not None else value
                out.put(DEFAULT + pre + safe(shown) + b".\n")
                return 0
            out.put(pre + safe(line) + b".\n")
            return 1
        assert isinstance(default, bytes)
        entries = ctl.read_list(name)
        if entries is None:
            out.put(DEFAULT + default + b"\n")
            return 0
        out.put(b"\n")
        for entry in entries:
            if name == "smtproutes":
                entry = hide_password(entry)
            out.put(pre + safe(entry) + post + b"\n")
        return 1
    except ReadError:
        out.put(OOPS_READ)
        return -1


def hide_password(entry: bytes) -> bytes:
    """Return an smtproutes line with the smarthost password after its user replaced by a note.

    qmail 1.03 knows no passwords there; admins post this output in public.
    """
    from pyqmail.remote import auth

    line = entry.decode("latin-1")
    colon = line.find("]:") + 1 if line.startswith("[") else 0
    if not colon:
        colon = line.find(":")
    if colon < 0:
        return entry
    value = line[colon + 1:]
    route, creds = auth.split(value)
    if creds is None:
        return entry
    rest = value[len(route):]
    if rest[:1] == "|":
        shown = route + "|" + rest[1:].partition("|")[0] + "|"
    else:
        user = rest.strip(" \t").split(None, 1)[0]
        shown = route + rest[:rest.index(user) + len(user)] + " "
    return (line[:colon + 1] + shown + "(password not shown)").encode("latin-1")


def _mtime(st: os.stat_result) -> int:
    return st.st_mtime_ns // 1_000_000_000


def show_cdb(out: Output) -> None:
    """Print the morercpthosts.cdb paragraph: is the cdb there, and newer than its source?"""
    out.put(MORERCPTHOSTS_CDB)
    try:
        src: os.stat_result | None = os.stat("morercpthosts")
    except OSError:
        src = None
    try:
        cdb: os.stat_result | None = os.stat("morercpthosts.cdb")
    except OSError:
        cdb = None
    if src is None:
        out.put(CDB_NONE if cdb is None else CDB_ONLY)
    elif cdb is None:
        out.put(CDB_MISSING)
    elif _mtime(src) > _mtime(cdb):
        out.put(CDB_OLDER)
    else:
        out.put(CDB_OK)


def showctl(out: Output) -> int:
    """Print the whole configuration; return the exit code."""
    home = os.fsencode(_home.home())
    _header(out, home)
    try:
        os.chdir(home)
    except OSError:
        out.put(b"Oops! Unable to chdir to " + home + b".\n")
        return EXIT_FATAL
    try:
        os.chdir("control")
    except OSError:
        out.put(b"Oops! Unable to chdir to control.\n")
        return EXIT_FATAL
    try:
        listing = os.scandir(b".")
    except OSError:
        out.put(b"Oops! Unable to open current directory.\n")
        return EXIT_FATAL
    with listing:
        ctl = Controls()
        try:
            me = ctl.read_line("me")
        except ReadError:
            out.put(OOPS_ME)
            return EXIT_FATAL
        for item in ITEMS_BEFORE_RCPTHOSTS:
            show_item(out, ctl, item, me)
        # A rcpthosts that could not be read counts as present, as in qmail.
        if show_item(out, ctl, RCPTHOSTS, me):
            show_item(out, ctl, MORERCPTHOSTS_USED, me)
        else:
            show_item(out, ctl, MORERCPTHOSTS_IRRELEVANT, me)
        show_cdb(out)
        for item in ITEMS_AFTER_RCPTHOSTS:
            show_item(out, ctl, item, me)
        for entry in listing:
            if entry.name not in KNOWN:
                out.put(b"\n" + entry.name + NO_IDEA)
    return EXIT_OK


@program("qmail-showctl", crash=EXIT_FATAL)
def main(argv: list[str]) -> int:
    """Run qmail-showctl; return its exit code."""
    out = Output(FD_OUT)
    try:
        return showctl(out)
    finally:
        out.flush()
