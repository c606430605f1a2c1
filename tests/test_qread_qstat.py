"""qmail-qread(8) and qmail-qstat(8) on queues built by hand and by qmail-queue."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, QHome, Result, expect, make_home, run, world_dir
from pyqmail.queue import qmail_qread

PATH = "/usr/bin:/bin"
T0 = 1700000000  # 14 Nov 2023 22:13:20 GMT
T0_TEXT = b"14 Nov 2023 22:13:20"
SPLIT = 23


# --- building a queue ---------------------------------------------------------------

def qpath(qhome: QHome, kind: str, num: int, split: int = SPLIT) -> Path:
    if kind in ("mess", "info", "local", "remote"):
        return qhome.queue / kind / str(num % split) / str(num)
    return qhome.queue / kind / str(num)


def put(qhome: QHome, num: int, sender: bytes = b"a@example.com", *, mess: bytes = b"x" * 10,
        info: bytes | None = None, local: bytes | None = None, remote: bytes | None = None,
        mtime: int = T0, bounce: bool = False, split: int = SPLIT) -> None:
    """Make message num as qmail-send leaves it after preprocessing (INTERNALS.md S5)."""
    qpath(qhome, "mess", num, split).write_bytes(mess)
    if local is not None:
        qpath(qhome, "local", num, split).write_bytes(local)
    if remote is not None:
        qpath(qhome, "remote", num, split).write_bytes(remote)
    if bounce:
        qpath(qhome, "bounce", num, split).write_bytes(b"")
    p = qpath(qhome, "info", num, split)
    p.write_bytes(b"F" + sender + b"\0" if info is None else info)
    os.utime(p, (mtime, mtime))


def recs(*records: bytes) -> bytes:
    return b"".join(r + b"\0" for r in records)


def qread(qhome: QHome, code: int = 0, env: dict[str, str] | None = None, user: str | None = None) -> Result:
    res = run([qhome.bin("qmail-qread")], env={"PATH": PATH, **(env or {})}, user=user)
    expect(res, code)
    assert res.stderr == b"", res.explain()
    return res


def qstat(qhome: QHome, env: dict[str, str] | None = None, cwd: Path | None = None,
          user: str | None = None) -> Result:
    return expect(run([qhome.bin("qmail-qstat")], env={"PATH": PATH, **(env or {})}, cwd=cwd, user=user))


def stat_lines(mess: int, todo: int) -> bytes:
    return (b"messages in queue: %d\nmessages in queue but not yet preprocessed: %d\n" % (mess, todo))


def head(num: int, size: int, sender: bytes, when: bytes = T0_TEXT, bouncing: bool = False) -> bytes:
    return when + b" GMT  #%d  %d  <" % (num, size) + sender + b"> " + (b" bouncing" if bouncing else b"") + b"\n"


def unprivileged(qhome: QHome) -> str | None:
    """Return the user to run as so that permissions bite: pqtest (owning the home) when root."""
    if not IS_ROOT:
        return None
    pw = pwd.getpwnam(TEST_USER)
    for root, dirs, files in os.walk(qhome.path.parent):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
    os.lchown(qhome.path.parent, pw.pw_uid, pw.pw_gid)
    return TEST_USER


def queue_message(qhome: QHome, sender: bytes, *rcpts: bytes, body: bytes = b"Subject: hi\n\nbody\n") -> int:
    """Queue a message with the real qmail-queue; return its number (it waits in todo/)."""
    before = set(os.listdir(qhome.queue / "todo"))
    env = b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in rcpts) + b"\0"
    r, w = os.pipe()
    os.write(w, env)
    os.close(w)
    try:
        p = subprocess.run([qhome.bin("qmail-queue")], input=body, stdout=r, stderr=subprocess.PIPE,
                           env={"PATH": PATH}, timeout=60)
    finally:
        os.close(r)
    assert p.returncode == 0, p.stderr
    (name,) = set(os.listdir(qhome.queue / "todo")) - before
    return int(name)


def preprocess(qhome: QHome, num: int, local_domain: bytes = b"test.example.com") -> None:
    """Do by hand what qmail-send does to todo/N: info, local and remote files, then todo and intd go."""
    data = (qhome.queue / "todo" / str(num)).read_bytes()
    fields = data.split(b"\0")
    sender = next(f[1:] for f in fields if f.startswith(b"F"))
    rcpts = [f[1:] for f in fields[3:] if f.startswith(b"T")]
    local = [r for r in rcpts if r.rpartition(b"@")[2] == local_domain]
    remote = [r for r in rcpts if r.rpartition(b"@")[2] != local_domain]
    if local:
        qpath(qhome, "local", num).write_bytes(recs(*(b"T" + r for r in local)))
    if remote:
        qpath(qhome, "remote", num).write_bytes(recs(*(b"T" + r for r in remote)))
    qpath(qhome, "info", num).write_bytes(b"F" + sender + b"\0")
    (qhome.queue / "intd" / str(num)).unlink()
    (qhome.queue / "todo" / str(num)).unlink()


# --- qmail-qread: the listing --------------------------------------------------------

def test_empty_queue(qhome: QHome) -> None:
    assert qread(qhome).stdout == b""
    assert qstat(qhome).stdout == stat_lines(0, 0)


def test_one_message_all_markers(qhome: QHome) -> None:
    put(qhome, 100, b"joe@example.com", mess=b"m" * 1234,
        local=recs(b"Tbob@test.example.com", b"Dcarol@test.example.com"),
        remote=recs(b"Dx@remote.example", b"Ty@remote.example"))
    assert qread(qhome).stdout == (
        head(100, 1234, b"joe@example.com")
        + b"\tlocal\tbob@test.example.com\n"
        + b"  done\tlocal\tcarol@test.example.com\n"
        + b"  done\tremote\tx@remote.example\n"
        + b"\tremote\ty@remote.example\n")


def test_bouncing_and_empty_sender(qhome: QHome) -> None:
    put(qhome, 5, b"", mess=b"", remote=recs(b"Tz@remote.example"), bounce=True, mtime=0)
    assert qread(qhome).stdout == (head(5, 0, b"", when=b"1 Jan 1970 00:00:00", bouncing=True)
                                   + b"\tremote\tz@remote.example\n")


@pytest.mark.parametrize("mtime,text", [
    (951782400, b"29 Feb 2000 00:00:00"), (4102444799, b"31 Dec 2099 23:59:59"),
    (1, b"1 Jan 1970 00:00:01"), (2147483648, b"19 Jan 2038 03:14:08"),
])
def test_date_is_info_mtime_in_gmt(qhome: QHome, mtime: int, text: bytes) -> None:
    put(qhome, 7, mtime=mtime)
    assert qread(qhome).stdout == head(7, 10, b"a@example.com", when=text)


def test_messages_still_in_todo_are_not_listed_but_counted(qhome: QHome) -> None:
    n1 = queue_message(qhome, b"a@example.com", b"u@test.example.com", b"v@elsewhere.example")
    n2 = queue_message(qhome, b"b@example.com", b"w@elsewhere.example")
    assert qread(qhome).stdout == b""
    assert qstat(qhome).stdout == stat_lines(2, 2)
    preprocess(qhome, n1)
    os.utime(qpath(qhome, "info", n1), (T0, T0))
    size = qpath(qhome, "mess", n1).stat().st_size
    assert qread(qhome).stdout == (head(n1, size, b"a@example.com")
                                   + b"\tlocal\tu@test.example.com\n\tremote\tv@elsewhere.example\n")
    assert qstat(qhome).stdout == stat_lines(2, 1)
    preprocess(qhome, n2)
    assert qstat(qhome).stdout == stat_lines(2, 0)
    out = qread(qhome).stdout
    assert out.count(b" GMT  #") == 2 and b"\tremote\tw@elsewhere.example\n" in out


def test_order_is_split_directory_then_directory_order(qhome: QHome) -> None:
    nums = [46, 1, 24, 47, 70, 22, 2]
    for n in nums:
        put(qhome, n, b"s%d@example.com" % n)
    expected = []
    for sub in range(SPLIT):
        for name in os.listdir(qhome.queue / "info" / str(sub)):
            expected.append(int(name))
    out = qread(qhome).stdout
    listed = [int(line.split(b"#")[1].split()[0]) for line in out.splitlines()]
    assert listed == expected
    assert sorted(listed) == sorted(nums)


def test_split_comes_from_the_installation() -> None:
    h = make_home("test.example.com", "--split", "3")
    try:
        put(h, 10, b"x@example.com", local=recs(b"Tl@test.example.com"), split=3)
        assert (h.queue / "info" / "1" / "10").exists()
        assert qread(h).stdout == head(10, 10, b"x@example.com") + b"\tlocal\tl@test.example.com\n"
        assert qstat(h).stdout == stat_lines(1, 0)
    finally:
        shutil.rmtree(h.path.parent, ignore_errors=True)


def test_unprintable_bytes_become_underscores(qhome: QHome) -> None:
    put(qhome, 3, b"we\x01ird\xff\t@example.com", local=recs(b"Tr\x7f\n@x", b"D\x80"))
    assert qread(qhome).stdout == (head(3, 10, b"we_ird__@example.com")
                                   + b"\tlocal\tr__@x\n  done\tlocal\t_\n")


def test_names_that_are_not_numbers_are_skipped_and_numbers_read_as_qmail_does(qhome: QHome) -> None:
    put(qhome, 23)
    for junk in ("abc", "12x", "-1", ".hidden", "+5"):
        (qhome.queue / "info" / "0" / junk).write_bytes(b"Fjunk\0")
    # "0046" is message 46: qmail looks for its files under 46's names.
    (qhome.queue / "info" / "3" / "0046").write_bytes(b"Fz\0")
    out = qread(qhome).stdout
    assert out.startswith(head(23, 10, b"a@example.com"))
    assert out[len(head(23, 10, b"a@example.com")):] == b"warning: trouble with #46: file does not exist\n"


# --- qmail-qread: damaged queues -------------------------------------------------------

def test_missing_mess_file(qhome: QHome) -> None:
    put(qhome, 30, local=recs(b"Tx@y"))
    qpath(qhome, "mess", 30).unlink()
    put(qhome, 31)
    out = qread(qhome).stdout
    assert out == b"warning: trouble with #30: file does not exist\n" + head(31, 10, b"a@example.com")


def test_unreadable_info_and_recipient_files(qhome: QHome) -> None:
    put(qhome, 40, local=recs(b"Tl@x"), remote=recs(b"Tr@x"))
    put(qhome, 41, local=recs(b"Tl@x"), remote=recs(b"Tr@x"))
    user = unprivileged(qhome)
    qpath(qhome, "info", 40).chmod(0)
    qpath(qhome, "local", 41).chmod(0)
    out = qread(qhome, user=user).stdout
    assert out == (b"warning: trouble with #40: access denied\n"
                   + head(41, 10, b"a@example.com")
                   + b"warning: trouble with #41: access denied\n"
                   + b"\tremote\tr@x\n")


def test_unreadable_split_directory_is_fatal(qhome: QHome) -> None:
    put(qhome, 1)
    user = unprivileged(qhome)
    (qhome.queue / "info" / "2").chmod(0)
    res = qread(qhome, 111, user=user)
    assert res.stdout == head(1, 10, b"a@example.com") + b"fatal: unable to opendir info/2: access denied\n"


def test_missing_split_directory_is_fatal(qhome: QHome) -> None:
    put(qhome, 3)
    put(qhome, 27)
    os.rmdir(qhome.queue / "info" / "5")
    res = qread(qhome, 111)
    assert res.stdout == (head(3, 10, b"a@example.com") + head(27, 10, b"a@example.com")
                          + b"fatal: unable to opendir info/5: file does not exist\n")


def test_no_queue_is_fatal(qhome: QHome) -> None:
    res = qread(qhome, 111, env={"QMAILHOME": str(qhome.path / "nonexistent")})
    assert res.stdout == b"fatal: unable to chdir: file does not exist\n"
    shutil.rmtree(qhome.queue)
    assert qread(qhome, 111).stdout == b"fatal: unable to chdir: file does not exist\n"


@pytest.mark.parametrize("which", ["info", "local", "remote"])
def test_unreadable_file_contents_are_fatal(qhome: QHome, which: str) -> None:
    put(qhome, 1)
    put(qhome, 50, local=recs(b"Tl@x"), remote=recs(b"Tr@x"))
    p = qpath(qhome, which, 50)
    p.unlink()
    p.mkdir()  # opens, then every read fails: qmail calls that out of memory
    res = qread(qhome, 111)
    first = head(1, 10, b"a@example.com")
    if which == "info":
        assert res.stdout == first + b"fatal: out of memory\n"
    elif which == "local":
        assert res.stdout == first + head(50, 10, b"a@example.com") + b"fatal: out of memory\n"
    else:
        assert res.stdout == first + head(50, 10, b"a@example.com") + b"\tlocal\tl@x\nfatal: out of memory\n"


def test_garbage_in_recipient_files(qhome: QHome) -> None:
    put(qhome, 60, local=recs(b"", b"Xnot a record", b"T", b"Tok@x", b"d@lowercase", b"Dlast@x") + b"Tno-nul-at-end",
        remote=b"\0\0\0garbage without any nul")
    assert qread(qhome).stdout == (head(60, 10, b"a@example.com")
                                   + b"\tlocal\t\n\tlocal\tok@x\n  done\tlocal\tlast@x\n")


def test_huge_recipient_file(qhome: QHome) -> None:
    many = [b"Tuser%d@example.com" % i for i in range(50000)]
    put(qhome, 61, remote=recs(*many))
    out = qread(qhome).stdout
    lines = out.split(b"\n")
    assert len(lines) == 50002 and lines[1] == b"\tremote\tuser0@example.com" and lines[-2].endswith(b"user49999@example.com")


def test_truncated_and_empty_info_files_show_what_qmail_shows(qhome: QHome) -> None:
    # info/0/23 is read first; its sender stays in qmail-qread's memory.
    put(qhome, 23, b"longsender@example.com")
    put(qhome, 24, info=b"Fab")  # truncated: no NUL
    put(qhome, 25, info=b"")  # empty
    put(qhome, 26, info=b"\0")  # a NUL where the F should be
    assert qread(qhome).stdout == (head(23, 10, b"longsender@example.com")
                                   + head(24, 10, b"abngsender@example.com")
                                   + head(25, 10, b"abngsender@example.com")
                                   + head(26, 10, b"abngsender@example.com"))


def test_empty_info_first_has_empty_sender(qhome: QHome) -> None:
    put(qhome, 1, info=b"")
    put(qhome, 2, info=b"Fonly-this")
    assert qread(qhome).stdout == head(1, 10, b"") + head(2, 10, b"only-this")


def test_info_bytes_after_the_sender_are_read_with_the_first_recipient_file(qhome: QHome) -> None:
    put(qhome, 1, info=b"Fs@x\0Tcarried@x\0Tpart", local=recs(b"Dreal@y"))
    put(qhome, 2, info=b"Fs@x\0Tto-remote@x\0", remote=recs(b"Tr@y"))
    put(qhome, 3, info=b"Fs@x\0Tdropped@x\0")
    assert qread(qhome).stdout == (head(1, 10, b"s@x") + b"\tlocal\tcarried@x\n\tlocal\tpartDreal@y\n"
                                   + head(2, 10, b"s@x") + b"\tremote\tto-remote@x\n\tremote\tr@y\n"
                                   + head(3, 10, b"s@x"))


def test_info_carry_is_limited_to_qmails_1024_byte_block(qhome: QHome) -> None:
    long_sender = b"x" * 1100
    put(qhome, 1, info=b"F" + long_sender + b"\0Tcarried@x\0", local=recs(b"Tl@y"))
    # The sender's block ends before the record: 1021 bytes of y's are carried, and
    # swallow the local file's first record.
    put(qhome, 2, info=b"Fs\0" + b"y" * 1030 + b"Tnot-carried\0", local=recs(b"Tswallowed@y", b"Tshown@y"))
    assert qread(qhome).stdout == (head(1, 10, long_sender) + b"\tlocal\tcarried@x\n\tlocal\tl@y\n"
                                   + head(2, 10, b"s") + b"\tlocal\tshown@y\n")


def test_closed_output_kills_qread_by_sigpipe(qhome: QHome) -> None:
    for n in range(200):
        put(qhome, n, remote=recs(b"Tr@example.com"))
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([qhome.bin("qmail-qread")], stdout=w, stderr=subprocess.PIPE, env={"PATH": PATH},
                           timeout=60)
    finally:
        os.close(w)
    assert p.returncode == -13 and p.stderr == b""


def test_pure_helpers() -> None:
    assert qmail_qread.queue_date(0) == b"1 Jan 1970 00:00:00"
    assert qmail_qread.queue_date(T0) == T0_TEXT
    assert qmail_qread.queue_date(-1) == b"31 Dec 1969 23:59:59"
    assert qmail_qread.queue_date(253402300800) == b"1 Jan 10000 00:00:00"
    assert qmail_qread.messnum(b"0042") == 42
    assert qmail_qread.messnum(b"18446744073709551617") == 1  # scan_ulong wraps
    assert qmail_qread.messnum(b"") is None and qmail_qread.messnum(b"4a") is None
    assert qmail_qread.printable(b"a\x00\x1f\x7f~ ") == b"a___~ "


# --- qmail-qstat ----------------------------------------------------------------------

def test_qstat_counts_files_as_find_does(qhome: QHome) -> None:
    put(qhome, 1)
    (qhome.queue / "mess" / "3" / "not-a-number").write_bytes(b"")
    (qhome.queue / "mess" / "4" / "deeper").mkdir()
    (qhome.queue / "mess" / "4" / "deeper" / "f").write_bytes(b"")
    (qhome.queue / "mess" / "5" / "two\nlines").write_bytes(b"")  # wc -l counts it twice
    os.symlink("/etc/passwd", qhome.queue / "mess" / "6" / "link")  # not a regular file to find
    (qhome.queue / "todo" / "77").write_bytes(b"")
    os.mkfifo(qhome.queue / "todo" / "fifo")
    assert qstat(qhome).stdout == stat_lines(5, 1)


def test_qstat_missing_directories(qhome: QHome) -> None:
    shutil.rmtree(qhome.queue / "todo")
    res = qstat(qhome)
    assert res.stdout == stat_lines(0, 0)
    assert res.stderr == b"find: 'queue/todo': No such file or directory\n"


def test_qstat_unreadable_subdirectory(qhome: QHome) -> None:
    put(qhome, 1)
    put(qhome, 4)
    user = unprivileged(qhome)
    (qhome.queue / "mess" / "4").chmod(0)
    res = qstat(qhome, user=user)
    assert res.stdout == stat_lines(1, 0)
    assert res.stderr == b"find: 'queue/mess/4': Permission denied\n"


def test_qstat_without_a_home_counts_where_it_stands(qhome: QHome) -> None:
    here = world_dir()
    try:
        (here / "queue" / "mess").mkdir(parents=True)
        (here / "queue" / "mess" / "m").write_bytes(b"")
        bad = str(qhome.path / "nonexistent")
        res = qstat(qhome, env={"QMAILHOME": bad}, cwd=here)
        assert res.stdout == stat_lines(1, 0)
        assert res.stderr == os.fsencode(f"{qhome.bin('qmail-qstat')}: 3: cd: can't cd to {bad}\n"
                                         "find: 'queue/todo': No such file or directory\n")
    finally:
        shutil.rmtree(here, ignore_errors=True)


def test_qstat_queue_dir_is_a_file(qhome: QHome) -> None:
    shutil.rmtree(qhome.queue / "todo")
    (qhome.queue / "todo").write_bytes(b"")
    assert qstat(qhome).stdout == stat_lines(0, 1)
