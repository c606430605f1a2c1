"""`qmail trace`: show, step by step, how qmail would route and deliver an address.

    qmail trace [--home DIR] [--sender ADDR] [--default-delivery TEXT] ADDRESS

The steps are those of seed 003's "incoming message" and use the same code
as the programs they describe:

1. qmail-smtpd: is the domain in rcpthosts (or morercpthosts.cdb)?
2. qmail-send: the rewriting of send.schedule.Rewriter (a missing domain
   gets envnoathost, the percent hack, locals first, then virtualdomains'
   prepend), deciding local or remote.
3. local: who controls the local part (users/cdb, else qmail-getpw's rules,
   else the alias user), the .qmail files qmail-local looks for, in order,
   and the instructions as `qmail-local -n` itself prints them (it is run,
   as the user when we are root).
4. remote: control/smtproutes, else the MX records (dnspython, $DNSCACHEIP
   honoured) in preference order with their addresses.

Without --default-delivery, the default delivery is control/defaultdelivery
if it exists (a common convention of qmail's rc scripts), else ./Maildir/,
what `qmail up` gives qmail-start.

Exit 0 if the address is routed; 1 if qmail would bounce or defer it; 100
for a usage error; 111 if something could not be checked now (control files
unreadable, DNS trouble).
"""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Callable

from pyqmail import control, durable, errors, spawn
from pyqmail import home as _home
from pyqmail.local import dotqmail, users
from pyqmail.local.qmail_lspawn import REPORTS as LSPAWN_REPORTS
from pyqmail.local.qmail_lspawn import _scan_ulong as scan_ulong
from pyqmail.local.qmail_local import NO_MAILBOX
from pyqmail.privs import Credentials
from pyqmail.remote import mx, smtproutes
from pyqmail.remote import smtpclient as sc
from pyqmail.send import schedule

EXIT_ROUTED = 0
EXIT_UNROUTED = 1
EXIT_USAGE = 100
EXIT_TEMPORARY = 111

FD_OUT = 1
FD_ERR = 2
DEFAULT_DELIVERY = "./Maildir/"  # what `qmail up` gives qmail-start
LOCAL_OUTPUT_MAX = 1 << 20  # bytes of qmail-local -n output read
DNS_LIFETIME = 10.0


class Temporary(Exception):
    """Something could not be checked now; the message says what."""


