"""Man pages for every program, made at install time from one source: the program's docstring.

`qmail init` writes QMAILHOME/man/manN/NAME.N for each console script of
pyproject.toml (the registry of programs), as qmail's install puts its pages
in man1, man5, man7 and man8, plus qmail's file-format pages dot-qmail(5),
qmail-control(5), envelopes(5) and qmail-log(5). A page is made from:

- SECTIONS below: the section (qmail's own for qmail's programs, Debian's
  daemontools 8 and ucspi-tcp 1 for theirs) and the one-line NAME text;
- the program module's docstring: its `usage:` block is the SYNOPSIS (or
  SYNOPSES below, for modules whose docstring has none), the rest, after
  the first line, is the DESCRIPTION.

Read them with `man -M QMAILHOME/man qmail-smtpd`.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import TextIO

MAN_DIR = "man"

# program: (section, NAME description)
SECTIONS: dict[str, tuple[int, str]] = {
    "qmail": (8, "set up, run and inspect a pyqmail installation"),
    "qmail-queue": (8, "queue a mail message for delivery"),
    "qmail-qread": (8, "list outgoing messages and recipients"),
    "qmail-qstat": (8, "summarize status of mail queue"),
    "qmail-showctl": (8, "analyze the qmail configuration files"),
    "qmail-inject": (8, "preprocess and send a mail message"),
    "sendmail": (8, "the sendmail interface to qmail-inject"),
    "datemail": (1, "sendmail with a Date field in local time"),
    "mailsubj": (1, "send a mail message with a subject line"),
    "predate": (1, "run a program with a Date field put on top of its input"),
    "qmail-queued": (8, "let local users queue mail in a root-mode installation"),
    "qmail-clean": (8, "clean up the queue directory"),
    "qmail-start": (8, "turn on mail delivery"),
    "qmail-send": (8, "deliver mail messages from the queue"),
    "qmail-todo": (8, "preprocess new messages for qmail-send"),
    "qmail-lspawn": (8, "schedule local deliveries"),
    "qmail-local": (8, "deliver or forward a mail message"),
    "qmail-getpw": (8, "give addresses to users"),
    "qmail-newu": (8, "prepare address assignments for qmail-lspawn"),
    "qmail-pw2u": (8, "build address assignments from a passwd file"),
    "qmail-rspawn": (8, "schedule remote deliveries"),
    "preline": (1, "prepend lines to message"),
    "forward": (1, "forward new mail to one or more addresses"),
    "condredirect": (1, "perhaps redirect mail to another address"),
    "bouncesaying": (1, "perhaps bounce each incoming message"),
    "except": (1, "reverse the exit code of a program"),
    "maildirmake": (1, "create a maildir for incoming mail"),
    "maildir2mbox": (1, "move mail from a maildir to an mbox"),
    "qbiff": (1, "announce new mail the moment it arrives"),
    "qreceipt": (1, "respond to delivery notice requests"),
    "dot-forward": (1, "read a sendmail-style .forward file under qmail"),
    "splogger": (8, "make entries in syslog"),
    "multilog": (8, "reads a sequence of lines from stdin and appends selected lines to any number of logs"),
    "tai64n": (8, "puts a precise timestamp on each line"),
    "tai64nlocal": (8, "converts precise TAI64N timestamps to a human-readable format"),
    "qmail-smtpd": (8, "receive mail via SMTP"),
    "qmail-newmrh": (8, "prepare morercpthosts for qmail-smtpd"),
    "qmail-newvrt": (8, "prepare validrcptto for qmail-smtpd"),
    "qmail-rcptcheckd": (8, "tell qmail-smtpd which local addresses have a mailbox"),
    "qmail-qmtpd": (8, "receive mail via QMTP"),
    "qmail-qmqpd": (8, "receive mail via QMQP"),
    "qmail-qmqpc": (8, "queue a mail message via QMQP"),
    "qmail-dkim": (8, "sign or verify a mail message with DKIM, then queue it"),
    "qmail-spamc": (8, "mark a mail message with SpamAssassin's spamd, or refuse it as spam"),
    "qmail-clamdscan": (8, "refuse a mail message in which ClamAV's clamd finds a virus"),
    "qmail-srs": (8, "send a bounce to an SRS address back to the original sender"),
    "tcpserver": (1, "accepts incoming TCP connections"),
    "tcpclient": (1, "creates an outgoing TCP connection"),
    "tcprules": (1, "compiles rules for tcpserver"),
    "tcprulescheck": (1, "tries out rules for tcpserver"),
    "rblsmtpd": (1, "blocks mail from RBL-listed sites"),
    "recordio": (1, "records the input and output of a program"),
    "tcp-env": (1, "set up TCP-related environment variables"),
    "qmail-remote": (8, "send mail via SMTP"),
    "qmail-tcpto": (8, "print TCP timeout table"),
    "qmail-tcpok": (8, "clear TCP timeout table"),
    "qmail-smtpc": (8, "send a message to a smarthost without a queue"),
    "qmail-qfilter": (1, "front end for qmail-queue that does filtering"),
    "qmail-popup": (8, "read a POP username and password"),
    "qmail-pop3d": (8, "distribute mail via POP"),
    "checkpassword": (8, "check a POP or IMAP login, then run a program as the user"),
    "saveip": (8, "record a POP3 login's address for POP-before-SMTP"),
    "checkauth": (8, "let an address that logged in to POP3 recently relay"),
    "supervise": (8, "starts and monitors a service"),
    "svscan": (8, "starts and monitors a collection of services"),
    "svscanboot": (8, "starts svscan with output to readproctitle"),
    "readproctitle": (8, "maintains an automatically rotated log in memory for inspection by ps"),
    "fghack": (8, "is an anti-backgrounding tool"),
    "pgrphack": (8, "runs a separate process group"),
    "setlock": (8, "runs another program with a file locked"),
    "svc": (8, "controls services monitored by supervise"),
    "svstat": (8, "prints the status of services monitored by supervise"),
    "svok": (8, "checks whether supervise is running"),
    "setuidgid": (8, "runs another program under a specified account's uid and gid"),
    "envuidgid": (8, "runs another program with environment variables for an account's uid and gid"),
    "envdir": (8, "runs another program with environment modified according to files in a directory"),
    "softlimit": (8, "runs another program with new resource limits"),
    "matchup": (1, "collect information on messages and deliveries from qmail-send's log"),
    "columnt": (1, "align the columns of a table"),
    "zoverall": (1, "summarize the overall statistics of a matchup output"),
    "zddist": (1, "show the distribution of delivery delays"),
    "zdeferrals": (1, "list the reasons for deferral"),
    "zfailures": (1, "list the reasons for failure"),
    "zrecipients": (1, "summarize deliveries per recipient"),
    "zrhosts": (1, "summarize deliveries per recipient host"),
    "zrxdelay": (1, "list recipients by their average delivery delay"),
    "zsenders": (1, "summarize messages per sender"),
    "zsendmail": (1, "turn matchup output into sendmail-style log lines"),
    "zsuccesses": (1, "list the reasons for success"),
    "zsuids": (1, "summarize messages per sender uid"),
    "xsender": (1, "select the messages of one sender from matchup output"),
    "xrecipient": (1, "select the deliveries to one recipient from matchup output"),
    "xqp": (1, "select the messages of one qp from matchup output"),
}

# SYNOPSIS of the programs whose docstring has no `usage:` block (qmail's man pages' own).
SYNOPSES: dict[str, str] = {
    "qmail-queue": "qmail-queue",
    "qmail-qread": "qmail-qread",
    "qmail-qstat": "qmail-qstat",
    "qmail-showctl": "qmail-showctl",
    "datemail": "datemail [ sendmail args ... ]",
    "mailsubj": "mailsubj subject recip ...",
    "predate": "predate program [ arg ... ]",
    "qmail-clean": "qmail-clean",
    "qmail-start": "qmail-start [ defaultdelivery [ logger arg ... ] ]",
    "qmail-send": "qmail-send",
    "qmail-todo": "qmail-todo",
    "qmail-lspawn": "qmail-lspawn defaultdelivery",
    "qmail-local": "qmail-local [ -nN ] user homedir local dash ext domain sender defaultdelivery",
    "qmail-getpw": "qmail-getpw local",
    "qmail-newu": "qmail-newu",
    "qmail-pw2u": "qmail-pw2u [ -/ohHuUcC ] < passwd > assign",
    "qmail-rspawn": "qmail-rspawn",
    "preline": "preline [ -dfr ] command [ arg ... ]",
    "forward": "forward address ...",
    "condredirect": "condredirect newaddress program [ arg ... ]",
    "bouncesaying": "bouncesaying error [ program [ arg ... ] ]",
    "except": "except program [ arg ... ]",
    "maildirmake": "maildirmake dir",
    "maildir2mbox": "maildir2mbox",
    "qbiff": "qbiff",
    "qreceipt": "qreceipt youraddress",
    "dot-forward": "dot-forward [ -nN ] file ...",
    "qmail-smtpd": "qmail-smtpd [ checkprogram subprogram ... ]",
    "qmail-newmrh": "qmail-newmrh",
    "qmail-newvrt": "qmail-newvrt",
    "qmail-rcptcheckd": "qmail-rcptcheckd",
    "qmail-qmtpd": "qmail-qmtpd",
    "qmail-qmqpd": "qmail-qmqpd",
    "qmail-qmqpc": "qmail-qmqpc",
    "qmail-dkim": "qmail-dkim",
    "qmail-spamc": "qmail-spamc",
    "qmail-clamdscan": "qmail-clamdscan",
    "qmail-srs": "qmail-srs",
    "tcpserver": ("tcpserver [ -1UXpPhHrRoOdDqQv46 ] [ -c limit ] [ -x rules.cdb ] [ -B banner ] [ -g gid ] "
                  "[ -u uid ] [ -b backlog ] [ -l localname ] [ -t timeout ] [ -I interface ] "
                  "host port program [ arg ... ]"),
    "tcpclient": ("tcpclient [ -46hHrRdDqQv ] [ -i localip ] [ -p localport ] [ -T timeoutconn ] [ -l localname ] "
                  "[ -t timeoutinfo ] [ -I interface ] host port program [ arg ... ]"),
    "tcprules": "tcprules rules.cdb rules.tmp",
    "tcprulescheck": "tcprulescheck rules.cdb",
    "rblsmtpd": "rblsmtpd [ -bBcC ] [ -t timeout ] [ -r base ] [ -a base ] program [ arg ... ]",
    "recordio": "recordio program [ arg ... ]",
    "tcp-env": "tcp-env [ -rR ] [ -i localip ] [ -p localport ] [ -l localname ] program [ arg ... ]",
    "qmail-remote": "qmail-remote host sender recip [ recip ... ]",
    "qmail-tcpto": "qmail-tcpto",
    "qmail-tcpok": "qmail-tcpok",
    "qmail-smtpc": "qmail-smtpc",
    "qmail-popup": "qmail-popup hostname subprogram [ arg ... ]",
    "qmail-pop3d": "qmail-pop3d maildirname",
    "checkpassword": "checkpassword program [ arg ... ]",
    "saveip": "saveip program [ arg ... ]",
    "checkauth": "checkauth program [ arg ... ]",
}

# qmail's file-format pages, short and from qmail's own pages and our readings (docs/DESIGN.md).
FORMATS: dict[str, tuple[int, str, str]] = {
    "dot-qmail": (5, "control the delivery of mail messages", """\
