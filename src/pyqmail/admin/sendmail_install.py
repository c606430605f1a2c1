"""`qmail sendmail-install`: make this home's sendmail the system's /usr/sbin/sendmail and /usr/lib/sendmail.

usage: qmail sendmail-install [--home DIR] [--remove] [--force] [--priority N]
                              [--sbin PATH] [--lib PATH] [--altdir DIR] [--admindir DIR]
                              [--no-alternatives]

Where update-alternatives exists (Debian's alternatives system) it runs
`update-alternatives --install SBIN sendmail HOME/bin/sendmail PRIORITY
--slave LIB lib.sendmail HOME/bin/sendmail`, and `--remove sendmail
HOME/bin/sendmail` with --remove. Elsewhere (or with --no-alternatives) it
makes SBIN and LIB symlinks to HOME/bin/sendmail, and --remove removes the
symlinks that point there. A real file at SBIN or LIB that is not a pyqmail
stub (another MTA's sendmail) is never overwritten without --force; with
--force it is kept as PATH.pyqmail-saved and put back by --remove. Exit 0,
100 for usage or a refusal, 111 if a link or update-alternatives fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from typing import TextIO

from pyqmail import spawn

SBIN = "/usr/sbin/sendmail"
LIB = "/usr/lib/sendmail"
NAME = "sendmail"
SLAVE = "lib.sendmail"
PRIORITY = 50
SAVED = ".pyqmail-saved"


class Refused(Exception):
    """The links cannot be made as asked without harm; the message says why and what to do."""


def _ours(path: str) -> bool:
    """True if path is, or leads to, a pyqmail sendmail stub."""
    stub = spawn.read_stub(path)
    return stub is not None and stub.name == NAME


def _check(links: list[str], target: str, force: bool) -> list[str]:
    """Return the real files in links that are not ours; raise Refused for them unless force."""
    foreign = []
    for link in links:
        if not os.path.lexists(link) or os.path.islink(link) or _ours(link):
            continue
        foreign.append(link)
    if foreign and not force:
        raise Refused("qmail sendmail-install: fatal: not replacing "
                      + ", ".join(foreign) + ": another program's file (another MTA's sendmail?).\n"
                      "Remove that MTA, or rerun with --force to keep it as PATH" + SAVED + " and link "
                      + target + " in its place.")
    return foreign


def _save(paths: list[str], out: TextIO) -> None:
    for path in paths:
        os.rename(path, path + SAVED)
        print(f"qmail sendmail-install: kept {path} as {path}{SAVED}", file=out)


def _restore(links: list[str], out: TextIO) -> None:
    for link in links:
        if os.path.lexists(link + SAVED) and not os.path.lexists(link):
            os.rename(link + SAVED, link)
            print(f"qmail sendmail-install: put back {link}", file=out)


def _alternatives(cmd: list[str], out: TextIO) -> None:
    print(" ".join(cmd), file=out)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.stdout:
        out.write(res.stdout)
    if res.returncode != 0:
        raise OSError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")
    if res.stderr:
        out.write(res.stderr)


def install(target: str, sbin: str, lib: str, force: bool, priority: int, alternatives: str | None,
            alt_opts: list[str], out: TextIO) -> None:
    """Make sbin and lib lead to target; raise Refused or OSError."""
    if not _ours(target):
        raise Refused(f"qmail sendmail-install: fatal: {target} is not a pyqmail sendmail stub: run qmail init first")
    links = [sbin, lib]
    foreign = _check(links, target, force)
    _save(foreign, out)
    if alternatives:
        _alternatives([alternatives, *alt_opts, "--install", sbin, NAME, target, str(priority),
                       "--slave", lib, SLAVE, target], out)
        return
    for link in links:
        os.makedirs(os.path.dirname(link) or "/", exist_ok=True)
        tmp = f"{link}.tmp{os.getpid()}"
        os.symlink(target, tmp)
        os.replace(tmp, link)
        print(f"qmail sendmail-install: {link} -> {target}", file=out)


def remove(target: str, sbin: str, lib: str, alternatives: str | None, alt_opts: list[str], out: TextIO) -> None:
    """Undo install for target: links to it removed, saved files put back; raise OSError."""
    links = [sbin, lib]
    if alternatives:
        _alternatives([alternatives, *alt_opts, "--remove", NAME, target], out)
    else:
        for link in links:
            if os.path.islink(link) and os.readlink(link) == target:
                os.unlink(link)
                print(f"qmail sendmail-install: removed {link}", file=out)
            elif os.path.lexists(link):
                print(f"qmail sendmail-install: left {link}: it does not lead to {target}", file=out)
    _restore(links, out)


def command(argv: list[str]) -> int:
    """Run `qmail sendmail-install`; return 0, 100 or 111."""
    from pyqmail.admin import install as _install

    p = argparse.ArgumentParser(prog=argv[0], description="make this home's sendmail the system's sendmail")
    p.add_argument("--home", default=None, help="the installation (default: as every qmail command)")
    p.add_argument("--remove", action="store_true", help="undo: the system's sendmail is no longer this home's")
    p.add_argument("--force", action="store_true", help="replace another program's sendmail (kept as PATH.pyqmail-saved)")
    p.add_argument("--priority", type=int, default=PRIORITY, help=f"alternatives priority (default {PRIORITY})")
    p.add_argument("--sbin", default=SBIN, help=f"the sendmail link (default {SBIN})")
    p.add_argument("--lib", default=LIB, help=f"the second sendmail link (default {LIB})")
    p.add_argument("--altdir", default=None, help="update-alternatives' --altdir")
    p.add_argument("--admindir", default=None, help="update-alternatives' --admindir")
    p.add_argument("--no-alternatives", action="store_true", help="plain symlinks even where update-alternatives exists")
    try:
        args = p.parse_args(argv[1:])
    except SystemExit as e:
        return 0 if e.code == 0 else 100
    qmail_home = os.path.abspath(args.home or _install.default_home())
    target = os.path.join(qmail_home, "bin", NAME)
    alternatives = None if args.no_alternatives else shutil.which("update-alternatives")
    alt_opts = []
    if args.altdir:
        alt_opts += ["--altdir", args.altdir]
    if args.admindir:
        alt_opts += ["--admindir", args.admindir]
    if args.force and alternatives:
        alt_opts.append("--force")
    try:
        if args.remove:
            remove(target, args.sbin, args.lib, alternatives, alt_opts, sys.stdout)
        else:
            install(target, args.sbin, args.lib, args.force, args.priority, alternatives, alt_opts, sys.stdout)
    except Refused as e:
        print(str(e), file=sys.stderr)
        return 100
    except OSError as e:
        print(f"qmail sendmail-install: fatal: {e}", file=sys.stderr)
        return 111
    return 0
