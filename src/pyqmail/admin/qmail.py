"""qmail: the front command of a pyqmail installation.

usage: qmail init [--home DIR] [--user NAME] [--split N] [--force]
                  [--create-users] [--single-user] [--flat-todo] [FQDN]
       qmail init --upgrade [--home DIR] [--big-todo]
       qmail init --new-cert [--home DIR]
       qmail up [--home DIR] [--smtp-port N] [--pop3-port N] [--qmtp-port N]
                [--smtps-port N] [--pop3s-port N] [--submission-port N]
       qmail down [--home DIR]
       qmail user add|del|passwd|list [--home DIR] [NAME]
       qmail status|doctor|trace|queue|report [--home DIR] ...
       qmail services [--home DIR] [--smtp-port N] [--pop3-port N] [--qmtp-port N]
       qmail systemd [--home DIR] [ports] [--install | --uninstall] [--unit-dir DIR]
       qmail sendmail-install [--home DIR] [--remove] [--force] [--sbin PATH] [--lib PATH]
       qmail man [--home DIR]

Each command of COMMANDS lives in its own module, imported only when it runs,
as `command(argv) -> exit code` with argv[0] "qmail NAME": its options are its
own business (`qmail NAME --help`).
"""

from __future__ import annotations

import argparse
import sys

from pyqmail.entry import program

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "status": ("pyqmail.admin.status", "services, queue and recent errors of a running installation"),
    "doctor": ("pyqmail.admin.doctor", "check an installation for the faults admins hit, with the fix for each"),
    "trace": ("pyqmail.admin.trace", "show how an address would be routed and delivered"),
    "queue": ("pyqmail.admin.queue", "list, show, delete, expire or retry queued messages"),
    "report": ("pyqmail.admin.report", "an HTML page of delivery statistics from qmail-send's log"),
    "services": ("pyqmail.admin.services", "write QMAILHOME/service as `qmail up` does, starting nothing"),
    "systemd": ("pyqmail.admin.systemd", "write (--install: and install) a systemd unit running the home at boot"),
    "sendmail-install": ("pyqmail.admin.sendmail_install",
                         "make this home's sendmail the system's /usr/sbin/sendmail (--remove: undo)"),
    "man": ("pyqmail.admin.manpages", "write the man pages into QMAILHOME/man (qmail init does)"),
    "dkim": ("pyqmail.admin.dkim", "DKIM keys for qmail-dkim: keygen DOMAIN [SELECTOR] writes one, prints its DNS record"),
}