qmail-local(8) reads the .qmail files in a user's home directory to decide
what to do with a message for that user: HOME/.qmail for user, HOME/.qmail-ext
for user-ext, then HOME/.qmail-default and the -default files of shorter
extensions. Without any, the default delivery given to qmail-start is used.

Each line of a .qmail file is one delivery instruction:

    # comment             (ignored)
    |command              (run by /bin/sh in the home, message on stdin)
    /path/to/mbox         (append to an mbox file)
    /path/to/Maildir/     (deliver into a maildir: the trailing slash)
    &address or address   (forward to an address)

A file can also be used by several addresses through qmail-users(5). A
command's exit code decides: 0 success, 99 success and skip the rest of the
file, 100 bounce, 111 try again later; see qmail-command(8). A .qmail file
must not be writable by others: qmail-local defers such deliveries.
"""),
    "qmail-control": (5, "qmail configuration files", """\
The control files live in QMAILHOME/control. Each is a list of lines; for
most, a missing file means the default below. Trailing spaces and tabs are
removed, and lines starting with # are comments where noted.

    me              this host's name; the default of most others
    defaultdomain   appended to a host name without a dot (me)
    plusdomain      replaces a trailing + on a host name (me)
    locals          domains delivered locally (me)
    rcpthosts       domains qmail-smtpd accepts mail for (none: open relay)
    morercpthosts   more of them, compiled by qmail-newmrh into morercpthosts.cdb
    virtualdomains  domain:prepend lines for virtual domains
    smtproutes      domain:relay lines for qmail-remote
    concurrencylocal, concurrencyremote   parallel deliveries (10, 20)
    queuelifetime   seconds a message may stay in the queue (604800)
    databytes       the largest message qmail-smtpd accepts (0: no limit)
    badmailfrom     envelope senders qmail-smtpd refuses
    bouncefrom, bouncehost, doublebounceto, doublebouncehost   bounce addresses
    timeoutsmtpd, timeoutremote, timeoutconnect   seconds (1200, 1200, 60)

