"""`qmail trace ADDRESS`: qmail-send's rewriting, then the local or remote route, step by step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import IS_ROOT, VENV_BIN, Result, expect, run
from remotekit import DnsServer
from sendkit import Site, make_site, remove_site

FQDN = "test.example.com"
RCPT_OK = f"qmail-smtpd: {FQDN} is in rcpthosts: accepted from anyone"
DD = "default delivery: ./Maildir/ (what `qmail up` gives qmail-start)"


@pytest.fixture
def site() -> Site:
    s = make_site(FQDN)
    yield s
    remove_site(s)


def trace(site: Site, *args: str, code: int = 0, env: dict[str, str] | None = None,
          user: str | None = "site") -> Result:
    who = site.user if user == "site" else user
    res = run([VENV_BIN / "qmail", "trace", "--home", str(site.home.path), *args], user=who,
              env={"PATH": "/usr/bin:/bin", **(env or {})})
    return expect(res, code)


def lines(res: Result) -> list[str]:
    return res.stdout.decode("latin-1").splitlines()


def home_with(site: Site, name: str, files: dict[str, str]) -> Path:
    """A home directory for the site's user holding the given .qmail files."""
    home = site.mkdir(name)
    for fname, text in files.items():
        p = home / fname
        p.write_text(text)
        os.chown(p, site.uid, site.gid)
        p.chmod(0o644)
    return home


def user_name(site: Site) -> str:
    import pwd

    return site.user or pwd.getpwuid(os.getuid()).pw_name


def who_line(site: Site, home: Path, dash: str = "", ext: str = "") -> str:
    name = user_name(site)
    return f"  user {name}, uid {site.uid}, gid {site.gid}, home {home}, dash {dash!r}, ext {ext!r}"


# --- local ----------------------------------------------------------------------------

def test_local_user_from_users_assign(site: Site) -> None:
    joe = home_with(site, "joe", {".qmail": "./Maildir/\n|echo hi\n&ann@elsewhere.example\n"})
    site.assign([site.user_line("joe", joe)])
    res = trace(site, f"joe@{FQDN}")
    assert lines(res) == [
        f"address: joe@{FQDN}",
        RCPT_OK,
        f"qmail-send: {FQDN} is in locals: local delivery of joe@{FQDN}",
        DD,
        f"qmail-lspawn: users/cdb assigns 'joe' to user {user_name(site)}",
        who_line(site, joe),
        f"qmail-local: looks in {joe} for:",
        "  .qmail: used",
        "qmail-local -n:",
        "  maildir ./Maildir/",
        "  program echo hi",
        "  forward ann@elsewhere.example",
        "  did 1+1+1",
    ]


def test_extension_falls_back_to_default_files(site: Site) -> None:
    joe = home_with(site, "joe", {".qmail-list-default": "./list/\n"})
    site.assign([site.user_line("joe-", joe, wild=True)])
    res = trace(site, f"Joe-List-Subscribe@{FQDN}")
    out = lines(res)
    assert out[4:] == [
        f"qmail-lspawn: users/cdb assigns 'Joe-List-Subscribe' to user {user_name(site)}",
        who_line(site, joe, "-", "List-Subscribe"),
        f"qmail-local: looks in {joe} for:",
        "  .qmail-list-subscribe: none",
        "  .qmail-list-default: used (DEFAULT=Subscribe)",
        "qmail-local -n:",
        "  maildir ./list/",
        "  did 1+0+0",
    ]


def test_virtual_domain_prepend(site: Site) -> None:
    site.home.control("virtualdomains", "virt.example:joe\n")
    site.home.control("rcpthosts", f"{FQDN}\nvirt.example\n")
    joe = home_with(site, "joe", {".qmail-default": "./Maildir/\n"})
    site.assign([site.user_line("joe-", joe, wild=True)])
    out = lines(trace(site, "ann@virt.example"))
    assert out[:5] == [
        "address: ann@virt.example",
        "qmail-smtpd: virt.example is in rcpthosts: accepted from anyone",
        "qmail-send: virt.example is not in locals; virtualdomains gives it to joe: "
        "local delivery of joe-ann@virt.example",
        DD,
        f"qmail-lspawn: users/cdb assigns 'joe-ann' to user {user_name(site)}",
    ]
    assert out[5:8] == [who_line(site, joe, "-", "ann"), f"qmail-local: looks in {joe} for:", "  .qmail-ann: none"]
    assert out[8] == "  .qmail-default: used (DEFAULT=ann)"