def _parser() -> argparse.ArgumentParser:
    from pyqmail.admin import install

    p = argparse.ArgumentParser(prog="qmail", description="Set up and run a pyqmail installation.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    i = sub.add_parser("init", help="install and configure a qmail home (qmail's install + config-fast)")
    i.add_argument("--home", default=None, help="the home to create (default: " + install.HOME_HELP.partition("(default: ")[2])
    i.add_argument("--user", default=None, help="the user postmaster, mailer-daemon and root mail goes to")
    i.add_argument("--split", type=int, default=install.DEFAULT_SPLIT, help="queue split (conf-split, default 23)")
    i.add_argument("--force", action="store_true", help="overwrite existing control and alias files")
    i.add_argument("--create-users", action="store_true", help="as root, create missing qmail users and groups")
    i.add_argument("--single-user", action="store_true", help="everything owned by and run as the invoking user")
    i.add_argument("--upgrade", action="store_true",
                   help="install the running pyqmail's code into an existing home and point its stubs at it; "
                        "control files, aliases, users and the queue are kept, nothing is restarted")
    i.add_argument("--flat-todo", dest="todo", action="store_const", const="flat", default="",
                   help="a new queue's intd/ and todo/ unsplit, as qmail 1.03 makes them (default: split as "
                        "mess/, the big-todo layout)")
    i.add_argument("--big-todo", dest="todo", action="store_const", const="big",
                   help="with --upgrade: split a flat queue's intd/ and todo/ (waiting messages stay readable)")
    i.add_argument("--new-cert", action="store_true",
                   help="replace control/servercert.pem by a new self-signed certificate for control/me "
                        "(the old one kept as servercert.pem.old)")
    i.add_argument("fqdn", nargs="?", default=None, metavar="FQDN", help="this host's fully qualified name (default: from DNS)")
    for name, text in (("up", "run the mail system until Ctrl-C or `qmail down`"),
                       ("down", "stop what `qmail up` started")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--home", default=None, help=install.HOME_HELP)
        if name == "up":
            c.add_argument("--smtp-port", type=int, default=None, help="SMTP port (default 25 as root, else 2525; 0: none)")
            c.add_argument("--pop3-port", type=int, default=None, help="POP3 port (default 110 as root, else 2110; 0: none)")
            c.add_argument("--qmtp-port", type=int, default=None, help="QMTP port (default 209 as root, else 2209; 0: none)")
            c.add_argument("--smtps-port", type=int, default=None,
                           help="SMTPS port, TLS from the first byte (default 465 as root, else 2465; 0: none)")
            c.add_argument("--pop3s-port", type=int, default=None,
                           help="POP3S port, TLS from the first byte (default 995 as root, else 2995; 0: none)")
            c.add_argument("--submission-port", type=int, default=None,
                           help="submission port, STARTTLS and AUTH required (default 587 as root, else 2587; 0: none)")
    for name, (_module, text) in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    u = sub.add_parser("user", help="manage the POP3 virtual users (QMAILHOME/users/poppasswd)")
    usub = u.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("add", "add a user: password from stdin, or prompted on a terminal"),
                         ("del", "remove a user (its home and mail stay)"),
                         ("passwd", "set a user's password"),
                         ("list", "show name, uid, gid and home of each user")):
        a = usub.add_parser(action, help=text)
        a.add_argument("--home", default=None, help=install.HOME_HELP)
        if action != "list":
            a.add_argument("name", metavar="NAME")
        if action == "add":
            a.add_argument("--uid", default=None, help="user name or uid mail is read as (default: yours; required as root)")
            a.add_argument("--gid", default=None, help="group name or gid (default: the uid's primary group)")
            a.add_argument("--home-dir", default=None, help="the user's home, where Maildir/ is made (default: QMAILHOME/pop/NAME)")
    return p


@program("qmail", crash=111)
def main(argv: list[str]) -> int:
    """Run a qmail subcommand."""
    if len(argv) > 1 and argv[1] in COMMANDS:
        import importlib

        module = importlib.import_module(COMMANDS[argv[1]][0])
        code: int = module.command([f"qmail {argv[1]}", *argv[2:]])
        return code
    try:
        args = _parser().parse_args(argv[1:])
    except SystemExit as e:
        return 0 if e.code == 0 else 100
    if args.command == "init":
        from pyqmail.admin import install

        if (args.upgrade or args.new_cert) and args.fqdn is not None:
            print(f"qmail init: fatal: {'--upgrade' if args.upgrade else '--new-cert'} keeps control/me: "
                  "give no FQDN", file=sys.stderr)
            return 100
        opts = install.Options(
            home=args.home or install.default_home(), fqdn=args.fqdn, user=args.user,
            split=args.split, force=args.force, create_users=args.create_users,
            single_user=args.single_user, upgrade=args.upgrade, new_cert=args.new_cert, todo=args.todo)
        return install.init(opts, sys.stdout, sys.stderr)
    if args.command in ("up", "down"):
        import os

        from pyqmail.admin import install, up

        qhome = os.path.abspath(args.home or install.default_home())
        if args.command == "down":
            return up.down(qhome)
        return up.up(qhome, ports=up.ports_from(args))
    if args.command == "user":
        import os

        from pyqmail.admin import install, users

        return users.run(args, os.path.abspath(args.home or install.default_home()))
    return 100
