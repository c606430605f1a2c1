"""qmail-local(8), dot-qmail(5), qmail-command(8): the real program, run as a process.

Every test runs QMAILHOME/bin/qmail-local with explicit argv and environment,
a seekable message file on descriptor 0, in home directories made here under
a world-traversable temporary directory, and checks the exact exit code,
report and files.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pytest

from conftest import IS_ROOT, TEST_USER, QHome, Result, world_dir
from queuefmt import RECEIVED, files, messages, parse_todo
from pyqmail.local.mbox import ctime
from pyqmail.local.qmail_local import (
    CHILD_CRASHED, FIRST_BLANK, HOME_STICKY, HOME_WRITABLE, LOOPING, NO_MAILBOX, QMAIL_WRITABLE, REWIND,
    USAGE, WARN_STICKY, XBIT_FILE, XBIT_PROGRAM,
)

HOST = b"test.example.com"
SENDER = b"sender@remote.example"
PATH = "/usr/bin:/bin"
MESSAGE = b"Subject: test\nTo: joe\n\nbody line\nFrom the body\n"


class Home:
    """A home directory for one recipient, and the user qmail-local runs as there."""

    def __init__(self, path: Path, user: str | None) -> None:
        self.path = path
        self.user = user  # None: the user running the tests

    def write(self, name: str, text: bytes, mode: int = 0o644) -> Path:
        p = self.path / name
        p.write_bytes(text)
        p.chmod(mode)
        self.own(p)
        return p

    def mkdir(self, name: str, mode: int = 0o700) -> Path:
        p = self.path / name
        p.mkdir(mode=mode)
        p.chmod(mode)
        self.own(p)
        return p

    def maildir(self, name: str = "Maildir") -> Path:
        p = self.mkdir(name)
        for sub in ("tmp", "new", "cur"):
            self.mkdir(f"{name}/{sub}")
        return p

    def own(self, p: Path) -> None:
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.lchown(p, pw.pw_uid, pw.pw_gid)


def make_home(user: str | None = None) -> tuple[Path, Home]:
    base = world_dir()
    path = base / "home"
    path.mkdir()
    path.chmod(0o755)
    h = Home(path, user)
    h.own(path)
    return base, h


@pytest.fixture
def home() -> Home:
    """A home directory, used by whoever runs the tests."""
    base, h = make_home()
    yield h
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def user_home() -> Home:
    """A home owned and used by an ordinary user (pqtest when root), where permissions bite."""
    base, h = make_home(TEST_USER if IS_ROOT else None)
    yield h
    shutil.rmtree(base, ignore_errors=True)


def local_args(home: Home, local: bytes = b"joe", dash: bytes = b"", ext: bytes = b"",
               sender: bytes = SENDER, default: bytes = b"./Mailbox", user: bytes = b"joe",
               host: bytes = HOST) -> list[bytes]:
    return [b"--", user, os.fsencode(home.path), local, dash, ext, host, sender, default]


def qlocal(qhome: QHome, args: Sequence[bytes], message: bytes = MESSAGE, env: Mapping[str, str] | None = None,
           user: str | None = None, stdin: object = None, offset: int = 0,
           preexec: Callable[[], None] | None = None) -> Result:
    """Run qmail-local with args, the message in a seekable file on fd 0."""
    argv = [os.fsencode(qhome.bin("qmail-local")), *args]
    kw: dict[str, object] = {}
    if user is not None:
        pw = pwd.getpwnam(user)
        kw.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
    if preexec is not None:
        kw["preexec_fn"] = preexec
    with tempfile.TemporaryFile() as f:
        f.write(message)
        f.seek(offset)
        p = subprocess.run(argv, stdin=f if stdin is None else stdin, capture_output=True,
                           env=dict(env) if env is not None else {"PATH": PATH}, timeout=300, **kw)  # type: ignore[call-overload]
    return Result([os.fsdecode(a) for a in argv], p.returncode, p.stdout, p.stderr)


def ok(res: Result, stdout: bytes) -> Result:
    assert (res.returncode, res.stdout, res.stderr) == (0, stdout, b""), res.explain()
    return res


def fails(res: Result, code: int, stderr: bytes, stdout: bytes = b"") -> Result:
    assert (res.returncode, res.stdout, res.stderr) == (code, stdout, stderr), res.explain()
    return res


def from_line_re(sender: bytes) -> re.Pattern[bytes]:
    return re.compile(b"From " + re.escape(sender) + rb" (\w{3} \w{3} \d\d \d\d:\d\d:\d\d \d{4})\n")


def check_from_time(stamp: bytes, before: float, after: float) -> None:
    assert stamp + b"\n" in {ctime(t) for t in range(int(before), int(after) + 1)}, stamp


# ---------------------------------------------------------------------------
# The .qmail search: the book's tables, files tried in order.

SHOW = (b"|printf '%s|%s|%s|%s|%s|%s\\n' NAME \"$EXT\" \"$EXT2\" \"$EXT3\" \"$EXT4\" \"${DEFAULT-unset}\"\n")


def _chain(qhome: QHome, home: Home, order: list[str], args: list[bytes]) -> list[bytes]:
    """Create every file of order, then remove them one by one; return what answered each time."""
    for name in order:
        home.write(name, SHOW.replace(b"NAME", name.encode()))
    seen = []
    for name in order:
        res = qlocal(qhome, args)
        assert res.returncode == 0, res.explain()
        seen.append(res.stdout)
        (home.path / name).unlink()
    return seen


def test_book_table_user_foo_bar_baz(qhome: QHome, home: Home) -> None:
    # Seed book ch. 3: LOCAL user-foo-bar-baz, USER user; the four files in
    # ~user, with EXT, EXT2, EXT3, EXT4 and DEFAULT exactly as its table.
    order = [".qmail-foo-bar-baz", ".qmail-foo-bar-default", ".qmail-foo-default", ".qmail-default"]
    seen = _chain(qhome, home, order, local_args(home, b"user-foo-bar-baz", b"-", b"foo-bar-baz", user=b"user"))
    assert seen == [
        b".qmail-foo-bar-baz|foo-bar-baz|bar-baz|baz||unset\ndid 0+0+1\n",
        b".qmail-foo-bar-default|foo-bar-baz|bar-baz|baz||baz\ndid 0+0+1\n",
        b".qmail-foo-default|foo-bar-baz|bar-baz|baz||bar-baz\ndid 0+0+1\n",
        b".qmail-default|foo-bar-baz|bar-baz|baz||foo-bar-baz\ndid 0+0+1\n",
    ]
    # None left: qmail-local bounces (the alias user is qmail-lspawn's choice, not qmail-local's).
    fails(qlocal(qhome, local_args(home, b"user-foo-bar-baz", b"-", b"foo-bar-baz")), 100, NO_MAILBOX + b"\n")


def test_book_table_alias_steps(qhome: QHome, home: Home) -> None:
    # Steps 5-9 of the book's list: with no user "user", qmail-lspawn hands the
    # whole local part to the alias user as the extension.
    order = [".qmail-user-foo-bar-baz", ".qmail-user-foo-bar-default", ".qmail-user-foo-default",
             ".qmail-user-default", ".qmail-default"]
    seen = _chain(qhome, home, order, local_args(home, b"user-foo-bar-baz", b"-", b"user-foo-bar-baz",
                                                  user=b"alias"))
    assert seen == [
        b".qmail-user-foo-bar-baz|user-foo-bar-baz|foo-bar-baz|bar-baz|baz|unset\ndid 0+0+1\n",
        b".qmail-user-foo-bar-default|user-foo-bar-baz|foo-bar-baz|bar-baz|baz|baz\ndid 0+0+1\n",
        b".qmail-user-foo-default|user-foo-bar-baz|foo-bar-baz|bar-baz|baz|bar-baz\ndid 0+0+1\n",
        b".qmail-user-default|user-foo-bar-baz|foo-bar-baz|bar-baz|baz|foo-bar-baz\ndid 0+0+1\n",
        b".qmail-default|user-foo-bar-baz|foo-bar-baz|bar-baz|baz|user-foo-bar-baz\ndid 0+0+1\n",
    ]
    fails(qlocal(qhome, local_args(home, b"user-foo-bar-baz", b"-", b"user-foo-bar-baz")), 100,
          NO_MAILBOX + b"\n")


def test_book_user_foo(qhome: QHome, home: Home) -> None:
    seen = _chain(qhome, home, [".qmail-foo", ".qmail-default"], local_args(home, b"user-foo", b"-", b"foo"))
    assert seen == [b".qmail-foo|foo||||unset\ndid 0+0+1\n", b".qmail-default|foo||||foo\ndid 0+0+1\n"]


def test_extension_default_file_is_never_tried(qhome: QHome, home: Home) -> None:
    home.write(".qmail-foo-bar-baz-default", b"|echo wrong\n")
    home.write(".qmail-default", b"|echo right $DEFAULT\n")
    ok(qlocal(qhome, local_args(home, b"u-foo-bar-baz", b"-", b"foo-bar-baz")), b"right foo-bar-baz\ndid 0+0+1\n")


def test_bare_user_ignores_dash_default(qhome: QHome, home: Home) -> None:
    # user@domain: dash and ext empty; .qmail-default does not match "no extension".
    home.write(".qmail-default", b"|echo wrong\n")
    ok(qlocal(qhome, local_args(home)), b"did 1+0+0\n")
    assert (home.path / "Mailbox").exists()


def test_no_qmail_follows_defaultdelivery(qhome: QHome, home: Home, qqout: Path) -> None:
    out = qqout
    res = qlocal(qhome, local_args(home, default=b"|echo default $LOCAL\n&x@y.example"),
                 env={"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out)})
    pid = (out / "pid").read_bytes().strip()
    ok(res, b"default joe\ndid 0+1+1\nqp " + pid + b"\n")
    assert _envelope(out) == (SENDER, [b"x@y.example"])


def test_empty_qmail_follows_defaultdelivery(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"")
    ok(qlocal(qhome, local_args(home, default=b"|echo default")), b"default\ndid 0+0+1\n")
    home.write(".qmail-foo", b"")
    ok(qlocal(qhome, local_args(home, b"joe-foo", b"-", b"foo", default=b"|echo default")),
       b"default\ndid 0+0+1\n")


def test_only_comments_discards(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"# discard everything\n#\n")
    ok(qlocal(qhome, local_args(home)), b"did 0+0+0\n")
    assert sorted(p.name for p in home.path.iterdir()) == [".qmail"]


def test_case_and_dots_in_extension(qhome: QHome, home: Home) -> None:
    home.write(".qmail-foo:bar-x", b"|echo $EXT\n")
    ok(qlocal(qhome, local_args(home, b"joe-Foo.Bar-X", b"-", b"Foo.Bar-X")), b"Foo.Bar-X\ndid 0+0+1\n")
    (home.path / ".qmail-foo:bar-x").unlink()
    home.write(".qmail-foo:bar-default", b"|echo $DEFAULT\n")
    ok(qlocal(qhome, local_args(home, b"joe-Foo.Bar-X", b"-", b"Foo.Bar-X")), b"X\ndid 0+0+1\n")
    # Dots never reach the file system: no escape from the home directory.
    home.write(".qmail-default", b"|echo default $DEFAULT\n")
    ok(qlocal(qhome, local_args(home, b"joe-../x", b"-", b"../x")), b"default ../x\ndid 0+0+1\n")


def test_address_spelling_default(qhome: QHome, home: Home) -> None:
    home.write(".qmail-foo-default", b"|echo \"[$DEFAULT]\"\n")
    ok(qlocal(qhome, local_args(home, b"joe-foo-Default", b"-", b"foo-Default")), b"[Default]\ndid 0+0+1\n")
    ok(qlocal(qhome, local_args(home, b"joe-foo-x", b"-", b"foo-x")), b"[x]\ndid 0+0+1\n")
    home.write(".qmail-a-default", b"|echo \"[$DEFAULT]\"\n")
    ok(qlocal(qhome, local_args(home, b"joe-a-", b"-", b"a-")), b"[]\ndid 0+0+1\n")


def test_default_is_inherited_when_no_default_file_matched(qhome: QHome, home: Home) -> None:
    home.write(".qmail-foo", b"|echo \"[${DEFAULT-unset}]\"\n")
    ok(qlocal(qhome, local_args(home, b"joe-foo", b"-", b"foo")), b"[unset]\ndid 0+0+1\n")
    ok(qlocal(qhome, local_args(home, b"joe-foo", b"-", b"foo"), env={"PATH": PATH, "DEFAULT": "outer"}),
       b"[outer]\ndid 0+0+1\n")


def test_directory_and_dangling_qmail_are_absent(qhome: QHome, home: Home) -> None:
    home.mkdir(".qmail-foo", 0o755)
    (home.path / ".qmail-bar").symlink_to(".qmail-bar")  # a loop
    home.write(".qmail-default", b"|echo default $DEFAULT\n")
    ok(qlocal(qhome, local_args(home, b"j-foo", b"-", b"foo")), b"default foo\ndid 0+0+1\n")
    ok(qlocal(qhome, local_args(home, b"j-bar", b"-", b"bar")), b"default bar\ndid 0+0+1\n")
    os.mkfifo(home.path / ".qmail-fifo")
    ok(qlocal(qhome, local_args(home, b"j-fifo", b"-", b"fifo")), b"default fifo\ndid 0+0+1\n")


def test_extension_bytes_are_kept(qhome: QHome, home: Home) -> None:
    # Not UTF-8, not ASCII: qmail takes bytes, and so does everything here.
    home.write(os.fsdecode(b".qmail-\xe4\xff-default"), b"|printf '%s|%s' \"$EXT\" \"$DEFAULT\" > out\n")
    ok(qlocal(qhome, local_args(home, b"j-\xe4\xff-\xc4X", b"-", b"\xe4\xff-\xc4X")), b"did 0+0+1\n")
    assert (home.path / "out").read_bytes() == b"\xe4\xff-\xc4X|\xc4X"


def test_very_long_extension(qhome: QHome, home: Home) -> None:
    ext = b"x" * 5000
    home.write(".qmail-default", b"|echo ${#DEFAULT}\n")
    ok(qlocal(qhome, local_args(home, b"j-" + ext, b"-", ext)), b"5000\ndid 0+0+1\n")


# ---------------------------------------------------------------------------
# Program lines: qmail-command(8).

ENV_NAMES = ["SENDER", "NEWSENDER", "RECIPIENT", "LOCAL", "USER", "HOME", "HOST", "HOST2", "HOST3", "HOST4",
             "EXT", "EXT2", "EXT3", "EXT4", "DEFAULT", "DTLINE", "RPLINE", "UFLINE"]


def test_program_environment(qhome: QHome, home: Home) -> None:
    home.write(".qmail-list-default", b"|/usr/bin/env -0 > env.out; pwd > pwd.out; umask > umask.out; cat > msg.out\n")
    home.write(".qmail-list-x-y-owner", b"")
    before = time.time()
    res = qlocal(qhome, local_args(home, b"joe-list-x-y", b"-", b"list-x-y", sender=b"a b@remote.example",
                                   user=b"joe"), env={"PATH": PATH, "KEEP": "kept"}, offset=7)
    after = time.time()
    ok(res, b"did 0+0+1\n")
    env = dict(item.split(b"=", 1) for item in (home.path / "env.out").read_bytes().split(b"\0") if item)
    uf = env.pop(b"UFLINE")
    m = from_line_re(b"a-b@remote.example").fullmatch(uf)
    assert m, uf
    check_from_time(m.group(1), before, after)
    assert env == {
        b"PATH": PATH.encode(), b"KEEP": b"kept", b"PWD": os.fsencode(home.path),
        b"SENDER": b"a b@remote.example",
        b"NEWSENDER": b"joe-list-x-y-owner@test.example.com",
        b"RECIPIENT": b"joe-list-x-y@test.example.com",
        b"LOCAL": b"joe-list-x-y", b"USER": b"joe", b"HOME": os.fsencode(home.path),
        b"HOST": b"test.example.com", b"HOST2": b"test.example", b"HOST3": b"test", b"HOST4": b"test",
        b"EXT": b"list-x-y", b"EXT2": b"x-y", b"EXT3": b"y", b"EXT4": b"",
        b"DEFAULT": b"x-y",
        b"DTLINE": b"Delivered-To: joe-list-x-y@test.example.com\n",
        b"RPLINE": b'Return-Path: <"a b"@remote.example>\n',
    } | ({b"SHLVL": env[b"SHLVL"]} if b"SHLVL" in env else {}) | ({b"_": env[b"_"]} if b"_" in env else {})
    assert (home.path / "pwd.out").read_bytes() == os.fsencode(home.path) + b"\n"
    assert (home.path / "umask.out").read_bytes() == b"0077\n"
    # The program gets the message from its start, without qmail-local's lines.
    assert (home.path / "msg.out").read_bytes() == MESSAGE


def test_environment_for_empty_sender(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"|printf '%s|%s|%s|%s' \"$SENDER\" \"$NEWSENDER\" \"$RPLINE\" \"$UFLINE\"\n")
    home.write(".qmail-owner", b"")
    res = qlocal(qhome, local_args(home, sender=b""))
    assert res.returncode == 0, res.explain()
    assert re.fullmatch(rb"\|\|Return-Path: <>\n\|From MAILER-DAEMON \w{3} \w{3} \d\d \d\d:\d\d:\d\d \d{4}\n"
                        rb"did 0\+0\+1\n", res.stdout), res.stdout


@pytest.mark.parametrize("code, expect", [
    (0, 0), (99, 0), (100, 100), (111, 111),
    (64, 100), (65, 100), (70, 100), (76, 100), (77, 100), (78, 100), (112, 100),
    (1, 111), (2, 111), (63, 111), (66, 111), (98, 111), (101, 111), (126, 111), (127, 111), (255, 111),
])
def test_program_exit_codes(qhome: QHome, home: Home, code: int, expect: int) -> None:
    home.write(".qmail", b"|echo out; echo err >&2; exit %d\n./Mailbox\n" % code)
    res = qlocal(qhome, local_args(home))
    if expect == 0:
        report = b"did 0+0+1\n" if code == 99 else b"did 1+0+1\n"
        assert (res.returncode, res.stdout, res.stderr) == (0, b"out\n" + report, b"err\n"), res.explain()
        assert (home.path / "Mailbox").exists() == (code == 0)
    else:
        # qmail-local adds nothing: what the program said is the report.
        assert (res.returncode, res.stdout, res.stderr) == (expect, b"out\n", b"err\n"), res.explain()
        assert not (home.path / "Mailbox").exists()


def test_program_killed_by_signal(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"|kill -9 $$\n")
    fails(qlocal(qhome, local_args(home)), 111, CHILD_CRASHED + b"\n")


def test_program_not_found_is_temporary(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"|/nonexistent/program\n")
    res = qlocal(qhome, local_args(home))
    assert res.returncode == 111 and res.stdout == b"", res.explain()
    assert b"/nonexistent/program" in res.stderr


def test_exit_99_keeps_earlier_forwards_only(qhome: QHome, home: Home, qqout: Path) -> None:
    out = qqout
    home.write(".qmail", b"&first@example.org\n|exit 99\n&second@example.org\n./Mailbox\n")
    res = qlocal(qhome, local_args(home), env={"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out)})
    pid = (out / "pid").read_bytes().strip()
    ok(res, b"did 0+1+1\nqp " + pid + b"\n")
    assert _envelope(out) == (SENDER, [b"first@example.org"])
    assert not (home.path / "Mailbox").exists()


def test_programs_share_one_offset_each_from_the_start(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"|head -c 5\n|cat >/dev/null\n|head -c 7\n")
    ok(qlocal(qhome, local_args(home)), b"SubjeSubjectdid 0+0+3\n")


# ---------------------------------------------------------------------------
# Forwarding.

@pytest.fixture
def qqout() -> Path:
    """A directory with a QMAILQUEUE script "qq" that records what it is given there."""
    base = world_dir()
    out = _qq_script(base)
    yield out
    shutil.rmtree(base, ignore_errors=True)


def _qq_script(base: Path) -> Path:
    out = base / "qq-out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    script = out / "qq"
    script.write_text("#!/bin/sh\ncat > \"$OUT/msg\"\ncat <&1 > \"$OUT/env\"\necho $$ > \"$OUT/pid\"\n"
                      "pwd > \"$OUT/cwd\"\n[ -f \"$OUT/errtext\" ] && cat \"$OUT/errtext\" >&6\n"
                      "exit ${QQ_EXIT:-0}\n")
    script.chmod(0o755)
    return out


def _envelope(out: Path) -> tuple[bytes, list[bytes]]:
    data = (out / "env").read_bytes()
    assert data.endswith(b"\0\0") and data.startswith(b"F"), data
    fields = data[:-2].split(b"\0")
    assert all(f.startswith(b"T") for f in fields[1:]), data
    return fields[0][1:], [f[1:] for f in fields[1:]]


def test_forward_lines(qhome: QHome, home: Home, qqout: Path) -> None:
    out = qqout
    home.write(".qmail-fwd", b"&me@new.job.com\nbare@example.org\n# c\n&\n9number@example.org\n")
    res = qlocal(qhome, local_args(home, b"joe-fwd", b"-", b"fwd"),
                 env={"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out)})
    pid = (out / "pid").read_bytes().strip()
    ok(res, b"did 0+4+0\nqp " + pid + b"\n")
    assert _envelope(out) == (SENDER, [b"me@new.job.com", b"bare@example.org", b"", b"9number@example.org"])
    # No Return-Path when forwarding: only the new Delivered-To line on top.
    assert (out / "msg").read_bytes() == b"Delivered-To: joe-fwd@test.example.com\n" + MESSAGE
    # qmail-queue (or QMAILQUEUE) runs in QMAILHOME, not in the recipient's home.
    assert (out / "cwd").read_text() == f"{qhome.path}\n"


def test_forward_with_unrunnable_qmailqueue(qhome: QHome, home: Home, qqout: Path) -> None:
    home.write(".qmail", b"&a@example.org\n")
    (qqout / "qq").chmod(0o644)
    fails(qlocal(qhome, local_args(home), env={"PATH": PATH, "QMAILQUEUE": str(qqout / "qq")}), 111,
          b"Unable to forward message: unable to exec qq (#4.3.0).\n")


@pytest.mark.parametrize("sender, files_, expected", [
    (SENDER, [], SENDER),
    (SENDER, [".qmail-list-owner"], b"joe-list-owner@test.example.com"),
    (SENDER, [".qmail-list-owner", ".qmail-list-owner-default"], b"joe-list-owner-@test.example.com-@[]"),
    (SENDER, [".qmail-list-owner-default"], SENDER),
    (b"", [".qmail-list-owner", ".qmail-list-owner-default"], b""),
    (b"#@[]", [".qmail-list-owner"], b"#@[]"),
])
def test_forward_owner_senders(qhome: QHome, home: Home, qqout: Path, sender: bytes, files_: list[str],
                               expected: bytes) -> None:
    out = qqout
    home.write(".qmail-list", b"&a@example.org\n&b@example.org\n|echo \"$NEWSENDER\"\n")
    for name in files_:
        home.write(name, b"&owner@example.org\n")
    res = qlocal(qhome, local_args(home, b"joe-list", b"-", b"list", sender=sender),
                 env={"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out)})
    pid = (out / "pid").read_bytes().strip()
    ok(res, expected + b"\ndid 0+2+1\nqp " + pid + b"\n")
    assert _envelope(out) == (expected, [b"a@example.org", b"b@example.org"])


def test_owner_is_checked_for_the_extension_not_the_default_file(qhome: QHome, home: Home, qqout: Path) -> None:
    out = qqout
    home.write(".qmail-list-default", b"&a@example.org\n")
    home.write(".qmail-list-owner", b"")  # not .qmail-list-x-owner: no effect
    res = qlocal(qhome, local_args(home, b"joe-list-x", b"-", b"list-x"),
                 env={"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out)})
    assert res.returncode == 0, res.explain()
    assert _envelope(out) == (SENDER, [b"a@example.org"])
    home.write(".qmail-list-x-owner", b"")
    res = qlocal(qhome, local_args(home, b"joe-list-x", b"-", b"list-x"),
                 env={"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out)})
    assert res.returncode == 0, res.explain()
    assert _envelope(out) == (b"joe-list-x-owner@test.example.com", [b"a@example.org"])


@pytest.mark.parametrize("code, exit_, text", [
    (31, 100, b"Unable to forward message: mail server permanently rejected message (#5.3.0).\n"),
    (11, 100, b"Unable to forward message: envelope address too long for qq (#5.1.3).\n"),
    (71, 111, b"Unable to forward message: mail server temporarily rejected message (#4.3.0).\n"),
    (53, 111, b"Unable to forward message: qq write error or disk full (#4.3.0).\n"),
    (25, 100, b"Unable to forward message: qq permanent problem (#5.3.0).\n"),
    (99, 111, b"Unable to forward message: qq temporary problem (#4.3.0).\n"),
])
def test_forward_failures(qhome: QHome, home: Home, qqout: Path, code: int, exit_: int, text: bytes) -> None:
    out = qqout
    home.write(".qmail", b"&a@example.org\n")
    fails(qlocal(qhome, local_args(home), env={"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out),
                                               "QQ_EXIT": str(code)}), exit_, text)


@pytest.mark.parametrize("custom, exit_, text", [
    # notqmail 1.09 (checked against it built from source): descriptor 6's text counts only past
    # 2 bytes; D is permanent, any other first byte temporary; the first byte is dropped.
    (b"D", 111, b"Unable to forward message: qq temporary problem (#4.3.0).\n"),
    (b"Dx", 111, b"Unable to forward message: qq temporary problem (#4.3.0).\n"),
    (b"Dxy", 100, b"Unable to forward message: xy.\n"),
    (b"Xyz", 111, b"Unable to forward message: yz.\n"),
    (b"Dfoo\n", 100, b"Unable to forward message: foo\n.\n"),
    (b"D\0\0", 100, b"Unable to forward message: .\n"),
    (b"Z" + b"a" * 300, 111, b"Unable to forward message: " + b"a" * 254 + b".\n"),
])
def test_forward_custom_error(qhome: QHome, home: Home, qqout: Path, custom: bytes, exit_: int, text: bytes) -> None:
    out = qqout
    (out / "errtext").write_bytes(custom)
    home.write(".qmail", b"&a@example.org\n")
    fails(qlocal(qhome, local_args(home), env={"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out),
                                               "QQ_EXIT": "82"}), exit_, text)


def test_forwarding_comes_after_other_deliveries(qhome: QHome, home: Home, qqout: Path) -> None:
    out = qqout
    home.write(".qmail", b"&a@example.org\n|exit 111\n")
    fails(qlocal(qhome, local_args(home), env={"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out)}),
          111, b"")
    assert not (out / "env").exists(), "a failed delivery prevents all forwarding"


def test_forward_through_real_qmail_queue(qhome: QHome, home: Home) -> None:
    home.write(".qmail-list", b"&a@example.org\nb@example.net\n")
    home.write(".qmail-list-owner", b"")
    home.write(".qmail-list-owner-default", b"")
    res = qlocal(qhome, local_args(home, b"joe-list", b"-", b"list"), env={"PATH": PATH})
    assert res.returncode == 0, res.explain()
    m = re.fullmatch(rb"did 0\+2\+0\nqp (\d+)\n", res.stdout)
    assert m and res.stderr == b"", res.explain()
    fs = files(qhome.queue)
    (num,) = [int(n) for n in fs["todo"]]
    assert messages(qhome.queue) == {num: "S4"}
    env = parse_todo((qhome.queue / "todo" / str(num)).read_bytes())
    assert env.uid == os.getuid()
    assert env.pid == int(m.group(1)), "qp is the pid of qmail-queue"
    assert env.sender == b"joe-list-owner-@test.example.com-@[]"
    assert env.recipients == [b"a@example.org", b"b@example.net"]
    data = (qhome.queue / "mess" / str(num % 23) / str(num)).read_bytes()
    rec = RECEIVED.match(data)
    assert rec and rec.group(1) == m.group(1), data
    assert data[rec.end():] == b"Delivered-To: joe-list@test.example.com\n" + MESSAGE


# ---------------------------------------------------------------------------
# Delivered-To: loops.

def test_loop_is_bounced(qhome: QHome, home: Home) -> None:
    msg = b"Received: x\nDelivered-To: joe@test.example.com\nSubject: loop\n\nbody\n"
    fails(qlocal(qhome, local_args(home), message=msg), 100, LOOPING + b"\n")
    assert not (home.path / "Mailbox").exists()


@pytest.mark.parametrize("msg", [
    b"Subject: x\n\nDelivered-To: joe@test.example.com\n",  # in the body
    b"delivered-to: joe@test.example.com\n\n",  # another case
    b"Delivered-To: joe@test.example.com \n\n",  # trailing blank
    b"Delivered-To: joe@test.example.com\r\n\r\n",  # CRLF
    b"Delivered-To: other@test.example.com\n\n",
    b"Subject: x\nDelivered-To: joe@test.example.com",  # no newline: not a whole header line
    b"X: " + b"y" * 100000 + b"\n\nDelivered-To: joe@test.example.com\n",
])
def test_not_a_loop(qhome: QHome, home: Home, msg: bytes) -> None:
    ok(qlocal(qhome, local_args(home), message=msg), b"did 1+0+0\n")


def test_loop_in_message_without_header_body_separator(qhome: QHome, home: Home) -> None:
    msg = b"".join(b"X-%d: y\n" % i for i in range(5000)) + b"Delivered-To: joe@test.example.com\n"
    fails(qlocal(qhome, local_args(home), message=msg), 100, LOOPING + b"\n")


def test_loop_after_very_long_header_line(qhome: QHome, home: Home) -> None:
    msg = b"X: " + b"y" * 3_000_000 + b"\nDelivered-To: joe@test.example.com\n\n"
    fails(qlocal(qhome, local_args(home), message=msg), 100, LOOPING + b"\n")


def test_loop_checks_the_mangled_recipient(qhome: QHome, home: Home) -> None:
    # A newline in the recipient becomes '_' in the Delivered-To line.
    msg = b"Delivered-To: a_b@test.example.com\n\n"
    fails(qlocal(qhome, local_args(home, local=b"a\nb"), message=msg), 100, LOOPING + b"\n")


# ---------------------------------------------------------------------------
# Refusals.

def test_world_writable_qmail(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"./Mailbox\n", 0o646)
    fails(qlocal(qhome, local_args(home)), 111, QMAIL_WRITABLE + b"\n")
    fails(qlocal(qhome, ["-n", *local_args(home)]), 111, QMAIL_WRITABLE + b"\n")


def test_group_writable_qmail_is_accepted(qhome: QHome, home: Home) -> None:
    # qmail 1.03 refuses the bits of conf-patrn, 002 as shipped.
    home.write(".qmail", b"./Mailbox\n", 0o664)
    ok(qlocal(qhome, local_args(home)), b"did 1+0+0\n")


def test_world_writable_qmail_found_while_searching(qhome: QHome, home: Home) -> None:
    home.write(".qmail-default", b"./Mailbox\n", 0o666)
    fails(qlocal(qhome, local_args(home, b"j-x", b"-", b"x")), 111, QMAIL_WRITABLE + b"\n")


@pytest.mark.parametrize("line, text, counts", [
    (b"./Mailbox\n", XBIT_FILE, None),
    (b"./Maildir/\n", XBIT_FILE, None),
    (b"|echo hi\n", XBIT_PROGRAM, None),
    (b"&a@example.org\n# only forwards\n", None, b"did 0+1+0\n"),
])
def test_executable_qmail_only_forwards(qhome: QHome, home: Home, qqout: Path, line: bytes,
                                        text: bytes | None, counts: bytes | None) -> None:
    out = qqout
    home.write(".qmail", b"&first@example.org\n" + line, 0o755)
    env = {"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out)}
    res = qlocal(qhome, local_args(home), env=env)
    if text is not None:
        fails(res, 111, text + b"\n")
        assert not (out / "env").exists()
    else:
        assert res.returncode == 0 and res.stdout.startswith(b"did 0+2+0\nqp "), res.explain()


def test_executable_empty_qmail_uses_defaultdelivery(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"", 0o755)
    ok(qlocal(qhome, local_args(home)), b"did 1+0+0\n")


def test_plus_list_makes_the_rest_forward_only(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"|echo before\n+list\n|echo after\n")
    fails(qlocal(qhome, local_args(home)), 111, XBIT_PROGRAM + b"\n", stdout=b"before\n")
    home.write(".qmail", b"|echo before\n+other\n|echo after\n")
    ok(qlocal(qhome, local_args(home)), b"before\nafter\ndid 0+0+2\n")


def test_sticky_home(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"./Mailbox\n")
    home.path.chmod(0o1755)
    fails(qlocal(qhome, local_args(home)), 111, HOME_STICKY + b"\n")
    # -n only warns.
    res = qlocal(qhome, ["-n", *local_args(home)])
    assert (res.returncode, res.stdout, res.stderr) == (0, b"mbox ./Mailbox\ndid 1+0+0\n", WARN_STICKY + b"\n")


def test_other_writable_home(qhome: QHome, home: Home) -> None:
    home.path.chmod(0o757)
    fails(qlocal(qhome, local_args(home)), 111, HOME_WRITABLE + b"\n")
    fails(qlocal(qhome, ["-n", *local_args(home)]), 111, HOME_WRITABLE + b"\n")


def test_group_writable_home_is_delivered_to(qhome: QHome, home: Home) -> None:
    # dot-qmail(5) says a group-writable home defers too, but C qmail built with its
    # default conf-patrn (002) refuses only other-writable homes (checked against
    # notqmail 1.09 built from source): qmail's behaviour is the spec.
    home.write(".qmail", b"./Mailbox\n")
    home.path.chmod(0o775)
    ok(qlocal(qhome, local_args(home)), b"did 1+0+0\n")
    home.path.chmod(0o777)
    fails(qlocal(qhome, local_args(home)), 111, HOME_WRITABLE + b"\n")


def test_blank_first_line(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"\n./Mailbox\n")
    fails(qlocal(qhome, local_args(home)), 111, FIRST_BLANK + b"\n")
    home.write(".qmail", b" \t \n./Mailbox\n")
    fails(qlocal(qhome, local_args(home)), 111, FIRST_BLANK + b"\n")
    home.write(".qmail", b"./Mailbox\n\n\n  \n# c\n")
    ok(qlocal(qhome, local_args(home)), b"did 1+0+0\n")


def test_blank_defaultdelivery(qhome: QHome, home: Home) -> None:
    fails(qlocal(qhome, local_args(home, default=b"")), 111, FIRST_BLANK + b"\n")


def test_unreadable_qmail_is_temporary(qhome: QHome, user_home: Home) -> None:
    user_home.write(".qmail-x", b"./Mailbox\n", 0o000)
    user_home.write(".qmail-default", b"./Mailbox\n")
    fails(qlocal(qhome, local_args(user_home, b"j-x", b"-", b"x"), user=user_home.user), 111,
          b"Unable to open .qmail-x: access denied. (#4.3.0)\n")
    assert not (user_home.path / "Mailbox").exists()


def test_unreachable_owner_file_is_not_an_owner(qhome: QHome, user_home: Home, qqout: Path) -> None:
    # qmail stats -owner files: only a temporary error stops; "access denied" means absent.
    out = qqout
    user_home.write(".qmail-x", b"&a@example.org\n")
    user_home.mkdir("locked", 0o000)
    (user_home.path / ".qmail-x-owner").symlink_to("locked/owner")
    user_home.own(user_home.path / ".qmail-x-owner")
    env = {"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out)}
    res = qlocal(qhome, local_args(user_home, b"j-x", b"-", b"x"), user=user_home.user, env=env)
    assert res.returncode == 0, res.explain()
    assert _envelope(out)[0] == SENDER
    (user_home.path / ".qmail-x-owner").unlink()
    user_home.write(".qmail-x-owner", b"")
    res = qlocal(qhome, local_args(user_home, b"j-x", b"-", b"x"), user=user_home.user, env=env)
    assert res.returncode == 0, res.explain()
    assert _envelope(out)[0] == b"j-x-owner@test.example.com"


def test_missing_home(qhome: QHome, tmp_path: Path) -> None:
    args = [b"--", b"joe", os.fsencode(tmp_path / "nope"), b"joe", b"", b"", HOST, SENDER, b"./Mailbox"]
    fails(qlocal(qhome, args), 111,
          b"Unable to switch to " + os.fsencode(tmp_path / "nope") + b": file does not exist. (#4.3.0)\n")


@pytest.mark.parametrize("args", [
    [],
    [b"joe"],
    [b"joe", b"/tmp", b"joe", b"", b"", HOST, SENDER],
    [b"joe", b"/tmp", b"joe", b"", b"", HOST, SENDER, b"./Mailbox", b"extra"],
    [b"joe", b"relative/home", b"joe", b"", b"", HOST, SENDER, b"./Mailbox"],
    [b"joe", b"", b"joe", b"", b"", HOST, SENDER, b"./Mailbox"],
])
def test_usage(qhome: QHome, args: list[bytes]) -> None:
    fails(qlocal(qhome, args), 100, USAGE + b"\n")


def test_bad_option(qhome: QHome, home: Home) -> None:
    fails(qlocal(qhome, ["-x", *local_args(home)[1:]]), 100, b"qmail-local: illegal option -- x\n" + USAGE + b"\n")


def test_options_end_at_the_first_operand(qhome: QHome, home: Home) -> None:
    # Without "--", an operand starting with '-' after the options is still an operand.
    args = local_args(home)[1:]
    ok(qlocal(qhome, ["-nN", *args]), b"did 1+0+0\n")
    assert (home.path / "Mailbox").exists()


def test_message_must_be_seekable(qhome: QHome, home: Home) -> None:
    r, w = os.pipe()
    os.write(w, MESSAGE)
    os.close(w)
    try:
        fails(qlocal(qhome, local_args(home), stdin=r), 111, REWIND + b"\n")
    finally:
        os.close(r)


# ---------------------------------------------------------------------------
# -n: the delivery instructions, printed.

def test_n_prints_instructions(qhome: QHome, home: Home) -> None:
    home.write(".qmail-x", b"# comment\n./Mailbox  \n/abs/Maildir/\t\n|preline vacation djb\n&me@new.job.com\n"
                           b"bare@example.org\n+list\n&a@b\n\n")
    r, w = os.pipe()
    os.close(w)
    try:
        res = qlocal(qhome, ["-n", *local_args(home, b"joe-x", b"-", b"x")], stdin=r)  # the message is not read
    finally:
        os.close(r)
    ok(res, b"mbox ./Mailbox\nmaildir /abs/Maildir/\nprogram preline vacation djb\nforward me@new.job.com\n"
            b"forward bare@example.org\nforward a@b\ndid 2+3+1\n")
    assert sorted(p.name for p in home.path.iterdir()) == [".qmail-x"]


def test_n_on_a_looping_message_still_lists(qhome: QHome, home: Home) -> None:
    msg = b"Delivered-To: joe@test.example.com\n\n"
    ok(qlocal(qhome, ["-n", *local_args(home)], message=msg), b"mbox ./Mailbox\ndid 1+0+0\n")


def test_n_with_x_bit_and_no_mailbox(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"&a@b\n./Mailbox\n", 0o700)
    fails(qlocal(qhome, ["-n", *local_args(home)]), 111, XBIT_FILE + b"\n", stdout=b"forward a@b\n")
    fails(qlocal(qhome, ["-n", *local_args(home, b"joe-none", b"-", b"none")]), 100, NO_MAILBOX + b"\n")


def test_n_shows_hostile_lines_uncut(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"./Mail\0box\n|echo\0hi\n&a@b\0c\n./Maildir\r\n")
    ok(qlocal(qhome, ["-n", *local_args(home)]),
       b"mbox ./Mail\0box\nprogram echo\0hi\nforward a@b\0c\nmbox ./Maildir\r\ndid 2+1+1\n")


def test_the_manual_test_command(qhome: QHome, home: Home) -> None:
    # dot-qmail(5): qmail-local -n $USER ~ $USER '' '' '' '' ./Mailbox
    args = [b"-n", b"joe", os.fsencode(home.path), b"joe", b"", b"", b"", b"", b"./Mailbox"]
    ok(qlocal(qhome, args), b"mbox ./Mailbox\ndid 1+0+0\n")


# ---------------------------------------------------------------------------
# Hostile .qmail files.

def test_qmail_without_trailing_newline(qhome: QHome, home: Home) -> None:
    home.write(".qmail", b"|echo one\n|echo two")
    ok(qlocal(qhome, local_args(home)), b"one\ntwo\ndid 0+0+2\n")


def test_qmail_with_crlf(qhome: QHome, home: Home) -> None:
    # The CR is part of the name: qmail delivers to "Mailbox\r".
    home.write(".qmail", b"./Mailbox\r\n")
    ok(qlocal(qhome, local_args(home)), b"did 1+0+0\n")
    assert (home.path / "Mailbox\r").exists() and not (home.path / "Mailbox").exists()


def test_qmail_with_nul_bytes(qhome: QHome, home: Home) -> None:
    home.maildir()
    home.write(".qmail", b"./Mail\0box\n./Maildir\0junk/\n\0ignored\n|echo hi\0there\n")
    ok(qlocal(qhome, local_args(home)), b"hi\ndid 2+0+1\n")
    assert (home.path / "Mail").exists()
    assert len(list((home.path / "Maildir" / "new").iterdir())) == 1


def test_qmail_with_very_long_lines(qhome: QHome, home: Home, qqout: Path) -> None:
    out = qqout
    long_comment = b"#" + b"x" * 2_000_000 + b"\n"
    long_addr = b"a" * 500_000 + b"@example.org"
    home.write(".qmail", long_comment + b"&" + long_addr + b"\n|echo ok\n")
    res = qlocal(qhome, local_args(home), env={"PATH": PATH, "QMAILQUEUE": str(out / "qq"), "OUT": str(out)})
    assert res.returncode == 0 and res.stdout.startswith(b"ok\ndid 0+1+1\nqp "), res.explain()
    assert _envelope(out) == (SENDER, [long_addr])
    long_path = b"./" + b"m" * 300_000
    home.write(".qmail", long_path + b"\n")
    fails(qlocal(qhome, local_args(home)), 111, b"Unable to open " + long_path + b": file name too long. (#4.2.1)\n")


def test_huge_qmail_is_refused_not_swallowed(qhome: QHome, home: Home) -> None:
    from pyqmail.local.qmail_local import DOTQMAIL_MAX, NOMEM
    with open(home.path / ".qmail", "wb") as f:
        f.truncate(DOTQMAIL_MAX + 1)
    home.own(home.path / ".qmail")
    (home.path / ".qmail").chmod(0o644)
    fails(qlocal(qhome, local_args(home)), 111, NOMEM + b"\n")


# ---------------------------------------------------------------------------
# Running as the recipient (root only): qmail-lspawn's job, done here with spawn.

def test_delivery_as_ordinary_user_via_spawn(qhome: QHome) -> None:
    if not IS_ROOT:
        pytest.skip("needs root")
    from pyqmail import spawn
    from pyqmail.privs import Credentials

    pw = pwd.getpwnam(TEST_USER)
    base, h = make_home(TEST_USER)
    try:
        h.maildir()
        h.write(".qmail", b"./Mailbox\n./Maildir/\n|id -u > uid.out\n")
        with tempfile.TemporaryFile() as msg, tempfile.TemporaryFile() as out:
            msg.write(MESSAGE)
            msg.flush()
            argv = ["qmail-local", "--", TEST_USER, str(h.path), TEST_USER, "", "", "test.example.com",
                    os.fsdecode(SENDER), "./Mailbox"]
            pid = spawn.spawn(str(qhome.bin("qmail-local")), argv, env={"PATH": PATH},
                              fds={0: msg.fileno(), 1: out.fileno(), 2: out.fileno()},
                              creds=Credentials(pw.pw_uid, pw.pw_gid, (pw.pw_gid,)))
            code = spawn.wait(pid)
            out.seek(0)
            report = out.read()
        assert (code, report) == (0, b"did 2+0+1\n")
        (mail,) = (h.path / "Maildir" / "new").iterdir()
        for p in (h.path / "Mailbox", mail, h.path / "uid.out"):
            st = p.stat()
            assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid), p
            assert stat.S_IMODE(st.st_mode) == 0o600, p
        assert (h.path / "uid.out").read_bytes() == b"%d\n" % pw.pw_uid
    finally:
        shutil.rmtree(base, ignore_errors=True)
