"""bench/compare.py keeps working: a --quick run against pyqmail in root mode (and the private
Postfix instance under CI=true, where Debian's postfix must be installed), and its strace
counting on a known trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CI, IS_ROOT

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.append(str(BENCH))  # appended: bench/queue.py must not hide the stdlib's

import compare  # noqa: E402
import mta  # noqa: E402

FIGURES = ["smtp_rate", "cpu_ms", "p50", "p90", "inject_sendmail", "local_drain", "remote_drain", "pss",
           "fsync", "procs", "fsync_ms"]


def _bench_cgroups() -> set[str]:
    """The bench's cgroups that exist now (bench/mta.py names them pyqmail-bench-SYSTEM-PID)."""
    return {os.path.join(root, d) for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/cpuacct", "/sys/fs/cgroup")
            if os.path.isdir(root) for d in os.listdir(root) if d.startswith("pyqmail-bench-")}


def test_strace_counting(tmp_path: Path) -> None:
    trace = tmp_path / "t"
    trace.write_text(
        "100 fsync(3) = 0 <0.002000>\n"
        "100 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, "
        "child_tidptr=0x7f) = 101\n"
        "101 fdatasync(4 <unfinished ...>\n"
        "102 clone3({flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM, "
        "exit_signal=0}, 88) = 103\n"
        "101 <... fdatasync resumed>) = 0 <0.004000>\n"
        "104 clone3({flags=CLONE_VM|CLONE_VFORK, exit_signal=SIGCHLD, stack=0x7f}, 88) = 105\n"
        "105 +++ exited with 0 +++\n")
    # two syncs; two processes (fork-like clone, vfork-like clone3), the thread not counted
    syncs, procs, spent = compare.count_calls(str(trace))
    assert (syncs, procs) == (2, 2)
    assert abs(spent - 0.006) < 1e-9  # the resumed call's time counted once


def test_table_medians_and_ranges() -> None:
    results = {"a": {"smtp_rate": [10.0, 30.0, 20.0], "pss": [100.0]}, "b": {"smtp_rate": [5.0]}}
    text = compare.table(results, compare.QUICK)
    assert "| SMTP end to end into Maildir, msgs/s | 20 (10-30) | 5 |" in text
    assert "| PSS per idle SMTP connection, KiB | 100 | - |" in text
    assert "fsync" not in text  # rows nobody measured are left out


@pytest.mark.skipif(not IS_ROOT, reason="the bench installs root-mode systems (CI runs as root)")
def test_compare_quick(tmp_path: Path) -> None:
    systems = ["pyqmail"]
    if CI:
        if not mta.postfix_available():
            pytest.fail("postfix missing: .ci/run installs Debian's postfix")
        systems.append("postfix")
    for tool in ("smtp-sink", "strace"):
        if not any(os.path.exists(os.path.join(d, tool)) for d in ("/usr/sbin", "/usr/bin")):
            if CI:
                pytest.fail(f"{tool} missing: .ci/run installs it")
            pytest.skip(f"{tool} not installed")
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(BENCH / "compare.py"), "--quick", "--systems", ",".join(systems), "--json", str(out)]
    before = _bench_cgroups()  # another run's (a bench running beside the tests) are not this one's
    p = subprocess.run(cmd, capture_output=True, timeout=900)
    stdout, stderr = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    if p.returncode != 0:
        pytest.fail(f"{cmd} exited {p.returncode}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    assert "| figure | " + " | ".join(systems) + " |" in stdout, stdout
    got = json.loads(out.read_text())
    for name in systems:
        for key in FIGURES:
            values = got["results"][name].get(key)
            assert values and all(v > 0 for v in values), (name, key, got["results"][name])
        # Postfix: a server process per idle connection; pyqmail: tcpserver's workers each hold
        # several (the spread of 2 first, docs/DESIGN.md "Several connections per tcpserver worker")
        procs = got["results"][name]["idle_procs"]
        assert procs == [1.0] if name == "postfix" else 0 < procs[0] < 1.0, got["results"][name]
    assert got["results"]["pyqmail"]["inject_qmail-inject"][0] > 0
    assert got["cpu"]["pyqmail"].startswith(("cgroup", "process tree"))
    # nothing of the bench's systems left running: no cgroup of this run left behind
    leftovers = _bench_cgroups() - before
    assert not leftovers, leftovers
