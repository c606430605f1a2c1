"""setuidgid, envuidgid, envdir, softlimit, svok, svc, svstat: against daemontools 0.76's own programs.

Every case runs ours and daemontools' on the same input in the same
directory and compares exit code, stdout and stderr byte for byte.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, QHome, Result, make_home, run
from pyqmail.svc import envdir, pathexec, softlimit
from test_tai64 import real

BASE_ENV = {"PATH": "/usr/bin:/bin", "A": "1", "HOME": "/nowhere", "Z": "last"}


@pytest.fixture(scope="module")
def home() -> Iterator[QHome]:
    h = make_home()
    yield h
    shutil.rmtree(h.path.parent, ignore_errors=True)


def both(home: QHome, name: str, args: list[str], cwd: Path, env: dict[str, str] | None = None,
         user: str | None = None, input: bytes = b"") -> tuple[Result, Result]:
    """Run our program name and daemontools' with the same args, cwd, env and user."""
    env = dict(BASE_ENV if env is None else env)
    ours = run([home.bin(name), *args], env=env, cwd=cwd, user=user, input=input)
    theirs = run([real(name), *args], env=env, cwd=cwd, user=user, input=input)
    return ours, theirs


def same(home: QHome, name: str, args: list[str], cwd: Path, **kw: object) -> Result:
    """Assert ours and daemontools' name behave identically on args; return ours.

    svstat prints seconds: a pair of runs that straddles a second boundary is run again.
    """
    for _ in range(5):
        ours, theirs = both(home, name, args, cwd, **kw)  # type: ignore[arg-type]
        if (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr):
            break
        if name != "svstat":
            break
    assert (ours.returncode, ours.stdout, ours.stderr) == (theirs.returncode, theirs.stdout, theirs.stderr), \
        f"ours:\n{ours.explain()}\ndaemontools:\n{theirs.explain()}"
    return ours


# --- pure parts ---

def test_changed_env_replaces_in_place_of_the_last_entry() -> None:
    env = [b"A=1", b"HOME=/x", b"PATH=/bin", b"Z=z"]
    assert pathexec.changed_env([b"HOME"], env) == [b"A=1", b"Z=z", b"PATH=/bin"]
    assert pathexec.changed_env([b"A=2"], env) == [b"Z=z", b"HOME=/x", b"PATH=/bin", b"A=2"]
    assert pathexec.changed_env([b"NEW=v", b"NEW"], env) == env
    # The name ends at the first '=': a file "A=B" holding x sets A to "B=x".
    assert pathexec.changed_env([b"A=B=x"], env)[-1] == b"A=B=x"
    assert pathexec.changed_env([b"NOPE"], env) == env
    assert pathexec.changed_env([], []) == []


def test_envdir_value_rules() -> None:
    assert envdir.value(b"v1  \t\nsecond line") == b"v1"
    assert envdir.value(b"a\0b\0") == b"a\nb\n"
    assert envdir.value(b"\n") == b""
    assert envdir.value(b" \t ") == b""
    assert envdir.value(b"x \0 ") == b"x \n"


def test_softlimit_scan_ulong_wraps_like_c() -> None:
    assert softlimit.scan_ulong("123") == (123, 3)
    assert softlimit.scan_ulong("12x") == (12, 2)
    assert softlimit.scan_ulong("") == (0, 0)
    assert softlimit.scan_ulong("18446744073709551616") == (0, 20)
    assert softlimit.scan_ulong("-1") == (0, 0)


# --- usage and simple failures ---

