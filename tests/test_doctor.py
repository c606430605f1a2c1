"""`qmail doctor`: each fault of seed 003's checklist is found, with its fix; a clean home has none."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, VENV_BIN, QHome, Result, expect, need_root_setup, run
from remotekit import DnsServer
from sendkit import Site, make_site, remove_site

FQDN = "test.example.com"


@pytest.fixture
def dns() -> DnsServer:
    with DnsServer({(FQDN, "A"): ["203.0.113.1"]}) as server:
        yield server


@pytest.fixture
def site() -> Site:
    s = make_site(FQDN)
    yield s
    remove_site(s)


def doctor(home: QHome, dns: DnsServer, code: int = 0, user: str | None = None, *extra: str) -> Result:
    res = run([VENV_BIN / "qmail", "doctor", "--home", str(home.path), *extra], user=user,
              env={"PATH": "/usr/bin:/bin", **dns.env})
    expect(res, code)
    assert res.stderr == b"", res.explain()
    return res


def check(site: Site, dns: DnsServer, code: int = 0) -> list[str]:
    """Run the doctor as the site's user; return its lines."""
    return doctor(site.home, dns, code, site.user).stdout.decode("latin-1").splitlines()


def problems(out: list[str]) -> list[str]:
    return [line for line in out if line.startswith("problem: ")]


def only_problem(site: Site, dns: DnsServer) -> str:
    out = check(site, dns, 1)
    (p,) = problems(out)
    assert out[-1] == "qmail doctor: 1 problem found"
    return p


def user_name(site: Site) -> str:
    import pwd

    return site.user or pwd.getpwuid(os.getuid()).pw_name


def home_for(site: Site, name: str, files: dict[str, str] | None = None, parent: str = "") -> Path:
    """A home directory for the site's user, listed in users/assign as local part name."""
    home = site.mkdir(f"{parent}/{name}" if parent else name)
    for fname, text in (files or {}).items():
        p = home / fname
        p.write_text(text)
        os.chown(p, site.uid, site.gid)
        p.chmod(0o644)
    site.assign([site.user_line(name, home)])
    return home


# --- a clean home -----------------------------------------------------------------------

def test_clean_single_user_home_has_no_problems(site: Site, dns: DnsServer) -> None:
    out = check(site, dns)
    assert out[0] == f"qmail doctor: checking {site.home.path}"
    assert out[-1] == "qmail doctor: no problems found"
    assert problems(out) == []
    alias = site.home.path / "alias"
    for line in (f"ok: control/me: {FQDN}", "ok: control/locals: 1 domain", "ok: control/rcpthosts: 1 domain",
                 f"ok: {alias}/.qmail-postmaster present", f"ok: {alias}/.qmail-mailer-daemon present",
                 f"ok: {alias}/.qmail-root present", f"ok: {FQDN} resolves to 203.0.113.1"):
        assert line in out
    assert any(x.startswith("ok: layout: ") for x in out)
    for port in ("2525", "2209"):
        assert any(x.startswith((f"note: nothing answers on 127.0.0.1:{port} ", f"ok: 127.0.0.1:{port} "))
                   for x in out), out


def test_clean_home_with_users_still_clean(site: Site, dns: DnsServer) -> None:
    home_for(site, "joe", {".qmail": "./Maildir/\n", ".qmail-list": "&ann@example.org\n"})
    out = check(site, dns)
    assert problems(out) == [] and "ok: users/cdb is up to date with users/assign" in out


def test_clean_root_mode_home(dns: DnsServer) -> None:
    need_root_setup()
    from conftest import make_home

    home = make_home(single=False)
    try:
        # The alias user's passwd home does not matter: alias mail goes to
        # this installation's alias/ (docs/DESIGN.md), so a fresh home is clean.
        out = doctor(home, dns).stdout.decode().splitlines()
        assert problems(out) == [], out
        assert f"ok: layout: {layout_entries(home)} directories and queue files with qmail init's owners and modes" in out
    finally:
        shutil.rmtree(home.path.parent, ignore_errors=True)


def layout_entries(home: QHome) -> int:
    """Return how many directories and files `qmail init`'s layout has (the doctor checks each)."""
    from pyqmail import home as _home
    from pyqmail.admin import doctor, install

    inst = _home.parse_install((home.path / "conf" / "install").read_text())
    expect = doctor._Expect(str(home.path), inst)
    install.make_layout(expect)
    return len(expect.entries)


# --- control files ------------------------------------------------------------------------

def test_missing_rcpthosts_is_an_open_relay(site: Site, dns: DnsServer) -> None:
    site.home.control("rcpthosts", None)
    c = site.home.path / "control"
    assert only_problem(site, dns) == (
        "problem: control/rcpthosts is missing: qmail-smtpd accepts mail for every domain and relays it "
        f"(an open relay); fix: cp {c}/locals {c}/rcpthosts   (then add each virtual domain)")


