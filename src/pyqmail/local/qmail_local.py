"""qmail-local: deliver or forward a mail message (qmail-local(8), dot-qmail(5), qmail-command(8)).

    qmail-local [ -nN ] user homedir local dash ext domain sender defaultdelivery

The message is on descriptor 0, which must be seekable: every delivery
instruction reads it from the start. qmail-local changes to homedir, refuses
a writable or sticky home, bounces a message that already carries its
Delivered-To line, finds the .qmail file for dash+ext (dotqmail.candidates),
and follows its lines in order: mbox and Maildir deliveries, programs run by
/bin/sh in the home directory, and forwards, which are queued together after
all other lines succeeded. It exits 0 after printing ``did F+W+P`` (files,
forwards, programs; then ``qp PID`` if it forwarded), 100 for a permanent
failure and 111 for a temporary one, explaining the failure on stderr in
qmail's words. qmail-lspawn reads both streams as the delivery report.

With -n it prints the delivery instructions instead of following them.
qmail-local never changes its uid: qmail-lspawn starts it as the recipient.

SMTPUTF8 (RFC 6531/6532): ext and the addresses are bytes; a UTF-8 extension finds its
`.qmail-EXT` file (only ASCII letters are lowercased, as qmail), and a UTF-8 local part of
the sender stays unquoted in Return-Path (a legacy 8-bit one is quoted as before).
"""

from __future__ import annotations

import os
import time

from pyqmail import durable, errors, rfc822, slurp, spawn
from pyqmail.entry import program
from pyqmail.local import dotqmail, maildir, mbox
from pyqmail.queue.qq import QQ
from pyqmail.sgetopt import Getopt

FD_MESSAGE = 0
FD_REPORT = 1
FD_ERROR = 2

EXIT_OK = 0
EXIT_PERMANENT = 100
EXIT_TEMPORARY = 111

# The mode bits refused on the home and on .qmail files (conf-patrn), and
# the x bit of a forwarding-only .qmail: dotqmail's, one definition for both.
PATRN = dotqmail.PATRN
STICKY = 0o1000
CUTABLE = dotqmail.CUTABLE
DOTQMAIL_MAX = 64 << 20  # bytes of a .qmail file read; more is answered as qmail answers no memory
SHELL = "/bin/sh"
_CHUNK = 65536

# Every text qmail-local writes, in qmail 1.03's words.
USAGE = b"qmail-local: usage: qmail-local [ -nN ] user homedir local dash ext domain sender aliasempty"
NOMEM = b"Out of memory. (#4.3.0)"
REWIND = b"Unable to rewind message. (#4.3.0)"
CHILD_CRASHED = b"Aack, child crashed. (#4.3.0)"
FORK = b"Unable to fork: %s. (#4.3.0)"
READ = b"Unable to read message: %s. (#4.3.0)"
SLOWLOCK = b"File has been locked for 30 seconds straight. (#4.3.0)"
OPEN_QMAIL = b"Unable to open %s: %s. (#4.3.0)"
SWITCH = b"Unable to switch to %s: %s. (#4.3.0)"
HOME_STAT = b"Unable to stat home directory: %s. (#4.3.0)"
HOME_WRITABLE = b"Uh-oh: home directory is writable. (#4.7.0)"
HOME_STICKY = b"Home directory is sticky: user is editing his .qmail file. (#4.2.1)"
WARN_STICKY = b"Warning: home directory is sticky."
QMAIL_WRITABLE = b"Uh-oh: .qmail file is writable. (#4.7.0)"
LOOPING = b"This message is looping: it already has my Delivered-To line. (#5.4.6)"
NO_MAILBOX = b"Sorry, no mailbox here by that name. (#5.1.1)"
FIRST_BLANK = b"Uh-oh: first line of .qmail file is blank. (#4.2.1)"
XBIT_FILE = b"Uh-oh: .qmail has file delivery but has x bit set. (#4.7.0)"
XBIT_PROGRAM = b"Uh-oh: .qmail has prog delivery but has x bit set. (#4.7.0)"
MAILDIR_CHDIR = b"Unable to chdir to maildir. (#4.2.1)"
MAILDIR_TIMEOUT = b"Timeout on maildir delivery. (#4.3.0)"
MAILDIR_READ = b"Unable to read message. (#4.3.0)"
MAILDIR_TEMPORARY = b"Temporary error on maildir delivery. (#4.3.0)"
MBOX_OPEN = b"Unable to open %s: %s. (#4.2.1)"
MBOX_WRITE = b"Unable to write %s: %s. (#4.3.0)"
RUN_SHELL = b"Unable to run /bin/sh: %s. (#4.3.0)"
FORWARD_FAILED = b"Unable to forward message: %s."
QQ_READ_ERROR = b"qq read error (#4.3.0)"
# What -n prints for each kind of line.
SAY = {dotqmail.MBOX: b"mbox ", dotqmail.MAILDIR: b"maildir ", dotqmail.PROGRAM: b"program ",
       dotqmail.FORWARD: b"forward "}



