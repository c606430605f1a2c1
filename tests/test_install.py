"""`qmail init`: qmail's install + config-fast."""

from __future__ import annotations

import io
import os
import pwd
import stat
import tomllib
from pathlib import Path

import pytest

from conftest import IS_ROOT, ROOT, VENV_BIN, QHome, expect, make_home, need_root_setup, run, world_dir
from pyqmail import spawn
from pyqmail.admin import install

QUEUE_MODES = {
    "queue": 0o750, "queue/pid": 0o700, "queue/intd": 0o700, "queue/todo": 0o750,
    "queue/bounce": 0o700, "queue/mess": 0o750, "queue/info": 0o700, "queue/local": 0o700,
    "queue/remote": 0o700, "queue/lock": 0o750,
}
OWNERS = {
    "": "root", "control": "root", "bin": "root", "boot": "root", "users": "root", "alias": "alias",
    "queue": "qmailq", "queue/pid": "qmailq", "queue/intd": "qmailq", "queue/todo": "qmailq",
    "queue/mess": "qmailq", "queue/mess/0": "qmailq", "queue/bounce": "qmails", "queue/info": "qmails",
    "queue/info/22": "qmails", "queue/local": "qmails", "queue/remote": "qmails",
    "queue/lock": "qmailq", "queue/lock/tcpto": "qmailr", "queue/lock/sendmutex": "qmails",
    "queue/lock/trigger": "qmails",
}


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_layout_and_modes(qhome: QHome) -> None:
    h = qhome.path
    for d in ("bin", "boot", "control", "users", "alias", "queue"):
        assert (h / d).is_dir()
    assert _mode(h / "alias") == 0o2755
    for rel, mode in QUEUE_MODES.items():
        assert _mode(h / rel) == mode, rel
    for d in ("mess", "info", "local", "remote"):
        assert sorted(os.listdir(h / "queue" / d), key=int) == [str(i) for i in range(23)]
        assert _mode(h / "queue" / d / "22") == QUEUE_MODES[f"queue/{d}"]
    for d in ("pid", "intd", "todo", "bounce"):
        assert os.listdir(h / "queue" / d) == []
    tcpto = h / "queue/lock/tcpto"
    assert tcpto.read_bytes() == b"\0" * 1024 and _mode(tcpto) == 0o644
    assert (h / "queue/lock/sendmutex").read_bytes() == b"" and _mode(h / "queue/lock/sendmutex") == 0o600
    trig = h / "queue/lock/trigger"
    assert stat.S_ISFIFO(trig.lstat().st_mode) and _mode(trig) == 0o622


def test_root_owners() -> None:
    need_root_setup()
    h = make_home(single=False).path
    qmail_gid = __import__("grp").getgrnam("qmail").gr_gid
    for rel, owner in OWNERS.items():
        st = (h / rel).lstat()
        assert st.st_uid == pwd.getpwnam(owner).pw_uid, rel
        assert st.st_gid == qmail_gid, rel
    inst = (h / "conf" / "install").read_text()
    assert "mode root" in inst and f"user qmailq qmailq {pwd.getpwnam('qmailq').pw_uid}" in inst
    for name in install.ALIAS_FILES:
        assert (h / "alias" / name).read_bytes() == b"", "as root without --user: empty alias files"


@pytest.mark.parametrize("fqdn,ddom,pdom", [
    ("mail.example.com", "example.com", "example.com"),
    ("a.b.c.example.org", "b.c.example.org", "example.org"),
    ("example.com", "example.com", "example.com"),
    ("localhost", "localhost", "localhost"),
])
def test_config_fast_files(fqdn: str, ddom: str, pdom: str) -> None:
    base = world_dir()
    res = expect(run([VENV_BIN / "qmail", "init", "--single-user", "--home", base / "q", fqdn]))
    c = base / "q" / "control"
    assert (c / "me").read_text() == fqdn + "\n"
    assert (c / "defaultdomain").read_text() == ddom + "\n"
    assert (c / "plusdomain").read_text() == pdom + "\n"
    assert (c / "locals").read_text() == fqdn + "\n"
    assert (c / "rcpthosts").read_text() == fqdn + "\n"
    for f in install.CONTROL_FILES:
        assert _mode(c / f) == 0o644
    assert res.stdout.decode() == (
        f"Your fully qualified host name is {fqdn}.\n"
        f"Putting {fqdn} into control/me...\n"
        f"Putting {ddom} into control/defaultdomain...\n"
        f"Putting {pdom} into control/plusdomain...\n"
        f"Putting {fqdn} into control/locals...\n"
        f"Putting {fqdn} into control/rcpthosts...\n"
        f"Now qmail will refuse to accept SMTP messages except to {fqdn}.\n"
        "Make sure to change rcpthosts if you add hosts to locals or virtualdomains!\n"
        f"Putting a self-signed certificate for {fqdn} into control/servercert.pem...\n")
    assert _mode(c / "servercert.pem") == 0o600  # tests/test_certs.py: the certificate itself


