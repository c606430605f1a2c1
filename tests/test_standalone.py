"""A standalone home (issue 11, deliverable 4): the code in QMAILHOME/lib, upgrade, the wheel, a moved checkout."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import pytest

from conftest import IS_ROOT, ROOT, TEST_USER, VENV_BIN, expect, need_root_setup, run, world_dir

FQDN = "test.example.com"


def _lib(home: Path) -> Path:
    (lib,) = (home / "lib").glob("pyqmail-*")
    return lib


def _stub_path(home: Path, name: str = "qmail-inject") -> str:
    """Return the sys.path entry the stub adds."""
    line = next(x for x in (home / "bin" / name).read_text().splitlines() if x.startswith("sys.path"))
    return str(eval(line.partition(" = ")[2])[0])  # noqa: S307 - our own stub's list literal


def _user_kw(user: str | None) -> dict[str, object]:
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _deliver_one(home: Path, user: str | None, owner: str | None) -> None:
    """Queue one message with the home's qmail-inject, run its qmail-start, see it in a Maildir.

    The message goes to box@FQDN, an alias whose .qmail-box names the Maildir
    alias/box/ (owned by owner, the alias user).
    """
    box = home / "alias" / "box"
    for sub in ("", "tmp", "new", "cur"):
        (box / sub).mkdir(mode=0o700)
        if owner is not None:
            shutil.chown(box / sub, owner)
    dot = home / "alias" / ".qmail-box"
    dot.write_text("./box/\n")
    dot.chmod(0o644)
    subject = f"standalone {uuid.uuid4()}"
    env = {"PATH": "/usr/bin:/bin"}
    expect(run([home / "bin" / "qmail-inject", f"box@{FQDN}"], input=f"Subject: {subject}\n\nhi\n".encode(),
               env=env, user=user))
    log = open(home.parent / f"send-{uuid.uuid4().hex}.log", "wb")
    start = subprocess.Popen([home / "bin" / "qmail-start", "./Maildir/"], stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True,
                             **_user_kw(user))  # type: ignore[call-overload]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                subject.encode() in p.read_bytes() for p in (box / "new").iterdir()):
            assert start.poll() is None, Path(log.name).read_text()
            time.sleep(0.05)
        assert any(subject.encode() in p.read_bytes() for p in (box / "new").iterdir()), Path(log.name).read_text()
    finally:
        if start.poll() is None:
            os.killpg(start.pid, signal.SIGTERM)
            try:
                start.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(start.pid, signal.SIGKILL)
                start.wait()
        log.close()


def _fresh_venv(where: Path, user: str | None = None, also: tuple[str, ...] = ()) -> Path:
    """Make a venv offline (ensurepip's bundled pip) with pyqmail's dependencies (and also) copied from ours.

    Return its python.
    """
    from importlib import metadata

    base_python = os.path.realpath(sys._base_executable)  # type: ignore[attr-defined]
    expect(run([base_python, "-m", "venv", where], user=user, timeout=300))
    py = where / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    user=user).stdout.decode().strip())
    from pyqmail.admin.install import _requirement_names

    todo, seen = [*_requirement_names(metadata.distribution("pyqmail").requires), *also], set()
    while todo:  # and their own requirements (PyNaCl needs cffi, which needs pycparser)
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        todo += _requirement_names(metadata.distribution(name).requires)
        for f in metadata.distribution(name).files or []:
            rel = f.as_posix()
            if rel.startswith("../") or "__pycache__" in rel:
                continue
            dst = site / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f.locate(), dst)  # type: ignore[arg-type]
    if user is not None:
        subprocess.run(["chown", "-R", user, site], check=True)
    return py


def _clone(base: Path) -> Path:
    checkout = base / "pyqmail"
    subprocess.run(["git", "clone", "--quiet", ROOT, checkout], check=True, capture_output=True, timeout=120)
    return checkout


# --- the lib dir -----------------------------------------------------------------

def test_root_lib_dir_modes_bytecode_and_users() -> None:
    """As root under umask 077: root-owned 0755/0644 lib dir, every module precompiled, usable by a local user."""
    need_root_setup()
    base = world_dir()
    home = base / "qmail"
    try:
        expect(run(["/bin/sh", "-c", 'umask 077; exec "$@"', "sh", VENV_BIN / "qmail", "init", "--home", home, FQDN]))
        lib = _lib(home)
        assert _stub_path(home) == str(lib)
        first = (home / "bin" / "qmail-inject").read_text().splitlines()[0]
        python = os.path.realpath(sys._base_executable)  # type: ignore[attr-defined]
        assert first == f"#!{python} -IS" and not python.startswith(sys.prefix + "/")
        before = set()
        for p in [lib, *lib.rglob("*")]:
            st = p.lstat()
            assert st.st_uid == 0, p
            assert stat.S_IMODE(st.st_mode) == (0o755 if p.is_dir() else 0o644), p
            before.add(p)
            if p.suffix == ".py":
                cached = p.parent / "__pycache__" / f"{p.stem}.{sys.implementation.cache_tag}.pyc"
                assert cached.is_file(), cached
        assert (lib / "dns" / "resolver.py").is_file()
        assert (lib / "pyqmail" / "spawn.py").is_file()
        eps = (next(lib.glob("pyqmail-*.dist-info")) / "entry_points.txt").read_text()
        assert "qmail-inject = pyqmail.inject.qmail_inject:main" in eps
        # A local user runs a stub from the lib with the cached bytecode; root runs one too: nothing is written.
        r = expect(run([home / "bin" / "qmail-inject", "-n", "x@example.org"], input=b"Subject: x\n\nhi\n",
                       user=TEST_USER, env={"PATH": "/usr/bin:/bin"}))
        assert b"Subject: x" in r.stdout
        expect(run(["/bin/sh", "-c", 'umask 077; exec "$@"', "sh", home / "bin" / "qmail-showctl"]))
        assert set([lib, *lib.rglob("*")]) == before
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_identical_lib_reused_and_linked_from_cache() -> None:
    """A second init of the same code reuses the home's lib dir; a new home links the venv's cached copy."""
    base = world_dir()
    try:
        a, b = base / "a", base / "b"
        expect(run([VENV_BIN / "qmail", "init", "--single-user", "--home", a, FQDN]))
        lib_a = _lib(a)
        expect(run([VENV_BIN / "qmail", "init", "--single-user", "--force", "--home", a, FQDN]))
        assert _lib(a) == lib_a and _stub_path(a) == str(lib_a)
        expect(run([VENV_BIN / "qmail", "init", "--single-user", "--home", b, FQDN]))
        lib_b = _lib(b)
        assert lib_b.name == lib_a.name
        cached = Path(sys.prefix) / "share" / "pyqmail" / "libs" / lib_a.name
        assert cached.is_dir()
        spawn_b = (lib_b / "pyqmail" / "spawn.py").stat()
        assert spawn_b.st_ino == (cached / "pyqmail" / "spawn.py").stat().st_ino and spawn_b.st_nlink >= 2
        # Removing one home leaves the other whole.
        shutil.rmtree(a)
        r = expect(run([b / "bin" / "qmail-inject", "-n", "x@example.org"], input=b"Subject: y\n\nhi\n"))
        assert b"Subject: y" in r.stdout
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_upgrade_keeps_config_and_prunes_unused_libs() -> None:
    """`qmail init --upgrade`: new lib dir and stubs; control, alias, queue kept; old unused lib dirs go."""
    base = world_dir()
    home = base / "qmail"
    try:
        expect(run([VENV_BIN / "qmail", "init", "--single-user", "--home", home, FQDN]))
        current = _lib(home)
        # Pretend the home runs an older version (previous) and kept an even older one.
        previous, oldest = home / "lib" / "pyqmail-0.0.2-bbbb", home / "lib" / "pyqmail-0.0.1-aaaa"
        for d in (previous, oldest):
            shutil.copytree(current, d)
        shutil.rmtree(current)
        for stub in (home / "bin").iterdir():
            stub.write_text(stub.read_text().replace(str(current), str(previous)))
        (home / "control" / "me").write_text("edited.example.com\n")
        (home / "alias" / ".qmail-root").write_text("&someone\n")
        expect(run([home / "bin" / "qmail-inject", f"nobody@{FQDN}"], input=b"Subject: queued\n\nhi\n"))
        queued = sorted(p.name for p in (home / "queue" / "todo").iterdir())
        assert queued
        page = home / "man" / "man8" / "qmail-smtpd.8"
        page.unlink()  # an older version's pages: the upgrade writes the new version's
        # A process started from the home's stubs before the previous lib dir became current keeps every lib dir.
        tai = subprocess.Popen([home / "bin" / "tai64n"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            future = time.time() + 3600
            os.utime(home / "bin" / "qmail", (future, future))
            r = expect(run([VENV_BIN / "qmail", "init", "--upgrade", "--home", home]))
            assert b"restart them when convenient" in r.stdout
            assert page.read_text().startswith(".TH")
            assert sorted(p.name for p in (home / "lib").iterdir()) == sorted([current.name, previous.name, oldest.name])
        finally:
            assert tai.stdin is not None
            tai.stdin.close()
            tai.wait(timeout=30)
        assert all(_stub_path(home, s.name) == str(current) for s in (home / "bin").iterdir())
        # Again, with the previous lib dir now the current one's predecessor and nothing old running.
        for stub in (home / "bin").iterdir():
            stub.write_text(stub.read_text().replace(str(current), str(previous)))
        r = expect(run([VENV_BIN / "qmail", "init", "--upgrade", "--home", home]))
        assert sorted(p.name for p in (home / "lib").iterdir()) == sorted([current.name, previous.name])
        assert _stub_path(home) == str(current)
        assert (home / "control" / "me").read_text() == "edited.example.com\n"
        assert (home / "alias" / ".qmail-root").read_text() == "&someone\n"
        assert sorted(p.name for p in (home / "queue" / "todo").iterdir()) == queued
        r = run([VENV_BIN / "qmail", "init", "--upgrade", "--home", base / "nothing"])
        assert r.returncode == 100 and b"not a pyqmail home" in r.stderr
        r = run([VENV_BIN / "qmail", "init", "--upgrade", "--home", home, "other.example.com"])
        assert r.returncode == 100 and b"give no FQDN" in r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the wheel and the moved checkout ---------------------------------------------

def test_wheel_in_fresh_venv_delivers() -> None:
    """pip wheel of the checkout, installed in a fresh venv: every console script; qmail init delivers."""
    base = world_dir()
    try:
        dist = base / "dist"
        expect(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", dist, ROOT], timeout=300))
        (wheel,) = dist.glob("pyqmail-*.whl")
        py = _fresh_venv(base / "venv")
        expect(run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], timeout=300))
        with open(ROOT / "pyproject.toml", "rb") as f:
            scripts = tomllib.load(f)["project"]["scripts"]
        missing = [n for n in scripts if not (base / "venv" / "bin" / n).is_file()]
        assert not missing
        # Single-user mode never delivers as root: as root, the home belongs to the test user.
        user = TEST_USER if IS_ROOT else None
        if user is not None:
            shutil.chown(base, user)
        home = base / "qmail"
        expect(run([base / "venv" / "bin" / "qmail", "init", "--single-user", "--home", home, FQDN], user=user,
                   env={"PATH": "/usr/bin:/bin"}))
        assert sorted(p.name for p in (home / "bin").iterdir()) == sorted(scripts)
        shutil.rmtree(base / "venv")
        _deliver_one(home, user, user)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _checkout_with_venv(base: Path, user: str | None) -> tuple[Path, Path]:
    """Clone the repository, make its venv with pyqmail installed editable (offline); return (checkout, venv qmail)."""
    checkout = _clone(base)
    if user is not None:
        subprocess.run(["chown", "-R", user, checkout], check=True)
    py = _fresh_venv(checkout / ".venv", user, also=("wheel", "packaging"))  # setuptools < 70 needs wheel for -e
    expect(run([py, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "-q", "-e", checkout],
               user=user, cwd=checkout, timeout=300,
               env={"PATH": "/usr/bin:/bin", "HOME": pwd.getpwnam(user).pw_dir if user else os.environ["HOME"]}))
    return checkout, checkout / ".venv" / "bin" / "qmail"


@pytest.mark.skipif(not IS_ROOT, reason="runs the checkout as the test user: needs root")
def test_moved_checkout_single_user() -> None:
    """A home made from a clone's venv, as pqtest: the clone renamed away, the home still queues and delivers."""
    base = world_dir()
    shutil.chown(base, TEST_USER)
    try:
        checkout, qmail = _checkout_with_venv(base, TEST_USER)
        home = base / "qmail"
        expect(run([qmail, "init", "--home", home, FQDN], user=TEST_USER, env={"PATH": "/usr/bin:/bin"}))
        assert str(checkout) not in (home / "bin" / "qmail-start").read_text()
        checkout.rename(base / "moved-away")
        _deliver_one(home, TEST_USER, TEST_USER)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_moved_checkout_root_mode() -> None:
    """A root-mode home made from a clone's venv: the clone renamed away, the home still queues and delivers."""
    need_root_setup()
    base = world_dir()
    try:
        checkout, qmail = _checkout_with_venv(base, None)
        home = base / "qmail"
        expect(run([qmail, "init", "--home", home, FQDN], env={"PATH": "/usr/bin:/bin"}))
        assert str(checkout) not in (home / "bin" / "qmail-start").read_text()
        checkout.rename(base / "moved-away")
        _deliver_one(home, None, "alias")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_source_edited_after_read_keeps_its_bytes_out_of_the_bytecode(tmp_path: Path) -> None:
    """A source edited between the read and the build: its new bytecode is not taken for the old bytes."""
    import py_compile

    from pyqmail.admin import install

    src = tmp_path / "mod.py"
    src.write_text("X = 1\n")
    py_compile.compile(str(src), doraise=True)
    f = install._read_file("mod.py", str(src))
    assert install._pyc_if_valid(f) is not None  # untouched: the tree's bytecode is used
    src.write_text("X = 22\n")  # edited after the read, then compiled again
    os.utime(src, ns=(f.mtime_ns + 1_000_000_000, f.mtime_ns + 1_000_000_000))
    py_compile.compile(str(src), doraise=True)
    assert install._pyc_if_valid(f) is None
    out = tmp_path / "lib"
    out.mkdir()
    install._build_lib(str(out), [f])
    assert (out / "mod.py").read_text() == "X = 1\n"
    assert (out / "mod.py").stat().st_mtime_ns == f.mtime_ns
    ns: dict[str, object] = {}
    exec(compile((out / "mod.py").read_bytes(), "mod.py", "exec"), ns)
    import importlib.util
    import marshal
    code = marshal.loads((Path(importlib.util.cache_from_source(str(out / "mod.py")))).read_bytes()[16:])
    exec(code, ns)
    assert ns["X"] == 1