USAGE_CASES = [
    ("envdir", []), ("envdir", ["x"]), ("envdir", ["/nonexistent", "true"]),
    ("setuidgid", []), ("setuidgid", ["root"]), ("setuidgid", ["no-such-user", "true"]),
    ("envuidgid", []), ("envuidgid", ["root"]), ("envuidgid", ["no-such-user", "true"]),
    ("envuidgid", ["root", "/nonexistent"]), ("envuidgid", ["root", "no-such-program"]),
    ("softlimit", []), ("softlimit", ["-z", "true"]), ("softlimit", ["-m", "abc", "true"]),
    ("softlimit", ["-m"]), ("softlimit", ["-m", "100000000"]), ("softlimit", ["-m", "1x", "true"]),
    ("softlimit", ["-c", "=", "/nonexistent"]), ("softlimit", ["-c", "", "true"]),
    ("softlimit", ["--", "true"]), ("softlimit", ["-mz", "true"]),
    ("svc", ["-z"]), ("svc", ["-u", "/nonexistent", "."]), ("svc", ["-u"]), ("svc", []), ("svc", ["-", "x"]),
    ("svok", []), ("svok", ["/nonexistent"]), ("svok", ["."]), ("svok", ["file"]),
    ("svstat", []), ("svstat", ["/nonexistent", ".", "file", "", "noexec"]),
    ("supervise", []), ("supervise", ["a", "b"]), ("supervise", ["/nonexistent"]),
]


@pytest.mark.parametrize("name,args", USAGE_CASES)
def test_failures_match_daemontools(home: QHome, tmp_path: Path, name: str, args: list[str]) -> None:
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "noexec").mkdir()
    same(home, name, args, tmp_path)


def test_svok_svstat_with_a_supervise_dir_but_no_supervise(home: QHome, tmp_path: Path) -> None:
    s = tmp_path / "s"
    (s / "supervise").mkdir(parents=True)
    os.mkfifo(s / "supervise" / "ok")
    os.mkfifo(s / "supervise" / "control")
    same(home, "svok", ["s"], tmp_path)
    same(home, "svstat", ["s"], tmp_path)
    (s / "down").write_bytes(b"")
    same(home, "svstat", ["s", "s/"], tmp_path)
    assert same(home, "svc", ["-dux", "s"], tmp_path).stderr == b"svc: warning: unable to control s: supervise not running\n"


def test_svstat_reads_status_files_it_did_not_see_written(home: QHome, tmp_path: Path) -> None:
    # A reader on the ok FIFO stands in for supervise; the status file is ours to shape.
    s = tmp_path / "s"
    sup = s / "supervise"
    sup.mkdir(parents=True)
    os.mkfifo(sup / "ok")
    fd = os.open(sup / "ok", os.O_RDONLY | os.O_NONBLOCK)
    try:
        same(home, "svstat", ["s"], tmp_path)  # no status file
        from pyqmail.svc import status
        for data in (b"short", b"",
                     status.pack(0, 1234, True, "d"),                       # up since 1970, want down, paused
                     status.pack(4_000_000_000 * 10**9, 1234, False, "u"),  # stamp in the future
                     status.pack(10**18, 0, True, "u"),                    # down, paused byte ignored
                     status.pack(10**18, 0, False, ""),
                     b"\0" * 18, b"\xff" * 18, b"\xff" * 17 + b"d", b"\x40" + b"\0" * 17 + b"extra"):
            (sup / "status").write_bytes(data)
            for down in (False, True):
                if down:
                    (s / "down").write_bytes(b"")
                else:
                    (s / "down").unlink(missing_ok=True)
                same(home, "svstat", ["s"], tmp_path)
        (sup / "status").unlink()
        (sup / "status").mkdir()
        same(home, "svstat", ["s"], tmp_path)
    finally:
        os.close(fd)


def test_svstat_buffer_carries_over_between_services(home: QHome, tmp_path: Path) -> None:
    from pyqmail.svc import status
    readers = []
    contents: dict[str, bytes | None] = {
        "full": status.pack(10**18, 4321, True, "d"), "short": b"\x40\x00\x00\x01\x02",
        "dir": None, "zero": bytes(18)}
    try:
        for name, data in contents.items():
            sup = tmp_path / name / "supervise"
            sup.mkdir(parents=True)
            os.mkfifo(sup / "ok")
            readers.append(os.open(sup / "ok", os.O_RDONLY | os.O_NONBLOCK))
            if data is None:
                (sup / "status").mkdir()
            else:
                (sup / "status").write_bytes(data)
        same(home, "svstat", ["dir", "full", "dir", "short", "dir", "zero", "dir", "nothing", "dir"], tmp_path)
    finally:
        for fd in readers:
            os.close(fd)


# --- envdir ---