def test_refuses_to_overwrite_without_force(qhome: QHome) -> None:
    qhome.control("rcpthosts", "mine.example\n")
    res = run([VENV_BIN / "qmail", "init", "--single-user", "--home", qhome.path, "other.example"])
    assert res.returncode == 100, res.explain()
    assert b"control/me" in res.stderr and b"--force" in res.stderr
    assert (qhome.path / "control" / "rcpthosts").read_text() == "mine.example\n"
    assert (qhome.path / "control" / "me").read_text() == "test.example.com\n"
    expect(run([VENV_BIN / "qmail", "init", "--single-user", "--force", "--home", qhome.path, "other.example"]))
    assert (qhome.path / "control" / "me").read_text() == "other.example\n"
    assert (qhome.path / "control" / "rcpthosts").read_text() == "other.example\n"


def test_reinit_keeps_queue(qhome: QHome) -> None:
    (qhome.queue / "todo" / "123").write_bytes(b"u0\0p1\0F\0")
    expect(run([VENV_BIN / "qmail", "init", "--single-user", "--force", "--home", qhome.path, "x.example"]))
    assert (qhome.queue / "todo" / "123").read_bytes() == b"u0\0p1\0F\0"


def test_alias_files_point_at_user(qhome: QHome) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    for name in install.ALIAS_FILES:
        assert (qhome.path / "alias" / name).read_text() == f"&{me}\n"
    base = world_dir()
    expect(run([VENV_BIN / "qmail", "init", "--single-user", "--user", "joe", "--home", base / "q", "x.example"]))
    assert (base / "q" / "alias" / ".qmail-root").read_text() == "&joe\n"


def test_one_stub_per_program(qhome: QHome) -> None:
    with open(ROOT / "pyproject.toml", "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert sorted(os.listdir(qhome.path / "bin")) == sorted(scripts)
    for name, target in scripts.items():
        s = spawn.read_stub(str(qhome.bin(name)))
        assert s is not None and s.name == name and s.module == target.split(":")[0]
        assert s.home == str(qhome.path)
        assert _mode(qhome.bin(name)) == 0o755


BOOK_HOME = """#!/bin/sh

# Using splogger to send the log through syslog.
# Using qmail-local to deliver messages to ~/Mailbox by default.

exec env - PATH="/var/qmail/bin:$PATH" \\
qmail-start ./Mailbox splogger qmail
"""

BOOK_HOME_DF = """#!/bin/sh

# Using splogger to send the log through syslog.
# Using dot-forward to support sendmail-style ~/.forward files.
# Using qmail-local to deliver messages to ~/Mailbox by default.

exec env - PATH="/var/qmail/bin:$PATH" \\
qmail-start '|dot-forward .forward
./Mailbox' splogger qmail
"""


def test_boot_scripts(qhome: QHome) -> None:
    from pyqmail.admin import boot
    scripts = boot.scripts("/var/qmail")
    assert scripts["home"] == BOOK_HOME
    assert scripts["home+df"] == BOOK_HOME_DF
    names = {"home", "proc", "binm1", "binm2", "binm3"}
    assert set(scripts) == names | {n + "+df" for n in names}
    assert sorted(os.listdir(qhome.path / "boot")) == sorted(scripts)
    text = (qhome.path / "boot" / "proc").read_text()
    assert f'PATH="{qhome.path}/bin:$PATH"' in text and "'|preline procmail' splogger qmail" in text
    assert _mode(qhome.path / "boot" / "binm2+df") == 0o755
    for name in scripts:  # every one is a valid sh script
        expect(run(["sh", "-n", qhome.path / "boot" / name]))


def test_missing_users_refused_without_create(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install, "_user_exists", lambda name: name != "qmailp")
    monkeypatch.setattr(install.os, "geteuid", lambda: 0)
    err = io.StringIO()
    rc = install.init(install.Options(home=str(world_dir() / "q"), fqdn="x.example"), io.StringIO(), err)
    assert rc == 100
    assert "missing user qmailp" in err.getvalue() and "--create-users" in err.getvalue()


@pytest.mark.parametrize("fqdn", ["bad name", "a/b", "tab\there"])
def test_bad_fqdn(fqdn: str) -> None:
    err = io.StringIO()
    rc = install.init(install.Options(home=str(world_dir() / "q"), fqdn=fqdn or None, single_user=True),
                      io.StringIO(), err)
    if fqdn:
        assert rc == 100 and "not a host name" in err.getvalue()


def test_derived_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install.socket, "gethostname", lambda: "mail")
    monkeypatch.setattr(install.socket, "getaddrinfo",
                        lambda *a: [(2, 1, 6, "mail.example.org", ("127.0.1.1", 0))])
    out = io.StringIO()
    assert install.find_fqdn(out) == "mail.example.org"
    assert out.getvalue() == ("Your hostname is mail.\n"
                              "Your host's fully qualified name in DNS is mail.example.org.\n")


def test_underivable_fqdn_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*a: object) -> object:
        raise OSError("no DNS")
    monkeypatch.setattr(install.socket, "gethostname", lambda: "lonely")
    monkeypatch.setattr(install.socket, "getaddrinfo", fail)
    err = io.StringIO()
    rc = install.init(install.Options(home=str(world_dir() / "q"), single_user=True), io.StringIO(), err)
    assert rc == 100
    assert "couldn't find your host's canonical name in DNS" in err.getvalue()
    assert "control/me" in err.getvalue()