def test_alias_handles_unknown_local_parts(site: Site) -> None:
    alias = site.home.path / "alias"
    out = lines(trace(site, "Postmaster"))
    name = user_name(site)
    assert out == [
        "address: Postmaster",
        "qmail-smtpd: no domain: accepted (qmail-smtpd takes an address without @ as local)",
        f"qmail-send: no @ in the address: envnoathost makes it Postmaster@{FQDN}",
        f"qmail-send: {FQDN} is in locals: local delivery of Postmaster@{FQDN}",
        DD,
        "qmail-lspawn: no users/cdb: qmail-getpw's rules decide",
        f"qmail-getpw: no account owns 'Postmaster': the alias user {name} handles it",
        who_line(site, alias, "-", "Postmaster"),
        f"qmail-local: looks in {alias} for:",
        "  .qmail-postmaster: used",
        "qmail-local -n:",
        f"  forward {name}",
        "  did 0+1+0",
    ]


def test_no_mailbox_bounces(site: Site) -> None:
    joe = home_with(site, "joe", {".qmail": "./Maildir/\n"})
    site.assign([site.user_line("joe", joe)])
    out = lines(trace(site, f"joe-nothing@{FQDN}", code=1))
    assert out[-5:] == [
        f"qmail-local: looks in {site.home.path / 'alias'} for:",
        "  .qmail-joe-nothing: none",
        "  .qmail-joe-default: none",
        "  .qmail-default: none",
        "  no file: qmail-local bounces: Sorry, no mailbox here by that name. (#5.1.1)",
    ]


def test_default_delivery_from_option_and_control(site: Site) -> None:
    joe = home_with(site, "joe", {})
    site.assign([site.user_line("joe", joe)])
    out = lines(trace(site, "--default-delivery", "./Mailbox", f"joe@{FQDN}"))
    assert not any(x.startswith("default delivery:") for x in out)
    assert out[-6:] == ["  .qmail: none", "  .qmaildefault: none", "  no file: the default delivery applies",
                        "qmail-local -n:",
                        "  mbox ./Mailbox", "  did 1+0+0"]
    site.home.control("defaultdelivery", "./Mail/\n")
    out = lines(trace(site, f"joe@{FQDN}"))
    assert out[3] == "default delivery: ./Mail/ (control/defaultdelivery)"
    assert out[-2:] == ["  maildir ./Mail/", "  did 1+0+0"]


def test_writable_home_is_deferred(site: Site) -> None:
    joe = home_with(site, "joe", {".qmail": "./Maildir/\n"})
    joe.chmod(0o757)  # world-writable: qmail-local (conf-patrn 002) lets a group-writable home pass
    site.assign([site.user_line("joe", joe)])
    out = lines(trace(site, f"joe@{FQDN}", code=1))
    assert out[-3:] == ["qmail-local -n: (exit 111)", "  Uh-oh: home directory is writable. (#4.7.0)",
                        "qmail-local would defer the message"]


def test_root_user_is_refused(site: Site) -> None:
    site.assign([f"=boss:root:0:0:{site.home.path / 'alias'}:::"])
    out = lines(trace(site, f"boss@{FQDN}", code=1))
    assert out[-1] == "qmail-lspawn: Not allowed to perform deliveries as root. (deferred)"


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_as_root_qmail_local_runs_as_the_user(site: Site) -> None:
    joe = home_with(site, "joe", {".qmail": "./Maildir/\n"})
    joe.chmod(0o700)  # only the user can look inside
    site.assign([site.user_line("joe", joe)])
    out = lines(trace(site, f"joe@{FQDN}", user=None))
    assert out[-2:] == ["  maildir ./Maildir/", "  did 1+0+0"]


def test_percenthack(site: Site) -> None:
    site.home.control("percenthack", f"{FQDN}\n")
    site.home.control("smtproutes", "far.example:[203.0.113.3]\n")
    out = lines(trace(site, f"ann%far.example@{FQDN}"))
    assert out[2:4] == [f"qmail-send: percenthack: ann%far.example@{FQDN} becomes ann@far.example",
                        "qmail-send: far.example is neither in locals nor in virtualdomains: "
                        "remote delivery of ann@far.example"]


# --- remote ---------------------------------------------------------------------------

def test_remote_by_smtproutes(site: Site) -> None:
    site.home.control("smtproutes", "remote.example:relay.example:2525\n:[203.0.113.9]\n")
    with DnsServer({("relay.example", "A"): ["203.0.113.8", "203.0.113.7"]}) as dns:
        out = lines(trace(site, "bob@remote.example", env=dns.env))
        assert out == [
            "address: bob@remote.example",
            "qmail-smtpd: remote.example is not in rcpthosts: accepted only from clients with RELAYCLIENT set",
            "qmail-send: remote.example is neither in locals nor in virtualdomains: "
            "remote delivery of bob@remote.example",
            "qmail-remote: smtproutes sends remote.example to relay.example, port 2525",
            "    relay.example: 203.0.113.7, 203.0.113.8",
        ]
        out = lines(trace(site, "bob@other.example", env=dns.env))
        assert out[3:] == ["qmail-remote: smtproutes sends other.example to [203.0.113.9], port 25",
                           "    [203.0.113.9]: 203.0.113.9"]


