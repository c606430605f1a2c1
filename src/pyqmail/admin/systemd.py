"""`qmail services` and `qmail systemd`: run a home at boot, without `qmail up` in the foreground.

`qmail services [--home DIR] [--smtp-port N] [--pop3-port N] [--qmtp-port N] [--smtps-port N] [--pop3s-port N] [--submission-port N]`
writes QMAILHOME/service/ exactly as `qmail up` does (pyqmail.admin.up's
`services` and `write_services`) and starts nothing: svscanboot, the book's
/service (symlink the directories there) or the systemd unit run it.

`qmail systemd [--home DIR] [ports] [--install | --uninstall] [--unit-dir DIR]`
writes the service directory and one unit, QMAILHOME/boot/systemd/NAME.service,
which runs `QMAILHOME/bin/svscan QMAILHOME/service` (svscan's pid in
QMAILHOME/run/svscan.pid, as `qmail up` keeps it) and stops with `qmail down`
(svscan first, then each service with svc -dx, then the log services).
NAME is pyqmail for /var/qmail and pyqmail-ESCAPED for any other home
(ESCAPED as `systemd-escape --path` spells the home), so that several
installations live side by side. --install also copies the unit into
--unit-dir (default /etc/systemd/system) and runs `systemctl daemon-reload`
when systemd runs; it enables and starts nothing (it prints the command).
--uninstall removes it from there.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
from typing import TextIO

from pyqmail import home as _home

UNIT_DIR = "/etc/systemd/system"
BOOT_DIR = "boot/systemd"
SVSCAN_PIDFILE = "run/svscan.pid"
UNIT_MARK = "run/svscan.unit"  # the unit whose svscan run/svscan.pid names
UNIT_PREFIX = "pyqmail"
STOP_TIMEOUT = 300  # seconds: qmail down waits up to 240 for deliveries to finish
_UNSAFE = set(" \t\n\"'\\$%;`")


class SystemdError(Exception):
    """The unit or the service directory cannot be made as asked; the message says why."""


def escape_path(path: str) -> str:
    """Return path as `systemd-escape --path` spells it (a unit name's part)."""
    trimmed = path.strip("/")
    if not trimmed:
        return "-"
    out = []
    for i, ch in enumerate(trimmed.encode()):
        c = chr(ch)
        if c == "/":
            out.append("-")
        elif (c.isascii() and (c.isalnum() or c in ":_.")) and not (i == 0 and c == "."):
            out.append(c)
        else:
            out.append(f"\\x{ch:02x}")
    return "".join(out)


def unit_name(qmail_home: str) -> str:
    """Return the unit's name: pyqmail.service for /var/qmail, pyqmail-ESCAPED.service otherwise."""
    qmail_home = os.path.normpath(qmail_home)
    if qmail_home == _home.DEFAULT_HOME:
        return f"{UNIT_PREFIX}.service"
    return f"{UNIT_PREFIX}-{escape_path(qmail_home)}.service"


def _which(name: str, fallback: str) -> str:
    for d in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    return fallback


def unit_text(qmail_home: str, inst: _home.Install) -> str:
    """Return the systemd unit that runs svscan over qmail_home/service."""
    if set(qmail_home) & _UNSAFE or not os.path.isabs(qmail_home):
        raise SystemdError(f"qmail systemd: fatal: the home {qmail_home!r} must be an absolute path "
                           "without blanks, quotes, $, % or backslashes to be named in a unit")
    bindir = os.path.join(qmail_home, "bin")
    lines = [
        f"# Written by `qmail systemd` for the pyqmail installation in {qmail_home}.",
        "[Unit]",
        f"Description=pyqmail mail system in {qmail_home} (svscan {qmail_home}/service)",
        "Documentation=man:svscan(8) man:qmail(8)",
        "After=network.target local-fs.target",
        "",
        "[Service]",
        "Type=simple",
    ]
    if inst.single:
        # A single-user home runs everything as its owner.
        owner = pwd.getpwuid(os.stat(qmail_home).st_uid).pw_name
        lines.append(f"User={owner}")
    lines += [
        f"Environment=PATH={bindir}:/usr/local/bin:/usr/bin:/bin",
        f"ExecStart={bindir}/svscan {qmail_home}/service",
        # svscan's pid where `qmail up`, `qmail down` and `qmail status` look for it, and
        # the unit's name beside it: `qmail up` must not take this svscan for one a killed
        # `qmail up` left behind (it would stop it and start its own).
        f"ExecStartPost={_which('sh', '/bin/sh')} -c 'echo $MAINPID > {qmail_home}/{SVSCAN_PIDFILE}; "
        f"echo systemd > {qmail_home}/{UNIT_MARK}'",
        # svscan first (it would restart what svc -dx stops), then each service, then the logs.
        f"ExecStop=-{bindir}/qmail down --home {qmail_home}",
        f"ExecStopPost={_which('rm', '/bin/rm')} -f {qmail_home}/{SVSCAN_PIDFILE} {qmail_home}/{UNIT_MARK}",
        "KillMode=control-group",
        f"TimeoutStopSec={STOP_TIMEOUT}",
        "Restart=always",
        "RestartSec=5",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def read_install(qmail_home: str) -> _home.Install:
    """Return the home's conf/install record; raise SystemdError if the home is not installed."""
    try:
        with open(os.path.join(qmail_home, _home.INSTALL_FILE), encoding="utf-8") as f:
            return _home.parse_install(f.read())
    except FileNotFoundError:
        raise SystemdError(f"qmail: fatal: {qmail_home} is not an installation: run qmail init --home {qmail_home}") \
            from None
    except ValueError as e:
        raise SystemdError(f"qmail: fatal: {qmail_home}: {e}") from None


def _maildir(path: str, uid: int, gid: int, chown: bool) -> None:
    for sub in ("", "tmp", "new", "cur"):
        d = os.path.join(path, sub)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        if chown:
            os.chown(d, uid, gid)


def write_services(qmail_home: str, ports: object, out: TextIO) -> list[str]:
    """Write qmail_home/service as `qmail up` would, start nothing; return the service directories."""
    from pyqmail.admin import up

    assert isinstance(ports, up.Ports)
    inst = read_install(qmail_home)
    _home.set_default(qmail_home)
    with open(os.path.join(qmail_home, "control", "me"), encoding="latin-1") as f:
        me = f.read().strip()
    # Where the default delivery ./Maildir/ goes for postmaster (the alias user) and,
    # in a single-user home, for its owner: `qmail up` makes them too.
    alias = inst.users.get("alias")
    if alias is not None:
        _maildir(os.path.join(alias.home, "Maildir"), alias.uid, alias.gid, not inst.single)
    dirs = up.write_services(qmail_home, inst, up.services(qmail_home, inst, ports, me))
    for d in dirs:
        print(f"qmail services: {d}", file=out)
    return dirs


def _ports(args: argparse.Namespace) -> object:
    from pyqmail.admin import up

    return up.ports_from(args)


def parser(prog: str, systemd: bool) -> argparse.ArgumentParser:
    """Return the parser of `qmail services` (systemd False) or `qmail systemd`."""
    p = argparse.ArgumentParser(prog=prog, description=(
        "write a systemd unit running svscan over QMAILHOME/service" if systemd
        else "write QMAILHOME/service as `qmail up` does, starting nothing"))
    p.add_argument("--home", default=None, help="the installation (default: as every qmail command)")
    p.add_argument("--smtp-port", type=int, default=None, help="SMTP port (default 25 as root, else 2525; 0: none)")
    p.add_argument("--pop3-port", type=int, default=None, help="POP3 port (default 110 as root, else 2110; 0: none)")
    p.add_argument("--qmtp-port", type=int, default=None, help="QMTP port (default 209 as root, else 2209; 0: none)")
    p.add_argument("--smtps-port", type=int, default=None, help="SMTPS port (default 465 as root, else 2465; 0: none)")
    p.add_argument("--pop3s-port", type=int, default=None, help="POP3S port (default 995 as root, else 2995; 0: none)")
    p.add_argument("--submission-port", type=int, default=None,
                   help="submission port (default 587 as root, else 2587; 0: none)")
    if systemd:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--install", action="store_true", help="also copy the unit into --unit-dir")
        g.add_argument("--uninstall", action="store_true", help="remove the unit from --unit-dir")
        p.add_argument("--unit-dir", default=UNIT_DIR, help=f"where systemd reads units (default {UNIT_DIR})")
    return p


def _reload(out: TextIO) -> None:
    systemctl = shutil.which("systemctl")
    if systemctl and os.path.isdir("/run/systemd/system"):
        subprocess.run([systemctl, "daemon-reload"], check=False)
        print("qmail systemd: systemctl daemon-reload", file=out)


def run_systemd(args: argparse.Namespace, out: TextIO) -> int:
    """Carry out `qmail systemd`; return the exit code."""
    from pyqmail.admin import install

    qmail_home = os.path.abspath(args.home or install.default_home())
    name = unit_name(qmail_home)
    installed = os.path.join(args.unit_dir, name)
    if args.uninstall:
        try:
            os.unlink(installed)
        except FileNotFoundError:
            print(f"qmail systemd: {installed} was not installed", file=out)
            return 0
        print(f"qmail systemd: removed {installed} (stop it first with: systemctl disable --now {name})", file=out)
        _reload(out)
        return 0
    inst = read_install(qmail_home)
    text = unit_text(qmail_home, inst)
    write_services(qmail_home, _ports(args), out)
    boot = os.path.join(qmail_home, BOOT_DIR)
    os.makedirs(boot, mode=0o755, exist_ok=True)
    path = os.path.join(boot, name)
    _write(path, text)
    print(f"qmail systemd: {path}", file=out)
    if args.install:
        os.makedirs(args.unit_dir, exist_ok=True)
        _write(installed, text)
        print(f"qmail systemd: installed {installed}", file=out)
        _reload(out)
        print(f"qmail systemd: start it, and at every boot, with: systemctl enable --now {name}", file=out)
    else:
        print(f"qmail systemd: install it with: qmail systemd --home {qmail_home} --install", file=out)
    return 0


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _command(argv: list[str], systemd: bool) -> int:
    try:
        args = parser(argv[0], systemd).parse_args(argv[1:])
    except SystemExit as e:
        return 0 if e.code == 0 else 100
    try:
        if systemd:
            return run_systemd(args, sys.stdout)
        from pyqmail.admin import install

        qmail_home = os.path.abspath(args.home or install.default_home())
        write_services(qmail_home, _ports(args), sys.stdout)
        return 0
    except SystemdError as e:
        print(str(e), file=sys.stderr)
        return 100
    except OSError as e:
        print(f"{argv[0]}: fatal: {e}", file=sys.stderr)
        return 111


def command(argv: list[str]) -> int:
    """`qmail systemd`: write (and perhaps install) the home's unit; 0, 100 for usage, 111 for trouble."""
    return _command(argv, systemd=True)


def services_command(argv: list[str]) -> int:
    """`qmail services`: write QMAILHOME/service without starting it; 0, 100 or 111."""
    return _command(argv, systemd=False)