def test_percenthack_on_an_rcpthosts_domain_is_an_open_relay(site: Site, dns: DnsServer) -> None:
    c = site.home.path / "control"
    site.home.control("percenthack", "elsewhere.example\n")  # not in rcpthosts: unreachable, harmless
    assert problems(check(site, dns, 0)) == []
    site.home.control("percenthack", "elsewhere.example\ntest.example.com\n")
    assert only_problem(site, dns) == (
        "problem: test.example.com is in control/percenthack and control/rcpthosts: anyone can relay through "
        "this host with user%elsewhere@test.example.com; "
        f"fix: remove test.example.com from {c}/percenthack (or from rcpthosts, if it must stay)")


def test_missing_me(site: Site, dns: DnsServer) -> None:
    site.home.control("me", None)
    p = only_problem(site, dns)
    assert p.startswith("problem: control/me is missing or empty")
    assert p.endswith(f"fix: echo mail.example.com > {site.home.path}/control/me   (this host's fully qualified name)")


def test_missing_locals_and_me(site: Site, dns: DnsServer) -> None:
    site.home.control("me", None)
    site.home.control("locals", None)
    out = check(site, dns, 1)
    assert ("problem: control/locals and control/me are missing: qmail-send does not start; "
            f"fix: echo mail.example.com > {site.home.path}/control/locals") in out


def test_virtualdomain_also_in_locals(site: Site, dns: DnsServer) -> None:
    site.home.control("locals", f"{FQDN}\nvirt.example\n")
    site.home.control("rcpthosts", f"{FQDN}\nvirt.example\n")
    site.home.control("virtualdomains", "virt.example:joe\n")
    assert only_problem(site, dns) == (
        "problem: control/virtualdomains: virt.example is also in control/locals, which qmail-send consults first: "
        f"the virtualdomains entry is never used; fix: remove virt.example from {site.home.path}/control/locals "
        "(or the line from virtualdomains), then send qmail-send HUP")


def test_virtualdomain_missing_from_rcpthosts(site: Site, dns: DnsServer) -> None:
    site.home.control("virtualdomains", "virt.example:joe\n.sub.example:ann\nexcept.example:\n")
    site.home.control("rcpthosts", f"{FQDN}\n.sub.example\n")
    assert only_problem(site, dns) == (
        "problem: control/virtualdomains: virt.example is not in control/rcpthosts: qmail-smtpd refuses its mail "
        f"from other hosts; fix: echo virt.example >> {site.home.path}/control/rcpthosts")


def test_local_domain_missing_from_rcpthosts(site: Site, dns: DnsServer) -> None:
    site.home.control("locals", f"{FQDN}\nlocalhost\nother.example\n")
    p = only_problem(site, dns)
    assert p.startswith("problem: other.example is in control/locals but not in control/rcpthosts")


def test_hostile_control_files_do_not_crash(site: Site, dns: DnsServer) -> None:
    site.home.control("virtualdomains", "\0\n:::\nno colon\n" + "x" * 100000 + ":y\n\xff\xfe:joe\n")
    site.home.control("locals", f"{FQDN}\n\0\n")
    out = check(site, dns, 1)
    assert out[-1].startswith("qmail doctor: ")


# --- compiled files -------------------------------------------------------------------

def test_stale_users_cdb(site: Site, dns: DnsServer) -> None:
    home_for(site, "joe")
    assign = site.home.path / "users" / "assign"
    later = time.time() + 60
    os.utime(assign, (later, later))
    assert only_problem(site, dns) == (
        "problem: users/cdb is older than users/assign: qmail-lspawn still uses the old assignments; "
        f"fix: {site.home.path}/bin/qmail-newu")
    os.utime(assign)
    expect(run([site.home.bin("qmail-newu")], user=site.user))
    assert problems(check(site, dns)) == []


def test_assign_without_cdb_and_malformed_assign(site: Site, dns: DnsServer) -> None:
    assign = site.home.path / "users" / "assign"
    assign.write_text("=joe:joe\n")  # no fields, no final dot
    out = check(site, dns, 1)
    assert (f"problem: users/assign exists but users/cdb does not: it is not in effect; "
            f"fix: {site.home.path}/bin/qmail-newu") in out
    assert any(p.startswith("problem: users/assign is not in qmail-users(5) format") for p in problems(out))


def test_stale_morercpthosts_cdb(site: Site, dns: DnsServer) -> None:
    (site.home.path / "control" / "morercpthosts").write_text("more.example\n")
    assert only_problem(site, dns) == (
        "problem: control/morercpthosts exists but control/morercpthosts.cdb does not: it is not in effect; "
        f"fix: {site.home.path}/bin/qmail-newmrh")
    expect(run([site.home.bin("qmail-newmrh")], user=site.user))
    out = check(site, dns)
    assert "ok: control/morercpthosts.cdb is up to date with control/morercpthosts" in out