class Trace:
    """The lines of a trace, and the verdict."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.code = EXIT_ROUTED

    def say(self, text: str) -> None:
        """Add a line."""
        self.lines.append(text)

    def fail(self, text: str) -> None:
        """Add a line saying why qmail would not deliver; the trace exits 1."""
        self.lines.append(text)
        self.code = EXIT_UNROUTED

    def text(self) -> bytes:
        """Return the trace as bytes (addresses are latin-1, as qmail's bytes)."""
        return "".join(line + "\n" for line in self.lines).encode("latin-1", "replace")


def _s(b: bytes) -> str:
    return b.decode("latin-1")


def _b(s: str) -> bytes:
    return s.encode("latin-1", "replace")


def _control_lines(name: str, flag_me: bool = False) -> list[bytes] | None:
    try:
        found = control.read_lines(name, flag_me=flag_me)
    except control.ControlError as e:
        raise Temporary(str(e)) from None
    return None if found is None else [_b(x) for x in found]


def _control_line(name: str) -> str | None:
    try:
        return control.read_line(name)
    except control.ControlError as e:
        raise Temporary(str(e)) from None


# --- qmail-smtpd and qmail-send ---------------------------------------------------------

def trace_rcpthosts(t: Trace, qmail_home: str, addr: bytes) -> None:
    """Say whether qmail-smtpd accepts addr's domain from anyone."""
    at = addr.rfind(b"@")
    if at == -1:
        t.say("qmail-smtpd: no domain: accepted (qmail-smtpd takes an address without @ as local)")
        return
    domain = _s(addr[at + 1:])
    try:
        lines = control.read_lines("rcpthosts")
        if lines is None:
            t.say("qmail-smtpd: control/rcpthosts is missing: every recipient is accepted (open relay!)")
            return
        hosts = control.DomainSet(lines, os.path.join(qmail_home, "control", "morercpthosts.cdb"))
    except control.ControlError as e:
        raise Temporary(str(e)) from None
    if hosts.match(domain):
        t.say(f"qmail-smtpd: {domain} is in rcpthosts: accepted from anyone")
    else:
        t.say(f"qmail-smtpd: {domain} is not in rcpthosts: accepted only from clients with RELAYCLIENT set")


def rewrite(t: Trace, addr: bytes) -> tuple[int, bytes]:
    """Say how qmail-send rewrites addr; return (LOCAL or REMOTE, the address it delivers to)."""
    try:
        envnoathost = _b(control.read_default("envnoathost", "envnoathost") or "")
    except control.ControlError as e:
        raise Temporary(str(e)) from None
    locals_ = _control_lines("locals", flag_me=True)
    if locals_ is None:
        raise Temporary("control/locals and control/me are both missing: qmail-send does not start")
    percenthack = _control_lines("percenthack") or []
    vdoms = _control_lines("virtualdomains") or []
    rmap = _control_lines("recipientmap") or []
    # Each step is the real Rewriter, given only the control files up to that
    # step: what it adds to the address is what that step does.
    step = schedule.Rewriter(envnoathost, [], ()).rewrite(addr)[1]
    if step != addr:
        t.say(f"qmail-send: no @ in the address: envnoathost makes it {_s(step)}")
    before = step
    step = schedule.Rewriter(envnoathost, [], percenthack).rewrite(addr)[1]
    if step != before:
        t.say(f"qmail-send: percenthack: {_s(before)} becomes {_s(step)}")
    before = step
    step = schedule.Rewriter(envnoathost, [], percenthack, (), rmap).rewrite(addr)[1]
    if step != before:
        t.say(f"qmail-send: recipientmap: {_s(before)} becomes {_s(step)}")
    full = schedule.Rewriter(envnoathost, locals_, percenthack, vdoms, rmap)
    channel, final = full.rewrite(addr)
    at = step.rfind(b"@")
    domain = _s(step[at + 1:])
    if channel == schedule.LOCAL and full.is_local(step[at + 1:]):
        t.say(f"qmail-send: {domain} is in locals: local delivery of {_s(final)}")
    elif channel == schedule.LOCAL:
        prepend = full.virtual_prepend(step, at) or b""
        t.say(f"qmail-send: {domain} is not in locals; virtualdomains gives it to {_s(prepend)}: "
              f"local delivery of {_s(final)}")
    elif full.virtual_prepend(step, at) == b"":
        t.say(f"qmail-send: {domain} is excepted in virtualdomains (empty prepend): remote delivery of {_s(final)}")
    else:
        t.say(f"qmail-send: {domain} is neither in locals nor in virtualdomains: remote delivery of {_s(final)}")
    return channel, final


# --- local delivery -----------------------------------------------------------------------

def find_user(t: Trace, qmail_home: str, local: bytes) -> users.Assignment | None:
    """Say who controls local, as qmail-lspawn finds it; None if nobody can (trace fails)."""
    cdb_path = os.path.join(qmail_home, "users", "cdb")
    try:
        found = users.lookup(local, cdb_path)
    except users.UsersCdbError as e:
        t.fail(f"qmail-lspawn: {_s(LSPAWN_REPORTS[e.code][1:]).strip()} ({e}): deliveries are deferred")
        return None
    if found is not None:
        t.say(f"qmail-lspawn: users/cdb assigns {_s(local)!r} to user {_s(found.user)}")
        return found
    t.say(f"qmail-lspawn: {'users/cdb has no entry' if os.path.exists(cdb_path) else 'no users/cdb'}: "
          "qmail-getpw's rules decide")
    try:
        found = users.getpw(local)
    except users.GetpwError as e:
        t.fail(f"qmail-getpw: {e}: {_s(LSPAWN_REPORTS.get(e.code, b'Z?')[1:]).strip()} (deferred)")
        return None
    if found.dash == b"-" and found.ext == local:
        t.say(f"qmail-getpw: no account owns {_s(local)!r}: the alias user {_s(found.user)} handles it")
    else:
        t.say(f"qmail-getpw: account {_s(found.user)} owns its home: it handles {_s(local)!r}")
    return found


def trace_dotqmail(t: Trace, who: users.Assignment) -> bytes | None:
    """Say which .qmail file qmail-local uses; return its name, or None for the default delivery."""
    home = who.homedir
    t.say(f"qmail-local: looks in {_s(home)} for:")
    used: bytes | None = None
    for cand in dotqmail.candidates(who.dash, who.ext):
        path = os.path.join(home, cand.name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            t.say(f"  {_s(cand.name)}: none")
            continue
        except OSError as e:
            t.say(f"  {_s(cand.name)}: cannot check ({errors.describe(e)})")
            continue
        if not stat.S_ISREG(st.st_mode):
            t.say(f"  {_s(cand.name)}: not a file, skipped")
            continue
        default = "" if cand.default is None else f" (DEFAULT={_s(cand.default)})"
        empty = ", empty: the default delivery applies" if st.st_size == 0 else ""
        t.say(f"  {_s(cand.name)}: used{default}{empty}")
        used = cand.name
        break
    if used is None and who.dash:
        t.say(f"  no file: qmail-local bounces: {_s(NO_MAILBOX)}")
    elif used is None:
        t.say("  no file: the default delivery applies")
    return used


def run_local_n(qmail_home: str, who: users.Assignment, local: bytes, domain: bytes, sender: bytes,
                delivery: bytes) -> tuple[int, bytes]:
    """Run `qmail-local -n` for who (as who, if we are root); return (exit code, its output)."""
    argv = ["qmail-local", "-n", "--"] + [os.fsdecode(a) for a in (
        who.user, who.homedir, local, who.dash, who.ext, domain, sender, delivery)]
    creds = None
    if os.geteuid() == 0:
        creds = Credentials(scan_ulong(who.uid), scan_ulong(who.gid))
    r, w = os.pipe2(os.O_CLOEXEC)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = spawn.spawn(os.path.join(qmail_home, "bin", "qmail-local"), argv, fds={0: null, 1: w, 2: w},
                          creds=creds, cwd=qmail_home)
    except OSError as e:
        os.close(r)
        raise Temporary(f"unable to run qmail-local: {errors.describe(e)}") from None
    finally:
        os.close(w)
        os.close(null)
    out = bytearray()
    try:
        while True:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            if len(out) < LOCAL_OUTPUT_MAX:
                out += chunk
    finally:
        os.close(r)
    return spawn.wait(pid), bytes(out[:LOCAL_OUTPUT_MAX])


def trace_local(t: Trace, qmail_home: str, recip: bytes, sender: bytes, delivery: bytes) -> None:
    """Trace the local delivery of recip (after qmail-send's rewriting)."""
    at = recip.rfind(b"@")
    local, domain = recip[:at], recip[at + 1:]
    if not local:
        t.say("qmail-lspawn: empty local part: a trash address, thrown away as delivered")
        return
    who = find_user(t, qmail_home, local)
    if who is None:
        return
    t.say(f"  user {_s(who.user)}, uid {_s(who.uid)}, gid {_s(who.gid)}, home {_s(who.homedir)}, "
          f"dash {_s(who.dash)!r}, ext {_s(who.ext)!r}")
    uid = scan_ulong(who.uid)  # as qmail-lspawn reads it
    inst = _home.install()
    if uid == 0:
        t.fail(f"qmail-lspawn: {_s(LSPAWN_REPORTS[users.QLX_ROOT][1:]).strip()} (deferred)")
        return
    owner = inst.uid("qmailq")
    if inst.single and owner != -1 and uid != owner:
        t.fail(f"qmail-lspawn: single-user installation: cannot deliver as user {_s(who.user)} (deferred)")
        return
    used = trace_dotqmail(t, who)
    if used is None and who.dash:
        t.code = EXIT_UNROUTED
        return
    code, out = run_local_n(qmail_home, who, local, domain, sender, delivery)
    t.say("qmail-local -n:" + ("" if code == 0 else f" (exit {code})"))
    for line in out.decode("latin-1").splitlines():
        t.say("  " + line)
    if code == 100:
        t.fail("qmail-local would bounce the message")
    elif code != 0:
        t.fail("qmail-local would defer the message")


# --- remote delivery -------------------------------------------------------------------

def _addresses(t: Trace, dns: mx.Lookup, host: str, pref: int, me: set[str]) -> list[mx.IpMx]:
    """Say the addresses of host (an MX of preference pref, or a relay); return them."""
    status, ips = mx.ip_plus(dns, host, pref)
    if status == mx.SOFT:
        raise Temporary(f"DNS trouble looking up {host}: {_s(sc.DNS_TEMP[1:]).strip()}")
    t.say(f"    {host}: {_shown(ips, me)}")
    return ips


def _shown(ips: list[mx.IpMx], me: set[str]) -> str:
    """Return the addresses, sorted (DNS servers rotate them; qmail-remote takes them as they come)."""
    import ipaddress

    ordered = sorted(ips, key=lambda a: ipaddress.ip_address(a.ip).packed.rjust(16, b"\0"))
    return ", ".join(a.ip + (" (this host)" if a.ip in me else "") for a in ordered) or "no address"


def trace_remote(t: Trace, recip: bytes, dns: mx.Lookup, me: Callable[[], set[str]]) -> None:
    """Trace the remote delivery of recip: smtproutes, else MX records."""
    host = _s(recip[recip.rfind(b"@") + 1:])
    routes = smtproutes.parse([_s(x) for x in (_control_lines("smtproutes") or [])])
    route = smtproutes.lookup(routes, host)
    mine = me()
    if route is not None:
        t.say(f"qmail-remote: smtproutes sends {host} to {route.relay}, port {route.port}")
        lit = mx.literal(route.relay)
        if lit is not None:
            t.say(f"    {route.relay}: {lit}")
            return
        if not _addresses(t, dns, route.relay, 0, mine):
            t.fail(f"qmail-remote: {_s(sc.perm_dns(_b(route.relay))[1:]).strip()}")
        return
    t.say(f"qmail-remote: no smtproutes entry for {host}: DNS decides (port {smtproutes.DEFAULT_PORT})")
    lit = mx.literal(host) if host else None
    if lit is not None:
        t.say(f"    {host} is an address literal: {lit}")
        return
    status, records = dns.query(host, "MX")
    if status == mx.SOFT:
        raise Temporary(f"DNS trouble looking up the MX records of {host}")
    mxs = []
    for rec in records if status == mx.OK else []:
        pref, _, name = rec.partition(" ")
        mxs.append((int(pref), name))
    ips: list[mx.IpMx] = []
    if mxs:
        t.say(f"  MX records of {host}, lowest preference first (equal ones are tried in random order):")
        for pref_, name in sorted(mxs):
            t.say(f"  MX {pref_} {name}")
            ips.extend(_addresses(t, dns, name, pref_, mine))
    else:
        t.say(f"  {host} has no MX record: its own addresses")
        status, ips = mx.ip(dns, host)
        if status == mx.SOFT:
            raise Temporary(f"DNS trouble looking up {host}")
        if status == mx.HARD:
            t.fail(f"qmail-remote: {_s(sc.perm_dns(_b(host))[1:]).strip()}")
            return
        t.say(f"    {host}: {_shown(ips, mine)}")
    if not ips:
        t.fail(f"qmail-remote: {_s(sc.NOMX[1:]).strip()}")
        return
    # qmail-remote uses only the MXes better than the best one that is this host.
    pref_me = min([a.pref for a in ips if a.ip in mine], default=None)
    usable = [a for a in ips if pref_me is None or a.pref < pref_me]
    if not usable:
        t.fail("qmail-remote: " + " ".join(_s(sc.AMBIGMX[1:]).split()))


# --- the command ---------------------------------------------------------------------

def _parser(prog: str) -> argparse.ArgumentParser:
    from pyqmail.admin import install

    p = argparse.ArgumentParser(prog=prog, description="Show how qmail would route and deliver an address.")
    p.add_argument("--home", default=None,
                   help=install.HOME_HELP)
    p.add_argument("--sender", default="", help="the envelope sender qmail-local is told (default: empty)")
    p.add_argument("--default-delivery", default=None, metavar="TEXT",
                   help="qmail-start's default delivery (default: control/defaultdelivery, else ./Maildir/)")
    p.add_argument("address", metavar="ADDRESS")
    return p


def trace(t: Trace, qmail_home: str, addr: bytes, sender: bytes, delivery: bytes | None,
          dns: mx.Lookup, me: Callable[[], set[str]]) -> None:
    """Trace addr into t; raise Temporary if something cannot be checked now."""
    t.say(f"address: {_s(addr)}")
    trace_rcpthosts(t, qmail_home, addr)
    channel, final = rewrite(t, addr)
    if channel == schedule.LOCAL:
        if delivery is None:
            dd = _control_line("defaultdelivery")
            delivery = _b(dd) if dd else _b(DEFAULT_DELIVERY)
            t.say(f"default delivery: {_s(delivery)}"
                  + (" (control/defaultdelivery)" if dd else " (what `qmail up` gives qmail-start)"))
        trace_local(t, qmail_home, final, sender, delivery)
    else:
        trace_remote(t, final, dns, me)


def _local_addresses() -> set[str]:
    try:
        return mx.local_addresses()
    except Exception:  # noqa: BLE001 - ipme trouble only loses the "(this host)" marks
        return set()


def command(argv: list[str]) -> int:
    """Run `qmail trace ADDRESS`; return the exit code."""
    try:
        args = _parser(argv[0]).parse_args(argv[1:])
    except SystemExit as e:
        return EXIT_ROUTED if e.code == 0 else EXIT_USAGE
    from pyqmail.admin.queue import use_home

    qmail_home = use_home(args.home)
    if not os.path.isdir(os.path.join(qmail_home, "control")):
        durable.write_all(FD_ERR, f"qmail trace: no installation in {qmail_home}\n".encode())
        return EXIT_TEMPORARY
    addr = os.fsencode(args.address)
    delivery = None if args.default_delivery is None else os.fsencode(args.default_delivery)
    dns = mx.Resolver.from_env(dict(os.environ))
    dns.lifetime = DNS_LIFETIME
    t = Trace()
    try:
        trace(t, qmail_home, addr, os.fsencode(args.sender), delivery, dns, _local_addresses)
    except Temporary as e:
        durable.write_all(FD_OUT, t.text())
        durable.write_all(FD_ERR, f"qmail trace: cannot tell now: {e}\n".encode("utf-8", "backslashreplace"))
        return EXIT_TEMPORARY
    durable.write_all(FD_OUT, t.text())
    return t.code
