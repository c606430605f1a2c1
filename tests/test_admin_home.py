"""Admin commands find their home: --home, then $QMAILHOME, then the bin/qmail stub that runs, then the default."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from conftest import ROOT, VENV_BIN, QHome, expect, make_home, run
from pyqmail import home as _home
from pyqmail.admin import install
from remotekit import DnsServer

ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture
def two() -> Iterator[tuple[QHome, QHome]]:
    """Two homes at non-default paths, one.example and two.example."""
    a, b = make_home("one.example"), make_home("two.example")
    yield a, b
    for h in (a, b):
        shutil.rmtree(h.path.parent, ignore_errors=True)


def status_home(argv: list[str], env: dict[str, str]) -> str:
    """Return the home `qmail status` looked at (from its services line)."""
    res = run(argv, env=env)
    assert res.returncode in (0, 1), res.explain()
    (line,) = [x for x in res.stdout.decode().splitlines() if x.startswith("services: none (")]
    return line.removeprefix("services: none (").removesuffix("/service does not exist)")


def test_stub_names_its_home(two: tuple[QHome, QHome]) -> None:
    a, b = two
    assert status_home([a.bin("qmail"), "status"], ENV) == str(a.path)
    assert status_home([b.bin("qmail"), "status"], ENV) == str(b.path)
    with DnsServer({}) as dns:
        res = expect(run([a.bin("qmail"), "doctor"], env={**ENV, **dns.env}), 1)
        assert res.stdout.decode().splitlines()[0] == f"qmail doctor: checking {a.path}"
    # trace through the stub reads the stub's control files: one.example is local there
    via_stub = run([a.bin("qmail"), "trace", "postmaster@one.example"], env=ENV)
    explicit = run([VENV_BIN / "qmail", "trace", "--home", str(a.path), "postmaster@one.example"], env=ENV)
    assert (via_stub.returncode, via_stub.stdout) == (explicit.returncode, explicit.stdout)
    assert f"home {a.path}/alias".encode() in via_stub.stdout, via_stub.explain()
    other = run([b.bin("qmail"), "trace", "postmaster@one.example"], env=ENV)
    assert other.stdout != via_stub.stdout
    res = expect(run([a.bin("qmail"), "queue", "list"], env=ENV))
    assert res.stderr == b""


def test_qmailhome_beats_the_stub_and_home_beats_both(two: tuple[QHome, QHome]) -> None:
    a, b = two
    env_b = {**ENV, "QMAILHOME": str(b.path)}
    assert status_home([a.bin("qmail"), "status"], env_b) == str(b.path)
    assert status_home([a.bin("qmail"), "status", "--home", str(a.path)], env_b) == str(a.path)
    assert status_home([VENV_BIN / "qmail", "status"], env_b) == str(b.path)
    assert status_home([VENV_BIN / "qmail", "status", "--home", str(a.path)], env_b) == str(a.path)


def test_default_home_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QMAILHOME", raising=False)
    monkeypatch.setattr(_home, "_default", None)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert install.default_home() == "/var/qmail"
    # An ordinary user running from this checkout: ./run's home, ./qmail-home.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert install.default_home() == str(ROOT / "qmail-home")
    monkeypatch.setattr(install, "_checkout", lambda: None)
    assert install.default_home() == os.path.join(os.path.expanduser("~"), "qmail")
    monkeypatch.setattr(_home, "_default", "/var/qmail2")
    assert install.default_home() == "/var/qmail2"
    monkeypatch.setenv("QMAILHOME", "/elsewhere")
    assert install.default_home() == "/elsewhere"