def test_remote_by_mx_in_preference_order(site: Site) -> None:
    records = {("mx.example", "MX"): ["20 mx2.mx.example.", "10 mx1.mx.example.", "10 mx0.mx.example."],
               ("mx0.mx.example", "A"): ["203.0.113.10"],
               ("mx1.mx.example", "A"): ["203.0.113.1", "203.0.113.2"],
               ("mx2.mx.example", "AAAA"): ["2001:db8::2"],
               ("plain.example", "A"): ["203.0.113.5"]}
    with DnsServer(records) as dns:
        out = lines(trace(site, "bob@mx.example", env=dns.env))
        assert out[3:] == [
            "qmail-remote: no smtproutes entry for mx.example: DNS decides (port 25)",
            "  MX records of mx.example, lowest preference first (equal ones are tried in random order):",
            "  MX 10 mx0.mx.example",
            "    mx0.mx.example: 203.0.113.10",
            "  MX 10 mx1.mx.example",
            "    mx1.mx.example: 203.0.113.1, 203.0.113.2",
            "  MX 20 mx2.mx.example",
            "    mx2.mx.example: 2001:db8::2",
        ]
        out = lines(trace(site, "bob@plain.example", env=dns.env))
        assert out[3:] == ["qmail-remote: no smtproutes entry for plain.example: DNS decides (port 25)",
                           "  plain.example has no MX record: its own addresses",
                           "    plain.example: 203.0.113.5"]
        out = lines(trace(site, "bob@nowhere.example", env=dns.env, code=1))
        assert out[-1] == "qmail-remote: Sorry, I couldn't find any host named nowhere.example. (#5.1.2)"


def test_mx_pointing_back_here_is_refused(site: Site) -> None:
    records = {("loop.example", "MX"): ["10 me.example."], ("me.example", "A"): ["127.0.0.1"]}
    with DnsServer(records) as dns:
        out = lines(trace(site, "bob@loop.example", env=dns.env, code=1))
    assert out[-2:] == ["    me.example: 127.0.0.1 (this host)",
                        "qmail-remote: Sorry. Although I'm listed as a best-preference MX or A for that host, "
                        "it isn't in my control/locals file, so I don't treat it as local. (#5.4.6)"]


def test_dns_trouble_is_temporary(site: Site) -> None:
    with DnsServer({}, servfail={"broken.example"}) as dns:
        res = trace(site, "bob@broken.example", env=dns.env, code=111)
    assert res.stderr == b"qmail trace: cannot tell now: DNS trouble looking up the MX records of broken.example\n"
    assert lines(res)[-1].startswith("qmail-remote: no smtproutes entry")


def test_missing_rcpthosts_is_flagged(site: Site) -> None:
    site.home.control("rcpthosts", None)
    joe = home_with(site, "joe", {".qmail": "./Maildir/\n"})
    site.assign([site.user_line("joe", joe)])
    out = lines(trace(site, f"joe@{FQDN}"))
    assert out[1] == "qmail-smtpd: control/rcpthosts is missing: every recipient is accepted (open relay!)"


def test_usage(site: Site) -> None:
    trace(site, code=100)
    trace(site, "a@b", "c@d", code=100)
    res = run([VENV_BIN / "qmail", "trace", "--home", "/nonexistent/qmail", "a@b"], env={"PATH": "/usr/bin:/bin"})
    expect(res, 111)
    assert res.stderr == b"qmail trace: no installation in /nonexistent/qmail\n"


@pytest.mark.parametrize("addr", ["", "@" + FQDN, "x" * 5000 + "@" + FQDN, "a%b%c@" + FQDN, "../../etc@" + FQDN,
                                  "a.b-..-x@" + FQDN, "a\x01\x7f\xff@" + FQDN, "joe-" + "-" * 300 + "@" + FQDN])
def test_hostile_local_addresses(site: Site, addr: str) -> None:
    res = run([VENV_BIN / "qmail", "trace", "--home", str(site.home.path), addr], user=site.user,
              env={"PATH": "/usr/bin:/bin"})
    assert res.returncode in (0, 1), res.explain()
    assert res.stderr == b"", res.explain()
    out = lines(res)
    assert out[0].startswith("address: ")
    # no .qmail name ever leaves the home: dots become colons (dotqmail.safe_ext)
    assert not any(x.startswith("  .qmail") and ".." in x for x in out), out
