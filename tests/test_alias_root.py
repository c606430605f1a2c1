"""Root mode: mail for root, postmaster and mailer-daemon reaches this installation's alias/ files.

The rule (docs/DESIGN.md): the alias user's ids come from passwd, its home is
always QMAILHOME/alias as `qmail init` recorded it, whatever passwd says.
"""

from __future__ import annotations

import os
import pwd

import pytest
from conftest import QHome
from sendkit import Running, Site, maildir_messages, qqueue

from pyqmail.local import users

FQDN = "test.example.com"


def _alias_maildir(home: QHome) -> None:
    alias = pwd.getpwnam("alias")
    top = home.path / "alias" / "Maildir"
    for d in (top, top / "tmp", top / "new", top / "cur"):
        d.mkdir()
        os.chown(d, alias.pw_uid, alias.pw_gid)
        d.chmod(0o700)


def test_alias_mail_reaches_the_alias_files_whatever_passwd_says(root_home: QHome) -> None:
    alias_dir = root_home.path / "alias"
    # .ci/run and several distributions give the alias user the home /var/qmail.
    assert pwd.getpwnam("alias").pw_dir != str(alias_dir)
    _alias_maildir(root_home)
    # .qmail-root and .qmail-postmaster are empty (qmail init as root without --user):
    # the default delivery, ./Maildir/ in the alias home. mailer-daemon forwards to postmaster.
    (alias_dir / ".qmail-mailer-daemon").write_text("&postmaster\n")
    site = Site(root_home, None, 0, 0)
    d = Running(site, env={"PATH": "/usr/bin:/bin"})
    try:
        d.wait_for(b"status: local 0/10 remote 0/20")
        for rcpt in (b"root", b"postmaster", b"Mailer-Daemon", b"alias"):
            qqueue(root_home, b"someone@elsewhere.example", [rcpt + b"@" + FQDN.encode()],
                   b"Subject: to " + rcpt + b"\n\nhello\n")
        d.wait_for(lambda ls: sum(x.startswith(b"delivery ") and b": success: " in x for x in ls) == 5)
    finally:
        assert d.stop() == 0
    got = maildir_messages(alias_dir / "Maildir")
    tos = sorted(m.split(b"\nDelivered-To: ", 1)[1].split(b"\n", 1)[0] for m in got)
    # "alias" itself is the alias user as an ordinary user: its home is alias/ too.
    assert tos == [b"alias@test.example.com", b"postmaster@test.example.com",
                   b"postmaster@test.example.com", b"root@test.example.com"]
    alias = pwd.getpwnam("alias")
    for f in (alias_dir / "Maildir" / "new").iterdir():
        assert (f.stat().st_uid, f.stat().st_gid) == (alias.pw_uid, alias.pw_gid)


def test_getpw_gives_the_installation_alias_home_both_ways(root_home: QHome,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from pyqmail import home as _home

    alias = pwd.getpwnam("alias")
    alias_dir = str(root_home.path / "alias").encode()
    monkeypatch.setenv("QMAILHOME", str(root_home.path))
    _home.reset()
    try:
        for passwd_home in (b"/var/qmail", alias_dir, b"/nonexistent"):
            def getpwnam(name: bytes, passwd_home: bytes = passwd_home) -> users.PwEntry | None:
                if name == b"alias":
                    return users.PwEntry(b"alias", alias.pw_uid, alias.pw_gid, passwd_home)
                return None

            for local in (b"root", b"postmaster", b"alias"):
                a = users.getpw(local, getpwnam=getpwnam, home_owner=lambda p: alias.pw_uid)
                assert (a.user, a.homedir) == (b"alias", alias_dir), (passwd_home, local)
    finally:
        monkeypatch.undo()
        _home.reset()