# --- homes and .qmail files -----------------------------------------------------------

def test_world_writable_home(site: Site, dns: DnsServer) -> None:
    joe = home_for(site, "joe", {".qmail": "./Maildir/\n"})
    joe.chmod(0o777)
    name = user_name(site)
    assert only_problem(site, dns) == (
        f"problem: home directory {joe} of {name} is world-writable: qmail-local defers every delivery "
        f"(Uh-oh: home directory is writable); fix: chmod o-w {joe}")
    joe.chmod(0o775)  # qmail-local (conf-patrn 002) delivers to a group-writable home
    assert problems(check(site, dns)) == []


def test_writable_parent_of_a_home(site: Site, dns: DnsServer) -> None:
    joe = home_for(site, "joe", parent="homes")
    parent = joe.parent
    parent.chmod(0o777)
    assert only_problem(site, dns) == (
        f"problem: {parent}, a parent of home directory {joe}, is group- or world-writable: others can replace "
        f"the home and its .qmail files; fix: chmod go-w {parent}")
    parent.chmod(0o1777)  # sticky, as /tmp: nobody can rename what others own
    assert problems(check(site, dns)) == []


def test_sticky_and_missing_homes(site: Site, dns: DnsServer) -> None:
    joe = home_for(site, "joe")
    joe.chmod(0o1755)
    assert only_problem(site, dns).startswith(f"problem: home directory {joe} of ")
    joe.chmod(0o755)
    shutil.rmtree(joe)
    assert "does not exist: qmail-local defers its mail" in only_problem(site, dns)


def test_dotqmail_writable_by_others(site: Site, dns: DnsServer) -> None:
    joe = home_for(site, "joe", {".qmail-list": "&ann@example.org\n"})
    (joe / ".qmail-list").chmod(0o646)
    assert only_problem(site, dns) == (
        f"problem: {joe}/.qmail-list is world-writable: qmail-local defers the mail it controls "
        f"(Uh-oh: .qmail file is writable); fix: chmod o-w {joe}/.qmail-list")


def test_dotqmail_x_bit_and_blank_first_line(site: Site, dns: DnsServer) -> None:
    joe = home_for(site, "joe", {".qmail-a": "./Maildir/\n", ".qmail-b": "\n&ann@example.org\n"})
    (joe / ".qmail-a").chmod(0o744)
    out = problems(check(site, dns, 1))
    assert out == [
        f"problem: {joe}/.qmail-a has the x bit set (forward only) but delivers to a file or program: "
        f"qmail-local defers its mail; fix: chmod u-x {joe}/.qmail-a",
        f"problem: {joe}/.qmail-b starts with a blank line: qmail-local defers its mail "
        f"(Uh-oh: first line of .qmail file is blank); fix: remove the first line of {joe}/.qmail-b",
    ]


def test_missing_alias_files(site: Site, dns: DnsServer) -> None:
    alias = site.home.path / "alias"
    (alias / ".qmail-root").unlink()
    assert only_problem(site, dns) == (
        f"problem: {alias}/.qmail-root is missing: mail to root bounces (Sorry, no mailbox here by that name); "
        f"fix: echo '&you@example.com' > {alias}/.qmail-root && chmod 644 {alias}/.qmail-root")
    (alias / ".qmail-default").write_text("./Maildir/\n")
    out = check(site, dns)
    assert f"note: {alias}/.qmail-root is missing: mail to root goes by {alias}/.qmail-default" in out
    (alias / ".qmail-postmaster").write_text("")
    out = check(site, dns)
    assert f"note: {alias}/.qmail-postmaster is empty: mail to postmaster goes to the default delivery in {alias}" in out


# --- the queue --------------------------------------------------------------------------

def test_broken_trigger(site: Site, dns: DnsServer) -> None:
    trigger = site.home.queue / "lock" / "trigger"
    trigger.unlink()
    trigger.write_bytes(b"")
    os.chown(trigger, site.uid, site.gid)
    trigger.chmod(0o622)
    owner = user_name(site)
    assert only_problem(site, dns) == (
        f"problem: {trigger} is not a named pipe: qmail-queue cannot wake qmail-send, so new mail waits for its "
        f"periodic scan of todo/; fix: rm {trigger} && mkfifo -m 622 {trigger} && chown {owner} {trigger} "
        "&& restart qmail-send")
    trigger.unlink()
    assert only_problem(site, dns).startswith(f"problem: {trigger} is missing: qmail-queue cannot wake")


