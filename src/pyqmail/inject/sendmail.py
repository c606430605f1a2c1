"""sendmail: qmail 1.03's sendmail interface to qmail-inject.

usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]

Turns sendmail's options into qmail-inject's and runs QMAILHOME/bin/qmail-inject
in its place: -t gives qmail-inject -H, otherwise -a; -F name sets MAILNAME;
-f sender is passed on and, as in netqmail/notqmail, also makes the From:
line: QMAILUSER and QMAILHOST are set from the sender (split at its last @)
and QMAILNAME, MAILNAME, NAME and MAILHOST are removed, so -F is then lost. -bp runs qmail-qread, -bs runs qmail-smtpd with the
environment of a local SMTP client, and run as `mailq` it runs qmail-qread.
sendmail's other options (-i, -oi, -odb, -oem, -v, -m, -x, -e, -p, -B, -E,
-J, -bm) are accepted and ignored, as qmail ignores them. Exits 100 on a
usage error, 111 if the home or the program to run cannot be reached.
"""

from __future__ import annotations

import os
import sys

from pyqmail import home as _home
from pyqmail.entry import program
from pyqmail.sgetopt import Getopt

EXIT_PERM = 100
EXIT_TEMP = 111

OPTIONS = "vimte:f:p:o:B:F:EJxb:"
USAGE = b"sendmail: usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]\n"
MSG_HOME = b"sendmail: fatal: unable to switch to qmail home directory\n"
MSG_NEWALIASES = b"sendmail: fatal: please use fastforward/newaliases instead\n"
MSG_CANT_RUN = b"sendmail: fatal: unable to run %s\n"

QMAIL_INJECT = "bin/qmail-inject"
QMAIL_QREAD = "bin/qmail-qread"
QMAIL_SMTPD = "bin/qmail-smtpd"

# What qmail-smtpd sees for sendmail -bs, unless the caller set PROTO itself.
SMTPD_ENV = (("RELAYCLIENT", ""), ("DATABYTES", "0"), ("PROTO", "TCP"), ("TCPLOCALIP", "127.0.0.1"),
             ("TCPLOCALHOST", "localhost"), ("TCPREMOTEIP", "127.0.0.1"),
             ("TCPREMOTEHOST", "localhost"), ("TCPREMOTEINFO", "sendmail-bs"))


class Exec(Exception):
    """Replace sendmail by a program: args are (path relative to the home, argv)."""


def _say(text: bytes) -> None:
    try:
        os.write(2, text)
    except OSError:
        pass  # safe: stderr gone; the exit code carries the failure


def run_in_place(path: str, argv: list[str]) -> int:
    """Run path with argv as execv would, in this process; return its exit code.

    A pyqmail stub's program is called directly (exec'ing it would only start
    another interpreter); anything else is exec'd. Raise OSError, or
    ImportError for a stub whose program is missing, if path cannot be run.
    """
    from pyqmail.stubfile import runnable_stub

    stub = runnable_stub(path)
    if stub is None:
        os.execv(path, argv)  # also what fails, as exec would, on a stub that is not executable
    assert stub is not None
    module = __import__(stub.module, fromlist=["main"])
    _home.set_default(stub.home)
    sys.argv = list(argv)
    rc: int = module.main(list(argv))
    return rc


def do_sender(sender: str) -> None:
    """Make qmail-inject's From: line the sender's, as notqmail's sendmail does before exec."""
    for name in ("QMAILNAME", "MAILNAME", "NAME", "QMAILHOST", "MAILHOST"):
        os.environ.pop(name, None)
    user, at, host = sender.rpartition("@")
    if not at:
        os.environ["QMAILUSER"] = sender
        return
    os.environ["QMAILHOST"] = host
    os.environ["QMAILUSER"] = user


def usage() -> int:
    """Print qmail's usage line; return the usage exit code."""
    _say(USAGE)
    return EXIT_PERM


def parse(argv: list[str]) -> list[str] | int:
    """Read sendmail's options; return qmail-inject's argv, or an exit code for a usage error.

    Raise Exec for -bp and -bs, which take effect as soon as they are read.
    """
    flag_h = False
    sender: str | None = None
    opts = Getopt(argv, OPTIONS)
    while True:
        opt = opts.next()
        if opt is None:
            break
        if opt == "t":
            flag_h = True
        elif opt == "f":
            sender = opts.optarg
        elif opt == "F":
            os.environ["MAILNAME"] = opts.optarg or ""
        elif opt in "BpvixmeoEJ":
            if opt in "EJ":
                opts.skip_rest()  # Sony NEWS-OS: an optional argument in the same word
        elif opt == "b":
            mode = (opts.optarg or "")[:1]
            if mode == "p":
                raise Exec(QMAIL_QREAD, [QMAIL_QREAD])
            if mode == "s":
                if "PROTO" not in os.environ:
                    os.environ.update(SMTPD_ENV)
                raise Exec(QMAIL_SMTPD, [QMAIL_SMTPD])
            if mode != "m":
                return usage()
        else:
            return usage()
    progname = argv[0].rsplit("/", 1)[-1] if argv else ""
    if progname == "mailq":
        raise Exec(QMAIL_QREAD, [QMAIL_QREAD])
    if progname == "newaliases":
        _say(MSG_NEWALIASES)
        return EXIT_PERM
    qiargv = [QMAIL_INJECT, "-H" if flag_h else "-a"]
    if sender is not None:
        qiargv += ["-f", sender]
        do_sender(sender)
    return qiargv + ["--"] + argv[opts.optind:]


def prepare(argv: list[str]) -> tuple[str, list[str]] | int:
    """Go to the home and read the options; return (the program to run, its argv), or an exit code."""
    try:
        os.chdir(_home.home())
    except OSError:
        _say(MSG_HOME)
        return EXIT_TEMP
    try:
        got = parse(argv)
        if isinstance(got, int):
            return got
        return QMAIL_INJECT, got
    except Exec as e:
        path, args = e.args
        return path, args


@program("sendmail", crash=EXIT_TEMP)
def main(argv: list[str]) -> int:
    """Run sendmail with argv; return its exit code (or that of the program it runs)."""
    got = prepare(argv)
    if isinstance(got, int):
        return got
    path, args = got
    try:
        return run_in_place(path, args)
    except (OSError, ImportError):
        _say(MSG_CANT_RUN % path.rsplit("/", 1)[-1].encode())
        return EXIT_TEMP
