"""qmail-rspawn(8): remote delivery commands, qmail-remote's output turned into reports."""

from __future__ import annotations

import pytest

from conftest import expect, run
from pyqmail.remote import qmail_rspawn
from pyqmail.send import spawnproto
from sendkit import Site, make_site, only_todo, qqueue, remove_site


@pytest.fixture
def site() -> Site:
    s = make_site()
    yield s
    remove_site(s)


def rspawn(site: Site, commands: bytes, env: dict[str, str] | None = None) -> dict[int, bytes]:
    res = expect(run([site.home.bin("qmail-rspawn")], input=commands, user=site.user,
                     env=env or {"PATH": "/usr/bin:/bin"}))
    assert res.stdout[:1] == bytes([spawnproto.SPAWN_MAX]), res.explain()
    return dict(spawnproto.ReportReader().feed(res.stdout[1:]))


def _queued(site: Site) -> bytes:
    qqueue(site.home, b"s@x", [b"r@far.example"], b"Subject: r\n\nremote\n", user=site.user)
    num = only_todo(site.home)
    return f"{num % 23}/{num}".encode()


def test_without_qmail_remote_every_delivery_is_deferred(site: Site) -> None:
    site.home.bin("qmail-remote").unlink(missing_ok=True)
    m = _queued(site)
    reps = rspawn(site, spawnproto.command(0, m, b"s@x", b"r@far.example")
                  + spawnproto.command(1, m, b"s@x", b"q@far.example"))
    assert reps == {0: qmail_rspawn.NOT_AVAILABLE, 1: qmail_rspawn.NOT_AVAILABLE}
    assert qmail_rspawn.NOT_AVAILABLE == b"ZSorry, remote delivery is not available yet. (#4.3.0)\n"


REMOTE = """#!/bin/sh
case "$3" in
  ok@*) printf 'r\\0Kgreat, %s %s %s\\0' "$1" "$2" "$3"; cat >/dev/null ;;
  hard@*) printf 'hno such user\\n\\0DGiving up.\\n\\0' ;;
  soft@*) printf 'sgreylisted\\n\\0Kbut the rest went\\n\\0' ;;
  body@*) printf 'r\\0K'; cat; printf '\\0' ;;
  temp@*) exit 111 ;;
  perm@*) exit 3 ;;
  quiet@*) ;;
  crash@*) kill -9 $$ ;;
esac
"""


def test_qmail_remote_output_becomes_the_report(site: Site) -> None:
    script = site.base / "remote.sh"
    script.write_text(REMOTE)
    script.chmod(0o755)
    m = _queued(site)
    names = ["ok", "hard", "soft", "body", "temp", "perm", "quiet", "crash"]
    cmds = b"".join(spawnproto.command(i, m, b"s@x", n.encode() + b"@far.example") for i, n in enumerate(names))
    reps = rspawn(site, cmds, env={"PATH": "/usr/bin:/bin", "QMAILREMOTE": str(script)})
    assert reps[0] == b"Kgreat, far.example s@x ok@far.example"
    assert reps[1] == b"Dno such user\nGiving up.\n"
    assert reps[2] == b"Zgreylisted\n"
    assert reps[3].startswith(b"KReceived: (qmail ") and reps[3].endswith(b"Subject: r\n\nremote\n")
    assert reps[4] == b"ZUnable to run qmail-remote.\n"
    assert reps[5] == b"DUnable to run qmail-remote.\n"
    assert reps[6] == b"Zqmail-remote produced no output.\n"
    assert reps[7] == b"Zqmail-remote crashed.\n"


def test_qmailremote_that_cannot_run(site: Site) -> None:
    m = _queued(site)
    reps = rspawn(site, spawnproto.command(0, m, b"s@x", b"r@far"),
                  env={"PATH": "/usr/bin:/bin", "QMAILREMOTE": str(site.base / "nonexistent")})
    assert reps == {0: b"DUnable to run qmail-remote.\n"}


def test_tcpto_is_cleared_at_start(site: Site) -> None:
    tcpto = site.home.queue / "lock" / "tcpto"
    tcpto.write_bytes(b"\1" * 1024)
    assert rspawn(site, b"") == {}
    assert tcpto.read_bytes() == b"\0" * 1024


@pytest.mark.parametrize("out, want", [
    (b"r\0Kthanks\0", b"Kthanks"),
    (b"Zconnect failed\0", b"Zconnect failed"),
    (b"Dbad host\0", b"Dbad host"),
    (b"hrefused\0Kothers ok\0", b"Drefused"),
    (b"hrefused\0Dall refused\0", b"Drefused" + b"all refused"),
    (b"srefused\0Zlater\0", b"Zrefused" + b"later"),
    (b"srefused\0Kothers ok\0", b"Zrefused"),
    (b"rok\0Zbut\0", b"Zok" + b"but"),
    (b"junk without nul", b"D"),
    (b"x\0y\0", b"D"),
])
def test_report_from_records(out: bytes, want: bytes) -> None:
    assert qmail_rspawn.report(0, out) == want