qmail-showctl(8) prints what each program will use.
"""),
    "envelopes": (5, "sender/recipient lists attached to messages", """\
Each message in the queue has an envelope: the sender address, to which
bounces go, and a list of recipient addresses. qmail-queue(8) reads it on
descriptor 1 as: F, the sender, NUL; then for each recipient T, the
address, NUL; then a final NUL. An empty sender (F NUL) means a bounce:
bounces of it are double bounces, sent to doublebounceto.

qmail-send writes a Return-Path field with the sender on each local
delivery, and qmail-local a Delivered-To field with the recipient.
"""),
    "qmail-log": (5, "the qmail activity record", """\
qmail-send(8) prints one line per event on its descriptor 0, to the logger
qmail-start(8) runs (splogger or multilog):

    new msg M                          a message entered the queue
    info msg M: bytes B from <S> qp P uid U
    starting delivery D: msg M to local|remote R
    status: local L/LM remote R/RM     deliveries in progress
    delivery D: success|deferral|failure: TEXT
    bounce msg M qp P                  a bounce was queued
    end msg M                          the message left the queue

and warning: and alert: lines for trouble. matchup(1) and the other
qmailanalog programs read this record.
"""),
}


def _program_modules() -> dict[str, str]:
    from pyqmail.admin import install

    return install.programs()


def escape(text: str) -> str:
    """Return text safe as roff body text: backslashes, leading dots/quotes, non-ASCII escaped."""
    out = []
    for line in text.split("\n"):
        line = line.replace("\\", "\\e")
        line = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in line)
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


_USAGE = re.compile(r"^usage: .*(?:\n[ \t]+\S.*)*", re.M)


def split_docstring(doc: str) -> tuple[str, str]:
    """Return (usage block without 'usage: ', description) of a program's docstring."""
    lines = doc.strip("\n").split("\n")
    rest = "\n".join(lines[1:]).strip("\n")
    m = _USAGE.search(rest)
    if m is None:
        return "", rest
    usage_lines = m.group(0).split("\n")
    usage = "\n".join([usage_lines[0][len("usage: "):]] + [u.strip() for u in usage_lines[1:]])
    return usage, (rest[:m.start()] + rest[m.end():]).strip("\n")