class Stop(Exception):
    """Delivery ends here: exit `code`, after writing `text` (if any) on stderr.

    qmail-local gives up at the first failing instruction, from however deep
    it is; this carries the exit code and qmail's words out to main.
    """

    def __init__(self, code: int, text: bytes = b"") -> None:
        super().__init__(code, text)
        self.code = code
        self.text = text


def _err(e: OSError) -> bytes:
    return errors.describe(e).encode("latin-1", "replace")


def _say(fd: int, data: bytes) -> None:
    """Write data to fd; a failure is ignored, as qmail's report writes are unchecked."""
    try:
        durable.write_all(fd, data)
    except OSError:
        pass  # the exit code, not the report, tells qmail-lspawn what happened


# The header lines qmail-local adds (pure).

def delivered_to(local: bytes, host: bytes) -> bytes:
    """Return the Delivered-To line for local@host (DTLINE)."""
    return b"Delivered-To: " + (local + b"@" + host).replace(b"\n", b"_") + b"\n"


def return_path(sender: bytes) -> bytes:
    """Return the Return-Path line for sender (RPLINE); a UTF-8 local part stays unquoted (RFC 6532)."""
    box = sender[:sender.rfind(b"@")] if b"@" in sender else sender
    utf8 = not box.isascii() and rfc822.utf8_word(box)
    return (b"Return-Path: <" + rfc822.quote2(sender, utf8)).replace(b"\n", b"_") + b">\n"


def from_line(sender: bytes, when: float) -> bytes:
    """Return the mbox From_ line for sender at time when (UFLINE)."""
    who = sender.translate(_FROM_BLANKS) if sender else b"MAILER-DAEMON"
    return b"From " + who + b" " + mbox.ctime(when)


_FROM_BLANKS = bytes.maketrans(b" \t\n", b"---")


# Acting on the message on descriptor 0.

def _rewind() -> None:
    try:
        os.lseek(FD_MESSAGE, 0, os.SEEK_SET)
    except OSError:
        raise Stop(EXIT_TEMPORARY, REWIND) from None


def _check_loop(dtline: bytes) -> None:
    """Bounce the message if its header already has dtline (qmail's bouncexf)."""
    _rewind()
    # Only lines as long as dtline matter: longer ones are skipped in pieces.
    limit = len(dtline) + 1
    with open(FD_MESSAGE, "rb", buffering=_CHUNK, closefd=False) as msg:
        while True:
            try:
                line = msg.readline(limit)
                if line.endswith(b"\n"):
                    if len(line) <= 1:
                        return  # the blank line that ends the header
                    if line == dtline:
                        raise Stop(EXIT_PERMANENT, LOOPING)
                    continue
                if len(line) < limit:
                    return  # the last line has no newline: it is not a header line
                while True:  # the rest of a long line
                    piece = msg.readline(_CHUNK)
                    if piece.endswith(b"\n"):
                        break
                    if len(piece) < _CHUNK:
                        return
            except OSError as e:
                raise Stop(EXIT_TEMPORARY, READ % _err(e)) from None


