"""The big-todo layout: intd/ and todo/ split as mess/ (qmail init's default), and flat queues converted.

qmail init makes intd/D and todo/D; qmail-queue writes intd/D/N and
todo/D/N; qmail-clean, qmail-send, qmail-qstat and `qmail queue` find a
message in either place, so that a flat queue converted by `qmail init
--upgrade --big-todo` delivers the messages that were waiting in it.
"""

from __future__ import annotations

import os

import pytest

from conftest import VENV_BIN, expect, run, world_dir
from queuefmt import files, messages, parse_todo
from sendkit import Running, Site, make_site, maildir_messages, qqueue, remove_site

FQDN = "test.example.com"


@pytest.fixture
def flat_site() -> Site:
    s = make_site(FQDN)  # --flat-todo
    yield s
    remove_site(s)


@pytest.fixture
def big_site() -> Site:
    s = make_site(FQDN, todo="--big-todo")
    yield s
    remove_site(s)


def test_qmail_init_makes_a_bigtodo_queue_by_default() -> None:
    base = world_dir()
    home = base / "qmail"
    try:
        expect(run([VENV_BIN / "qmail", "init", "--single-user", "--split", "5", "--home", home, FQDN]))
        for d in ("intd", "todo"):
            assert sorted(os.listdir(home / "queue" / d)) == ["0", "1", "2", "3", "4"]
            assert all((home / "queue" / d / str(i)).is_dir() for i in range(5))
        assert oct((home / "queue" / "todo" / "3").stat().st_mode & 0o777) == oct(0o750)
        assert oct((home / "queue" / "intd" / "3").stat().st_mode & 0o777) == oct(0o700)
        # --flat-todo: qmail 1.03's layout.
        expect(run([VENV_BIN / "qmail", "init", "--single-user", "--flat-todo", "--home", base / "flat", FQDN]))
        assert os.listdir(base / "flat" / "queue" / "todo") == [] and os.listdir(base / "flat" / "queue" / "intd") == []
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


def test_qmail_queue_and_qmail_clean_use_the_subdirectories(big_site: Site) -> None:
    q = big_site.home.queue
    assert qqueue(big_site.home, b"a@b.example", [b"c@d.example"], b"Subject: x\n\nx\n", user=big_site.user) == 0
    fs = files(q)
    (todo,) = fs["todo"]
    d, _, n = todo.partition("/")
    num = int(n)
    assert int(d) == num % 23 and fs["intd"] == [todo] and fs["mess"] == [todo]
    assert (q / "todo" / todo).stat().st_ino == (q / "intd" / todo).stat().st_ino
    assert parse_todo((q / "todo" / todo).read_bytes()).recipients == [b"c@d.example"]
    assert messages(q) == {num: "S4"}
    out = expect(run([big_site.home.bin("qmail-qstat")], user=big_site.user)).stdout
    assert out == b"messages in queue: 1\nmessages in queue but not yet preprocessed: 1\n"
    res = expect(run([big_site.home.bin("qmail-clean")], input=f"todo/{num}\0".encode(), user=big_site.user))
    assert res.stdout == b"+"
    fs = files(q)
    assert fs["todo"] == [] and fs["intd"] == [] and fs["mess"] == [todo]


def _deliver_all(site: Site, count: int) -> list[bytes]:
    d = Running(site)
    try:
        d.wait_for(lambda ls: sum(x.startswith(b"end msg ") for x in ls) >= count)
    finally:
        assert d.stop() == 0
    return d.lines()


def test_a_flat_queue_converted_delivers_old_and_new_messages(flat_site: Site) -> None:
    site = flat_site
    joe = site.mkdir("joe")
    site.maildir("joe/Maildir")
    site.assign([site.user_line("joe", joe)])
    q = site.home.queue
    assert qqueue(site.home, b"a@b.example", [b"joe@" + FQDN.encode()], b"Subject: old\n\nx\n", user=site.user) == 0
    (old,) = files(q)["todo"]
    assert "/" not in old  # flat
    expect(run([VENV_BIN / "qmail", "init", "--upgrade", "--big-todo", "--home", site.home.path], user=site.user))
    assert (q / "todo" / "0").is_dir() and (q / "intd" / "22").is_dir()
    assert (q / "todo" / old).is_file()  # the waiting message stays where it was
    assert qqueue(site.home, b"a@b.example", [b"joe@" + FQDN.encode()], b"Subject: new\n\nx\n", user=site.user) == 0
    new = [n for n in files(q)["todo"] if n != old]
    assert len(new) == 1 and new[0] == f"{int(new[0].split('/')[1]) % 23}/{new[0].split('/')[1]}"
    out = expect(run([site.home.bin("qmail-qstat")], user=site.user)).stdout
    assert out.endswith(b"messages in queue but not yet preprocessed: 2\n")
    listing = expect(run([VENV_BIN / "qmail", "queue", "list", "--home", site.home.path], user=site.user)).stdout
    assert listing.count(b"a@b.example") == 2, listing
    lines = _deliver_all(site, 2)
    subjects = sorted(m.split(b"Subject: ")[1].split(b"\n")[0] for m in maildir_messages(joe / "Maildir"))
    assert subjects == [b"new", b"old"], lines
    fs = files(q)
    assert all(not fs[d] for d in ("todo", "intd", "info", "local", "remote", "mess")), fs
    # An upgrade without --big-todo keeps the layout; a big-todo queue is not made flat again.
    res = run([VENV_BIN / "qmail", "init", "--upgrade", "--flat-todo", "--home", site.home.path], user=site.user)
    assert res.returncode == 100 and b"big-todo already" in res.stderr


def test_qmail_send_delivers_from_a_bigtodo_queue(big_site: Site) -> None:
    site = big_site
    joe = site.mkdir("joe")
    site.maildir("joe/Maildir")
    site.assign([site.user_line("joe", joe)])
    for i in range(5):
        assert qqueue(site.home, b"a@b.example", [b"joe@" + FQDN.encode()], b"Subject: m%d\n\nx\n" % i,
                      user=site.user) == 0
    assert len(files(site.home.queue)["todo"]) == 5
    _deliver_all(site, 5)
    assert len(maildir_messages(joe / "Maildir")) == 5
    fs = files(site.home.queue)
    assert all(not fs[d] for d in ("todo", "intd", "info", "local", "remote", "mess")), fs