def test_queue_modes(site: Site, dns: DnsServer) -> None:
    todo = site.home.queue / "todo"
    todo.chmod(0o777)
    mess = site.home.queue / "mess" / "7"
    mess.rmdir()
    out = problems(check(site, dns, 1))
    owner = user_name(site)
    assert out == [f"problem: queue/todo: mode 777, not 750 as qmail init made it; fix: chmod 750 {todo}",
                   f"problem: {mess} is missing; fix: mkdir -m 750 {mess} && chown {owner} {mess}"]


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_queue_owner(site: Site, dns: DnsServer) -> None:
    info = site.home.queue / "info" / "3"
    os.chown(info, 0, 0)
    out = problems(check(site, dns, 1))
    assert out == [f"problem: queue/info/3: owned by uid 0 gid 0, not {site.user}:qmail as qmail init made it; "
                   f"fix: chown {site.user} {info}"]


# --- DNS ----------------------------------------------------------------------------------

def test_me_not_in_dns(site: Site) -> None:
    with DnsServer({("other.example", "A"): ["203.0.113.9"]}) as server:
        assert only_problem(site, server) == (
            f"problem: control/me {FQDN} has no address in DNS: bounces and HELO name a host nobody can reach; "
            f"fix: add an A record for {FQDN}, or put this host's DNS name into {site.home.path}/control/me")
    with DnsServer({}, servfail={FQDN}) as server:
        out = check(site, server)
        assert f"note: could not look {FQDN} (control/me) up in DNS now" in out


# --- usage and access -----------------------------------------------------------------

def test_usage_and_missing_home(dns: DnsServer, tmp_path: Path) -> None:
    res = run([VENV_BIN / "qmail", "doctor", "--bogus"], env={"PATH": "/usr/bin:/bin"})
    expect(res, 100)
    res = run([VENV_BIN / "qmail", "doctor", "--home", str(tmp_path / "none")], env={"PATH": "/usr/bin:/bin"})
    expect(res, 1)
    assert res.stdout == (f"problem: no installation in {tmp_path / 'none'}; fix: qmail init --home "
                          f"{tmp_path / 'none'} FQDN\nqmail doctor: 1 problem found\n").encode()


def test_ordinary_user_on_a_root_home_gets_notes_not_a_crash(dns: DnsServer) -> None:
    need_root_setup()
    from conftest import make_home

    home = make_home(single=False)
    try:
        res = doctor(home, dns, 0, TEST_USER)
        # Every entry of the queue that qmail init lays out and this user cannot see (105 today).
        assert re.search(rb"\nnote: cannot check \d{3} of the queue's entries as this user, e\.g\. ", res.stdout)
        assert res.stdout.endswith(b"found\n")
    finally:
        shutil.rmtree(home.path.parent, ignore_errors=True)


# --- smarthost passwords (issue 14.4) -------------------------------------------------------

def test_smarthost_passwords_readable_by_others(site: Site, dns: DnsServer) -> None:
    cdir = site.home.path / "control"
    routes = cdir / "smtproutes"
    routes.write_text("x.org:mx.x.org\n")  # no password: no check
    routes.chmod(0o644)
    os.chown(routes, site.uid, site.gid)
    assert problems(check(site, dns)) == []
    routes.write_text(":smarthost.example.net:587 user secret\n")
    assert only_problem(site, dns) == (
        "problem: control/smtproutes holds smarthost passwords and every user can read it (mode 644); "
        f"fix: chmod 600 {routes}")
    routes.chmod(0o600)
    senders = cdir / "authsenders"
    senders.write_text("@x.org|user|secret\n")
    senders.chmod(0o640)
    os.chown(senders, site.uid, site.gid)
    assert only_problem(site, dns) == (
        "problem: control/authsenders holds smarthost passwords and its group can read it (mode 640); "
        f"fix: chmod 600 {senders}")
    senders.chmod(0o600)
    out = check(site, dns)
    assert problems(out) == [] and \
        "ok: control/smtproutes holds smarthost passwords, readable only by qmail-remote's user" in out


def test_root_mode_smarthost_passwords_need_qmailr(dns: DnsServer) -> None:
    need_root_setup()
    import pwd

    from conftest import make_home

    home = make_home(single=False)
    try:
        routes = home.path / "control" / "smtproutes"
        routes.write_text(":smarthost.example.net:587|user|secret\n")
        routes.chmod(0o600)  # root's: qmail-remote could not read it
        out = doctor(home, dns, 1).stdout.decode().splitlines()
        assert problems(out) == [f"problem: qmailr (qmail-remote's user) cannot read control/smtproutes: "
                                 f"Permission denied; fix: chown qmailr {routes}; chmod 600 {routes}"], out
        os.chown(routes, pwd.getpwnam("qmailr").pw_uid, 0)
        out = doctor(home, dns).stdout.decode().splitlines()
        assert "ok: control/smtproutes holds smarthost passwords, readable only by qmail-remote's user" in out
    finally:
        shutil.rmtree(home.path.parent, ignore_errors=True)