_maildir_pid_used = False
_maildir_seq = 0  # in a qmail-lspawn worker: which of its deliveries this is (0: a process of its own)


def worker_reset(seq: int) -> None:
    """Start delivery number seq of a qmail-lspawn worker: the state of a new qmail-local process.

    The worker's pid names one Maildir message of every delivery it runs, so
    the name carries seq too (maildir.unique_name's Q part): two deliveries
    of one worker in the same second never share a name.
    """
    global _maildir_pid_used, _maildir_seq
    _maildir_pid_used = False
    _maildir_seq = seq


def _deliver_maildir(path: bytes, head: bytes) -> None:
    global _maildir_pid_used
    _rewind()
    if not _maildir_pid_used:
        # The first Maildir delivery of this qmail-local runs in this
        # process: its pid makes the name unique as a child's would, and a
        # fork costs more here than the whole delivery. Later ones fork.
        _maildir_pid_used = True
        code = maildir.deliver(path, FD_MESSAGE, head, pid=os.getpid(), host=maildir.hostname(),
                               clock=time.time, sleep=time.sleep, seq=_maildir_seq)
        _maildir_result(code)
        return
    try:
        child = os.fork()
    except OSError as e:
        raise Stop(EXIT_TEMPORARY, FORK % _err(e)) from None
    if child == 0:
        # A child per delivery, as qmail: its pid makes the name unique even
        # for two deliveries to one Maildir in the same second.
        code = maildir.TEMPORARY
        try:
            code = maildir.deliver(path, FD_MESSAGE, head, pid=os.getpid(), host=maildir.hostname(),
                                   clock=time.time, sleep=time.sleep)
        except BaseException as e:  # noqa: BLE001 - the child must end in _exit, with a temporary code
            _say(FD_ERROR, f"qmail-local: maildir delivery: {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        finally:
            os._exit(code)
    code = spawn.wait(child)
    if code < 0:
        raise Stop(EXIT_TEMPORARY, CHILD_CRASHED)
    _maildir_result(code)


def _maildir_result(code: int) -> None:
    if code == maildir.OK:
        return
    text = {maildir.NO_CHDIR: MAILDIR_CHDIR, maildir.TIMEOUT: MAILDIR_TIMEOUT,
            maildir.READ_ERROR: MAILDIR_READ}.get(code, MAILDIR_TEMPORARY)
    raise Stop(EXIT_TEMPORARY, text)


def _deliver_mbox(path: bytes, head: bytes) -> None:
    _rewind()
    outcome, err = mbox.deliver(path, FD_MESSAGE, head)
    if outcome == mbox.OK:
        return
    if outcome == mbox.LOCK_TIMEOUT or err is None:
        raise Stop(EXIT_TEMPORARY, SLOWLOCK)
    if outcome == mbox.OPEN_ERROR:
        raise Stop(EXIT_TEMPORARY, MBOX_OPEN % (path, _err(err)))
    if outcome == mbox.READ_ERROR:
        raise Stop(EXIT_TEMPORARY, READ % _err(err))
    raise Stop(EXIT_TEMPORARY, MBOX_WRITE % (path, _err(err)))


def _run_program(command: bytes, env: dict[str, str]) -> bool:
    """Run command with sh -c in the current (home) directory; return True for exit 99."""
    _rewind()
    try:
        pid = spawn.spawn(SHELL, [SHELL, "-c", os.fsdecode(command)], env=env)
    except OSError as e:
        # spawn names the program in an exec failure; a failed fork names nothing.
        raise Stop(EXIT_TEMPORARY, (RUN_SHELL if e.filename else FORK) % _err(e)) from None
    code = spawn.wait(pid)
    if code < 0:
        raise Stop(EXIT_TEMPORARY, CHILD_CRASHED)
    if code == 0:
        return False
    if code == dotqmail.PROGRAM_STOP:
        return True
    raise Stop(EXIT_PERMANENT if code in dotqmail.PROGRAM_HARD else EXIT_TEMPORARY)


def _srs(sender: bytes) -> bytes:
    """Return the sender forwards leave with: SRS-rewritten when control/srsdomain is set (pyqmail.filter.srs)."""
    from pyqmail.filter import srs

    try:
        return srs.forward_sender(sender, time.time())
    except srs.ConfigError as e:
        raise Stop(EXIT_TEMPORARY, FORWARD_FAILED % (str(e).encode() + b" (#4.3.0)")) from None


def _forward(recipients: list[bytes], sender: bytes, dtline: bytes, env: dict[str, str]) -> int:
    """Queue the message, with dtline on top, to recipients from sender; return qmail-queue's pid."""
    _rewind()
    try:
        qq = QQ(env)
    except OSError as e:
        raise Stop(EXIT_TEMPORARY, FORK % _err(e)) from None
    qq.write(dtline)
    while True:
        try:
            chunk = os.read(FD_MESSAGE, _CHUNK)
        except OSError:
            # Leave without the envelope: qmail-queue sees it end early and
            # queues nothing when this process exits.
            raise Stop(EXIT_TEMPORARY, FORWARD_FAILED % QQ_READ_ERROR) from None
        if not chunk:
            break
        qq.write(chunk)
    report = qq.close(sender, recipients)
    if report:
        raise Stop(EXIT_PERMANENT if report[:1] == b"D" else EXIT_TEMPORARY, FORWARD_FAILED % report[1:])
    return qq.pid


# The home directory and the .qmail file.

def _check_home(doit: bool) -> None:
    try:
        st = os.stat(".")
    except OSError as e:
        raise Stop(EXIT_TEMPORARY, HOME_STAT % _err(e)) from None
    if st.st_mode & PATRN:
        raise Stop(EXIT_TEMPORARY, HOME_WRITABLE)
    if st.st_mode & STICKY:
        if doit:
            raise Stop(EXIT_TEMPORARY, HOME_STICKY)
        _say(FD_ERROR, WARN_STICKY + b"\n")


def _slurp(fd: int) -> bytes:
    """Read the whole .qmail file on fd and close it."""
    try:
        data = slurp.read_all(fd, DOTQMAIL_MAX)
    except OSError:
        data = None  # qmail answers a failed slurp as it answers no memory
    finally:
        os.close(fd)
    if data is None:
        raise Stop(EXIT_TEMPORARY, NOMEM)
    return data


def _search(dash: bytes, ext: bytes) -> tuple[int, bool, bytes | None] | None:
    """Find the .qmail file for dash+ext (dotqmail.search): (fd, x bit, DEFAULT or None), or None."""
    try:
        return dotqmail.search(dash, ext)
    except dotqmail.Unreadable as e:
        raise Stop(EXIT_TEMPORARY, OPEN_QMAIL % (e.name, _err(e.error))) from None
    except dotqmail.Writable:
        raise Stop(EXIT_TEMPORARY, QMAIL_WRITABLE) from None


def _exists(name: bytes) -> bool:
    try:
        os.stat(name)
    except OSError as e:
        if errors.temporary(e):
            raise Stop(EXIT_TEMPORARY, OPEN_QMAIL % (name, _err(e))) from None
        return False
    return True


def _new_sender(sender: bytes, local: bytes, host: bytes, dash: bytes, ext: bytes) -> bytes:
    """Return the envelope sender for forwards, by the -owner files of dot-qmail(5)."""
    if sender in (b"", b"#@[]"):
        return sender
    owner, owner_default = dotqmail.owner_names(dash, ext)
    if not _exists(owner):
        return sender
    return dotqmail.new_sender(sender, local, host, True, _exists(owner_default))


def _setenv(env: dict[str, str], name: str, value: bytes) -> None:
    env[name] = os.fsdecode(value)


@program("qmail-local", crash=EXIT_TEMPORARY)
def main(argv: list[str]) -> int:
    """Deliver the message on descriptor 0 as argv says; return 0, 100 or 111."""
    os.umask(0o077)
    try:
        return _run(argv)
    except Stop as stop:
        if stop.text:
            _say(FD_ERROR, stop.text + b"\n")
        return stop.code


def _run(argv: list[str]) -> int:
    doit = True
    opts = Getopt(argv, "nN")
    for opt, _ in opts:
        if opt == "n":
            doit = False
        elif opt == "N":
            doit = True
        else:
            raise Stop(EXIT_PERMANENT, USAGE)
    args = [os.fsencode(a) for a in opts.operands()]
    if len(args) != 8:
        raise Stop(EXIT_PERMANENT, USAGE)
    user, homedir, local, dash, ext, host, sender, aliasempty = args
    if not homedir.startswith(b"/"):
        raise Stop(EXIT_PERMANENT, USAGE)
    try:
        os.chdir(homedir)
    except OSError as e:
        raise Stop(EXIT_TEMPORARY, SWITCH % (homedir, _err(e))) from None
    _check_home(doit)

    env = dict(os.environ)
    _setenv(env, "HOST", host)
    _setenv(env, "HOME", homedir)
    _setenv(env, "USER", user)
    _setenv(env, "LOCAL", local)
    _setenv(env, "RECIPIENT", local + b"@" + host)
    dtline = delivered_to(local, host)
    _setenv(env, "DTLINE", dtline)
    if doit:
        _check_loop(dtline)
    _setenv(env, "SENDER", sender)
    rpline = return_path(sender)
    _setenv(env, "RPLINE", rpline)
    ufline = from_line(sender, time.time())
    _setenv(env, "UFLINE", ufline)
    for name, value in zip(("EXT", "EXT2", "EXT3", "EXT4"), dotqmail.ext_parts(ext)):
        _setenv(env, name, value)
    for name, value in zip(("HOST2", "HOST3", "HOST4"), dotqmail.host_parts(host)):
        _setenv(env, name, value)

    found = _search(dash, ext)
    if found is None and dash:
        raise Stop(EXIT_PERMANENT, NO_MAILBOX)
    forward_only = False
    cmds = b""
    if found is not None:
        fd, forward_only, default = found
        if default is not None:
            _setenv(env, "DEFAULT", default)
        try:
            newsender = _new_sender(sender, local, host, dash, ext)
        except BaseException:
            os.close(fd)
            raise
        cmds = _slurp(fd)
    else:
        newsender = _new_sender(sender, local, host, dash, ext)
    _setenv(env, "NEWSENDER", newsender)

    if not cmds:
        cmds = aliasempty
        forward_only = False

    counts = [0, 0, 0]  # files, forwards, programs
    recipients: list[bytes] = []
    for index, ins in enumerate(dotqmail.parse(cmds)):
        kind = ins.kind
        if kind == dotqmail.BLANK:
            if index == 0:
                raise Stop(EXIT_TEMPORARY, FIRST_BLANK)
        elif kind in (dotqmail.MBOX, dotqmail.MAILDIR):
            counts[0] += 1
            if forward_only:
                raise Stop(EXIT_TEMPORARY, XBIT_FILE)
            if not doit:
                _say(FD_REPORT, SAY[kind] + ins.shown + b"\n")
            elif kind == dotqmail.MAILDIR:
                _deliver_maildir(ins.target, rpline + dtline)
            else:
                _deliver_mbox(ins.target, ufline + rpline + dtline)
        elif kind == dotqmail.PROGRAM:
            counts[2] += 1
            if forward_only:
                raise Stop(EXIT_TEMPORARY, XBIT_PROGRAM)
            if not doit:
                _say(FD_REPORT, SAY[kind] + ins.shown + b"\n")
            elif _run_program(ins.target, env):
                break  # exit 99: ignore the rest, but forward what came before
        elif kind == dotqmail.LIST:
            forward_only = True
        elif kind == dotqmail.FORWARD:
            counts[1] += 1
            if doit:
                recipients.append(ins.target)
            else:
                _say(FD_REPORT, SAY[kind] + ins.shown + b"\n")

    qp = 0
    if recipients:
        qp = _forward(recipients, _srs(newsender), dtline, env)
    report = b"did %d+%d+%d\n" % (counts[0], counts[1], counts[2])
    if qp:
        report += b"qp %d\n" % qp
    _say(FD_REPORT, report)
    return EXIT_OK