def _paragraphs(text: str) -> list[str]:
    """roff for text: blank lines start paragraphs, indented blocks are shown as they are."""
    out: list[str] = []
    block: list[str] = []
    indented = False

    def flush() -> None:
        nonlocal block
        if block:
            if indented:
                width = min(len(b) - len(b.lstrip()) for b in block if b.strip())
                out.append(".PP\n.RS\n.nf\n" + escape("\n".join(b[width:] for b in block)) + "\n.fi\n.RE")
            else:
                out.append(".PP\n" + escape("\n".join(b.strip() for b in block)))
        block = []

    for line in text.split("\n"):
        if not line.strip():
            flush()
            continue
        this = line[:1] in (" ", "\t")
        if block and this != indented:
            flush()
        indented = this
        block.append(line.rstrip())
    flush()
    return out


def render(name: str, section: int, description: str, synopsis: str, body: str, version: str) -> str:
    """Return the roff page of name(section)."""
    parts = [f'.TH {name.upper()} {section} "" "pyqmail {version}" "pyqmail"',
             ".SH NAME", f"{escape(name)} \\- {escape(description)}"]
    if synopsis:
        parts += [".SH SYNOPSIS", ".nf", escape(synopsis), ".fi"]
    if body.strip():
        parts += [".SH DESCRIPTION", *_paragraphs(body)]
    return "\n".join(parts) + "\n"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("pyqmail")
    except Exception:  # noqa: BLE001 - PackageNotFoundError and a broken metadata alike
        return "0"


def pages() -> dict[str, str]:
    """Return {'manN/NAME.N': roff text} for every program and file-format page."""
    version = _version()
    out = {}
    for name, module in sorted(_program_modules().items()):
        section, description = SECTIONS.get(name, (8, name))
        doc = importlib.import_module(module).__doc__ or ""
        usage, body = split_docstring(doc)
        synopsis = usage or SYNOPSES.get(name, name)
        out[f"man{section}/{name}.{section}"] = render(name, section, description, synopsis, body, version)
    for name, (section, description, text) in FORMATS.items():
        out[f"man{section}/{name}.{section}"] = render(name, section, description, "", text, version)
    return out


def install(qmail_home: str, out: TextIO | None = None) -> list[str]:
    """Write every page under QMAILHOME/man/manN/ (mode 644, replacing); return their paths."""
    top = os.path.join(qmail_home, MAN_DIR)
    written = []
    for rel, text in pages().items():
        path = os.path.join(top, rel)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
    if out is not None:
        print(f"Man pages in {top}: read them with man -M {top} NAME", file=out)
    return written


def command(argv: list[str]) -> int:
    """`qmail man [--home DIR]`: (re)write the home's man pages; 0, or 111 if they cannot be written."""
    import argparse

    from pyqmail.admin import install as _install

    p = argparse.ArgumentParser(prog=argv[0], description="write QMAILHOME/man from the installed programs")
    p.add_argument("--home", default=None, help="the installation (default: as every qmail command)")
    try:
        args = p.parse_args(argv[1:])
    except SystemExit as e:
        return 0 if e.code == 0 else 100
    qmail_home = os.path.abspath(args.home or _install.default_home())
    try:
        install(qmail_home, sys.stdout)
    except OSError as e:
        print(f"{argv[0]}: fatal: {e}", file=sys.stderr)
        return 111
    return 0