def make_envdir(d: Path) -> None:
    d.mkdir()
    (d / "V").write_bytes(b"v1  \t\nsecond")
    (d / "N").write_bytes(b"a\0b")
    (d / "HOME").write_bytes(b"")
    (d / "EMPTYLINE").write_bytes(b"\n")
    (d / "A=B").write_bytes(b"x")
    (d / "Q=R").write_bytes(b"")
    (d / ".hidden").write_bytes(b"no")
    (d / "SPACES").write_bytes(b"   ")
    (d / "LONG").write_bytes(b"y" * 70000 + b"\nz")
    (d / "BIN").write_bytes(bytes(range(1, 256)).replace(b"\n", b""))
    (d / "DANGLING").symlink_to("nowhere")
    (d / "PATH").write_bytes(b"/nonexistent")


def test_envdir_environment_matches_daemontools(home: QHome, tmp_path: Path) -> None:
    make_envdir(tmp_path / "e")
    res = same(home, "envdir", ["e", "env"], tmp_path)
    assert b"A=B=x\n" in res.stdout and b"\nHOME=" not in res.stdout
    # A dangling symlink reuses the previous file's value: whatever readdir order gives, both agree.
    same(home, "envdir", ["e", "/usr/bin/env"], tmp_path)


def test_envdir_search_uses_the_old_path(home: QHome, tmp_path: Path) -> None:
    e = tmp_path / "e"
    e.mkdir()
    (e / "PATH").write_bytes(b"/nonexistent")
    same(home, "envdir", ["e", "sh", "-c", "echo $PATH"], tmp_path)


def test_envdir_refusals_match_daemontools(home: QHome, tmp_path: Path) -> None:
    e = tmp_path / "e"
    e.mkdir()
    (e / "X").write_bytes(b"1")
    (e / "DIR").mkdir()
    same(home, "envdir", ["e", "env"], tmp_path)
    os.rmdir(e / "DIR")
    same(home, "envdir", ["e", "no-such-program"], tmp_path)
    same(home, "envdir", ["e/X", "env"], tmp_path)
    same(home, "envdir", ["", "env"], tmp_path)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to act as another user")
