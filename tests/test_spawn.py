"""spawn(): the fork-and-call fast path and exec give the program the same process."""

from __future__ import annotations

import json
import os
import pwd
import sys
from pathlib import Path

import pytest

from conftest import IS_ROOT, ROOT, TEST_USER, QHome, world_dir
from pyqmail import spawn
from pyqmail.privs import Credentials


def _probe_stub(home: Path) -> Path:
    path = home / "bin" / "spawn-probe"
    python = os.path.realpath(sys.executable)
    paths = [str(ROOT / "src"), str(ROOT / "tests")]
    path.write_text(spawn.stub_text(python, paths, "spawn-probe", "spawnprobe", str(home)))
    path.chmod(0o755)
    return path


def _run_probe(stub: Path, fast: bool, **kw: object) -> tuple[int, dict[str, object], bytes]:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    os.write(in_w, b"the message\n")
    os.close(in_w)
    extra_r, extra_w = os.pipe()
    stray = os.open("/dev/null", os.O_RDONLY)  # open in the parent, must not reach the child
    os.set_inheritable(stray, True)
    try:
        pid = spawn.spawn(str(stub), ["spawn-probe", "arg one", "", "ä"],
                          fds={0: in_r, 1: out_w, 2: err_w, 6: extra_w}, fast=fast, **kw)  # type: ignore[arg-type]
    finally:
        for fd in (out_w, err_w, in_r, extra_w, stray):
            os.close(fd)
    out = b""
    while chunk := os.read(out_r, 65536):
        out += chunk
    err = os.read(err_r, 65536)
    rc = spawn.wait(pid)
    for fd in (out_r, err_r, extra_r):
        os.close(fd)
    return rc, json.loads(out), err


def _both(stub: Path, **kw: object) -> tuple[dict[str, object], dict[str, object]]:
    rc_fast, fast, err_fast = _run_probe(stub, True, **kw)
    rc_exec, slow, err_exec = _run_probe(stub, False, **kw)
    assert rc_fast == rc_exec == 42
    assert err_fast == err_exec == b"probe on stderr\n"
    return fast, slow


def test_fast_path_and_exec_are_identical(qhome: QHome, tmp_path: Path) -> None:
    stub = _probe_stub(qhome.path)
    env = {"PATH": "/usr/bin:/bin", "SENDER": "a@b", "EMPTY": "", "QMAILHOME": str(qhome.path)}
    fast, slow = _both(stub, env=env, cwd=str(tmp_path), umask=0o027)
    assert fast == slow
    # Like exec of a script: argv[0] is the path the program was started by.
    assert fast["argv"] == [str(stub), "arg one", "", "ä"]
    assert fast["env"] == env
    assert fast["cwd"] == str(tmp_path)
    assert fast["umask"] == 0o027
    assert sorted(fast["fds"], key=int) == ["0", "1", "2", "6"]  # type: ignore[arg-type]
    assert fast["stdin"] == "the message\n"


def test_defaults_inherit_environment(qhome: QHome) -> None:
    stub = _probe_stub(qhome.path)
    fast, slow = _both(stub)
    assert fast == slow
    assert fast["env"] == dict(os.environ)


@pytest.mark.skipif(not IS_ROOT, reason="needs root")
def test_credentials_both_ways() -> None:
    base = world_dir()
    from conftest import make_home
    home = make_home("probe.example.com")
    stub = _probe_stub(home.path)
    pw = pwd.getpwnam(TEST_USER)
    creds = Credentials(pw.pw_uid, pw.pw_gid, (pw.pw_gid,))
    fast, slow = _both(stub, env={"PATH": "/bin"}, cwd=str(base), creds=creds)
    assert fast == slow
    assert fast["ids"] == [pw.pw_uid, pw.pw_uid, pw.pw_gid, pw.pw_gid, [pw.pw_gid]]


def test_exec_of_other_programs(tmp_path: Path) -> None:
    r, w = os.pipe()
    pid = spawn.spawn("/bin/sh", ["sh", "-c", 'echo "$FOO $0"; exit 7'], env={"FOO": "bar"}, fds={1: w, 2: 2})
    os.close(w)
    assert os.read(r, 100) == b"bar sh\n"
    os.close(r)
    assert spawn.wait(pid) == 7


def test_path_search_and_start_failures(tmp_path: Path) -> None:
    assert spawn.run("true", ["true"], env={"PATH": "/usr/bin:/bin"}) == 0
    with pytest.raises(FileNotFoundError):
        spawn.spawn(str(tmp_path / "missing"), ["missing"])
    noexec = tmp_path / "noexec"
    noexec.write_text("#!/bin/sh\n")
    with pytest.raises(PermissionError):
        spawn.spawn(str(noexec), ["noexec"])
    with pytest.raises(FileNotFoundError):
        spawn.spawn("/bin/true", ["true"], cwd=str(tmp_path / "nodir"))


def test_signal_death_is_reported() -> None:
    assert spawn.run("/bin/sh", ["sh", "-c", "kill -TERM $$"]) == -15


def test_replaced_stub_is_execd(qhome: QHome) -> None:
    """An administrator's wrapper in place of a stub runs by exec, whatever the cache says."""
    stub = _probe_stub(qhome.path)
    rc, data, _ = _run_probe(stub, True)
    assert rc == 42
    wrapper = qhome.path / "bin" / "wrapper.tmp"
    wrapper.write_text("#!/bin/sh\necho '{\"wrapped\": true}'\nexit 3\n")
    wrapper.chmod(0o755)
    wrapper.rename(stub)
    rc, data, _ = _run_probe(stub, True)
    assert rc == 3 and data == {"wrapped": True}


def test_non_executable_stub_fails_like_exec(qhome: QHome) -> None:
    stub = _probe_stub(qhome.path)
    stub.chmod(0o644)
    for fast in (True, False):
        with pytest.raises(PermissionError):
            spawn.spawn(str(stub), ["spawn-probe"], fast=fast)
