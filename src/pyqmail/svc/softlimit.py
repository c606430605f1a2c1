"""softlimit: run a program with lower soft resource limits (daemontools softlimit(8)).

usage: softlimit [-a allbytes] [-c corebytes] [-d databytes] [-f filebytes]
[-l lockbytes] [-m membytes] [-o openfiles] [-p processes] [-r residentbytes]
[-s stackbytes] [-t cpusecs] child

Each option sets a soft limit, never above the hard limit; '=' as the value
sets it to the hard limit. Exit 100 for usage, 111 if a limit cannot be
read or set or the program cannot run.
"""

from __future__ import annotations

import errno
import os
import resource

from pyqmail.entry import program
from pyqmail.errors import describe
from pyqmail.sgetopt import Getopt
from pyqmail.strerr import Die
from pyqmail.svc import pathexec

FATAL = b"softlimit: fatal: "
USAGE = (b"softlimit: usage: softlimit [-a allbytes] [-c corebytes] [-d databytes] [-f filebytes]"
         b" [-l lockbytes] [-m membytes] [-o openfiles] [-p processes] [-r residentbytes]"
         b" [-s stackbytes] [-t cpusecs] child")
EXIT_USAGE = 100
EXIT_TROUBLE = 111
OPTIONS = "a:c:d:f:l:m:o:p:r:s:t:"
_ULONG = 1 << 64

# The limits each option sets, in daemontools' order (Linux has no RLIMIT_VMEM;
# RLIMIT_OFILE is RLIMIT_NOFILE).
RESOURCES: dict[str, tuple[int, ...]] = {
    "a": (resource.RLIMIT_AS,),
    "c": (resource.RLIMIT_CORE,),
    "d": (resource.RLIMIT_DATA,),
    "f": (resource.RLIMIT_FSIZE,),
    "l": (resource.RLIMIT_MEMLOCK,),
    "m": (resource.RLIMIT_DATA, resource.RLIMIT_STACK, resource.RLIMIT_MEMLOCK, resource.RLIMIT_AS),
    "o": (resource.RLIMIT_NOFILE,),
    "p": (resource.RLIMIT_NPROC,),
    "r": (resource.RLIMIT_RSS,),
    "s": (resource.RLIMIT_STACK,),
    "t": (resource.RLIMIT_CPU,),
}


def scan_ulong(text: str) -> tuple[int, int]:
    """Return (value, digits used) of text's leading decimal digits, wrapping as an unsigned long."""
    n = 0
    used = 0
    for ch in text:
        if not "0" <= ch <= "9":
            break
        n = (n * 10 + ord(ch) - 48) % _ULONG
        used += 1
    return n, used


def _unsigned(limit: int) -> int:
    return limit % _ULONG  # RLIM_INFINITY is -1 to Python, ~0 to the kernel


def _python(limit: int) -> int:
    # Python passes a signed 64-bit number on to the unsigned rlim_t: same bits.
    return limit - _ULONG if limit >= 1 << 63 else limit


def set_limit(res: int, arg: str) -> None:
    """Lower res's soft limit to arg ('=': the hard limit); raise Die on a bad number or a refusal."""
    try:
        soft, hard = resource.getrlimit(res)
    except OSError as e:
        raise Die(EXIT_TROUBLE, FATAL + b"getrlimit failed: " + describe(e).encode()) from None
    hard_u = _unsigned(hard)
    if arg == "=":
        soft_u = hard_u
    else:
        n, used = scan_ulong(arg)
        if used != len(arg):
            raise Die(EXIT_USAGE, USAGE)
        soft_u = min(n, hard_u)
    try:
        resource.setrlimit(res, (_python(soft_u), hard))
    except OSError as e:
        raise Die(EXIT_TROUBLE, FATAL + b"setrlimit failed: " + describe(e).encode()) from None
    except ValueError as e:  # Python's words for EINVAL and EPERM
        err = errno.EPERM if "not allowed" in str(e) else errno.EINVAL
        raise Die(EXIT_TROUBLE, FATAL + b"setrlimit failed: " + describe(err).encode()) from None


def _main(argv: list[str]) -> int:
    opts = Getopt(argv, OPTIONS)
    for opt, arg in opts:
        if opt == "?" or arg is None:
            raise Die(EXIT_USAGE, USAGE)
        for res in RESOURCES[opt]:
            set_limit(res, arg)
    child = [os.fsencode(a) for a in opts.operands()]
    if not child:
        raise Die(EXIT_USAGE, USAGE)
    err = pathexec.run(child)
    raise Die(EXIT_TROUBLE, FATAL + b"unable to run " + child[0] + b": " + describe(err).encode())


@program("softlimit", crash=EXIT_TROUBLE)
def main(argv: list[str]) -> int:
    """Run child under the limits the options set; return 100 or 111 only if it cannot."""
    try:
        return _main(argv)
    except Die as d:
        return d.report()