def test_envdir_unreadable_as_ordinary_user(home: QHome, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    e = tmp_path / "e"
    e.mkdir()
    (e / "X").write_bytes(b"1")
    (e / "X").chmod(0)
    same(home, "envdir", ["e", "env"], tmp_path, user=TEST_USER)
    (e / "X").chmod(0o644)
    e.chmod(0o311)
    same(home, "envdir", ["e", "env"], tmp_path, user=TEST_USER)
    e.chmod(0o600)
    same(home, "envdir", ["e", "env"], tmp_path, user=TEST_USER)


def test_child_sees_sigpipe_at_default(home: QHome, tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    script = "grep -E '^Sig(Ign|Blk)' /proc/self/status"
    res = same(home, "envdir", ["e", "sh", "-c", script], tmp_path)
    assert res.stdout
    same(home, "softlimit", ["sh", "-c", script], tmp_path)
    same(home, "envuidgid", ["root", "sh", "-c", script], tmp_path)


# --- the $PATH search ---

def test_path_search_matches_daemontools(home: QHome, tmp_path: Path) -> None:
    d1, d2, d3 = tmp_path / "d1", tmp_path / "d2", tmp_path / "d3"
    for d in (d1, d2, d3):
        d.mkdir()
    (d1 / "prog").write_text("#!/bin/sh\necho d1\n")
    (d1 / "prog").chmod(0o644)  # found but not executable: remembered, the search goes on
    (d2 / "prog").write_text("#!/bin/sh\necho d2\n")
    (d2 / "prog").chmod(0o755)
    (d1 / "isdir").mkdir()
    (d1 / "garbage").write_bytes(b"\x7fELF garbage")
    (d1 / "garbage").chmod(0o755)
    (d2 / "garbage").write_text("#!/bin/sh\necho never\n")
    (d2 / "garbage").chmod(0o755)
    (d3 / "locked").write_text("#!/bin/sh\necho never\n")
    (d3 / "locked").chmod(0o644)
    (tmp_path / "here").write_text("#!/bin/sh\necho here\n")
    (tmp_path / "here").chmod(0o755)
    path = f"{d1}:{d2}::{d3}"
    env = {"PATH": path}
    for prog in ("prog", "isdir", "garbage", "locked", "here", "missing", "d1/prog", "./here"):
        same(home, "softlimit", [prog], tmp_path, env=env)
        same(home, "envuidgid", ["root", prog], tmp_path, env=env)
    same(home, "softlimit", ["here"], tmp_path, env={})  # no PATH: /bin:/usr/bin


# --- envuidgid, setuidgid ---

def test_envuidgid_sets_gid_then_uid(home: QHome, tmp_path: Path) -> None:
    env = dict(BASE_ENV, UID="old", GID="old")
    res = same(home, "envuidgid", [TEST_USER if _has_test_user() else "root", "env"], tmp_path, env=env)
    pw = pwd.getpwnam(TEST_USER if _has_test_user() else "root")
    assert res.stdout.endswith(b"GID=%d\nUID=%d\n" % (pw.pw_gid, pw.pw_uid))


def _has_test_user() -> bool:
    try:
        pwd.getpwnam(TEST_USER)
        return True
    except KeyError:
        return False


@pytest.mark.skipif(not IS_ROOT, reason="setuidgid needs root")
def test_setuidgid_as_root_matches_daemontools(home: QHome, tmp_path: Path) -> None:
    if not _has_test_user():
        pytest.skip(f"no user {TEST_USER}")
    tmp_path.chmod(0o755)
    res = same(home, "setuidgid", [TEST_USER, "id"], tmp_path)
    pw = pwd.getpwnam(TEST_USER)
    assert res.stdout.startswith(b"uid=%d(" % pw.pw_uid)
    same(home, "setuidgid", [TEST_USER, "sh", "-c", "grep -E '^(Uid|Gid|Groups)' /proc/self/status"], tmp_path)
    same(home, "setuidgid", [TEST_USER, "/nonexistent"], tmp_path)
    same(home, "setuidgid", ["root", "id"], tmp_path)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to become an ordinary user first")
def test_setuidgid_as_ordinary_user_is_refused(home: QHome, tmp_path: Path) -> None:
    if not _has_test_user():
        pytest.skip(f"no user {TEST_USER}")
    tmp_path.chmod(0o755)
    res = same(home, "setuidgid", [TEST_USER, "id"], tmp_path, user=TEST_USER)
    assert res.returncode == 111


# --- softlimit ---

LIMITS = "ulimit -c; ulimit -d; ulimit -f; ulimit -l; ulimit -n; ulimit -s; ulimit -t; ulimit -v; ulimit -m; ulimit -u"


@pytest.mark.parametrize("opts", [
    ["-m", "300000000"], ["-a", "400000000", "-d", "200000000"], ["-o", "50", "-p", "300"],
    ["-c", "="], ["-c", "0", "-f", "1048576", "-l", "65536"], ["-r", "100000000", "-s", "1000000", "-t", "77"],
    ["-o", "99999999999999999999"], ["-c", "18446744073709551614"], ["-c", "18446744073709551616"],
    ["-o", "="], ["-t", "5", "-t", "7"], ["-m300000000"],
])
def test_softlimit_limits_match_daemontools(home: QHome, tmp_path: Path, opts: list[str]) -> None:
    same(home, "softlimit", [*opts, "sh", "-c", LIMITS], tmp_path)


@pytest.mark.parametrize("opts", [["-uuddx"], ["-t", "-k", "-t"], ["-xodpchaitk"], [], ["-u", "--", "-d"]])
def test_svc_writes_what_daemontools_writes(home: QHome, tmp_path: Path, opts: list[str]) -> None:
    sup = tmp_path / "s" / "supervise"
    sup.mkdir(parents=True)
    os.mkfifo(sup / "control")
    fd = os.open(sup / "control", os.O_RDONLY | os.O_NONBLOCK)
    written = []
    try:
        for prog in (home.bin("svc"), real("svc")):
            res = run([prog, *opts, "s", "missing", "s"], cwd=tmp_path)
            try:
                data = os.read(fd, 100)
            except BlockingIOError:
                data = b""
            written.append((res.returncode, res.stdout, res.stderr, data))
    finally:
        os.close(fd)
    assert written[0] == written[1]
