"""Session 5's review of the worker processes (brief r5): what a hostile user can do to a worker they own."""

from __future__ import annotations

import os
import pwd
import signal
import time
from pathlib import Path

import pytest

from conftest import TEST_USER, QHome
from test_lspawn_workers import FQDN, OTHER_USER, SHOW, Lspawn, _assign, _entry, _home_for, _seen, user_dir  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root mode: workers change uid")

PROBE = ('|w=$PPID; grep -E "^(Uid|Gid|Groups|CapPrm|CapEff|CapAmb)" /proc/$w/status;'
         ' if head -c1 /proc/$w/environ >/dev/null 2>&1; then echo environ=read; else echo environ=refused; fi;'
         ' if dd if=/proc/$w/mem bs=1 count=1 >/dev/null 2>&1; then echo mem=read; else echo mem=refused; fi;'
         ' if ls /proc/$w/fd/ >/dev/null 2>&1; then echo fd=listed; else echo fd=refused; fi')


def test_the_user_cannot_read_their_lspawn_worker_nor_regain_root(root_home: QHome, user_dir: Path) -> None:  # noqa: F811
    """The worker is forked from root qmail-lspawn (its memory holds other users' envelopes): a |program of
    its user sees it with every id the user's, no capability, and cannot read its memory, environment or
    descriptors (undumpable after the uid change)."""
    home = _home_for(user_dir, TEST_USER, "pq", {"": PROBE})
    _assign(root_home, [_entry("pq", TEST_USER, home)])
    pw = pwd.getpwnam(TEST_USER)
    ls = Lspawn(root_home, "./Maildir/")
    try:
        r = ls.deliver(f"pq@{FQDN}").decode()
        assert r.startswith("K"), r
        assert f"Uid:\t{pw.pw_uid}\t{pw.pw_uid}\t{pw.pw_uid}\t{pw.pw_uid}\n" in r
        assert f"Gid:\t{pw.pw_gid}\t{pw.pw_gid}\t{pw.pw_gid}\t{pw.pw_gid}\n" in r
        assert f"Groups:\t{pw.pw_gid} \n" in r
        for cap in ("CapPrm", "CapEff", "CapAmb"):
            assert f"{cap}:\t0000000000000000\n" in r
        assert "environ=refused\nmem=refused\nfd=refused\n" in r, r
    finally:
        ls.close()


def test_a_user_who_stops_their_worker_holds_up_only_their_own_delivery(root_home: QHome, user_dir: Path) -> None:  # noqa: F811
    a = _home_for(user_dir, TEST_USER, "a", {})
    b = _home_for(user_dir, OTHER_USER, "b", {})
    _assign(root_home, [_entry("a", TEST_USER, a), _entry("b", OTHER_USER, b)])
    ls = Lspawn(root_home, SHOW)
    try:
        wa, _, _ = _seen(ls.deliver(f"a@{FQDN}"))
        os.kill(wa, signal.SIGSTOP)  # its user may: the worker runs as them
        ls.send(f"a@{FQDN}", slot=0)
        t0 = time.monotonic()
        for i in range(3):
            _, uid, _ = _seen(ls.deliver(f"b@{FQDN}", slot=1))
            assert uid == pwd.getpwnam(OTHER_USER).pw_uid
        assert time.monotonic() - t0 < 30
        os.kill(wa, signal.SIGCONT)
        pid, _, _ = _seen(ls.report(0))
        assert pid == wa
    finally:
        ls.close()



def _gone(pid: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_a_retired_idle_worker_its_user_stopped_does_not_stay(root_home: QHome, user_dir: Path) -> None:  # noqa: F811
    """Retiring an idle worker closed its socket only: one its user had stopped stayed, outside the count,
    until SIGCONT. It is SIGKILLed now (idle: nothing of a delivery is lost; not yet reaped: its pid)."""
    a = _home_for(user_dir, TEST_USER, "a", {})
    b = _home_for(user_dir, OTHER_USER, "b", {})
    _assign(root_home, [_entry("a", TEST_USER, a), _entry("b", OTHER_USER, b)])
    ls = Lspawn(root_home, SHOW, env={"PYQMAIL_LSPAWN_WORKERS": "1"})
    wa = 0
    try:
        wa, _, _ = _seen(ls.deliver(f"a@{FQDN}"))
        os.kill(wa, signal.SIGSTOP)
        _, uid, _ = _seen(ls.deliver(f"b@{FQDN}"))  # the one worker allowed: a's, idle, is retired
        assert uid == pwd.getpwnam(OTHER_USER).pw_uid
        assert _gone(wa, time.monotonic() + 10), "the retired, stopped worker is still there"
    finally:
        if wa:
            try:
                os.kill(wa, signal.SIGCONT)
            except ProcessLookupError:
                pass
        ls.close()
