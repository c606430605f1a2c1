"""qmail-users(5), qmail-newu(8), qmail-getpw(8): assign files, users/cdb lookups, passwd rules."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from conftest import VENV_BIN, QHome, expect, run
from pyqmail import cdb
from pyqmail.local import users
from pyqmail.local.users import Assignment, PwEntry

MAN_EXAMPLE = (b"+:alias:7790:2108:/var/qmail/alias:-::\n"
               b"+joe-:joe:507:100:/home/joe:-::\n"
               b"=joe:joe:507:100:/home/joe:::\n"
               b".\n")


def newu(home: QHome, assign: bytes) -> tuple[int, bytes]:
    (home.path / "users" / "assign").write_bytes(assign)
    res = run([home.bin("qmail-newu")], env={"PATH": "/usr/bin:/bin"})
    assert res.stdout == b""
    return res.returncode, res.stderr


def cdb_of(home: QHome) -> Path:
    return home.path / "users" / "cdb"


# --- the records, exactly as C qmail-newu writes them -----------------------------

def test_records_match_qmail_newu_layout() -> None:
    recs = users.parse_assign(MAN_EXAMPLE)
    assert recs == [
        (b"!", b"alias\x007790\x002108\x00/var/qmail/alias\x00-\x00"),
        (b"!joe-", b"joe\x00507\x00100\x00/home/joe\x00-\x00"),
        (b"!joe\0", b"joe\x00507\x00100\x00/home/joe\x00\x00"),
        (b"", b"-"),  # last characters of the nonempty wildcards
    ]


def test_keys_lowercased_wildchars_deduplicated() -> None:
    recs = users.parse_assign(b"=Joe.Shmoe:joe:1:2:/h:::\n+AB-:a:1:2:/h:-::\n+cd-:c:1:2:/h:-::\n+x:x:1:2:/h:-::\n.\n")
    assert recs[0][0] == b"!joe.shmoe\0"
    assert recs[1][0] == b"!ab-"
    assert recs[-1] == (b"", b"-x")


def test_extra_fields_after_the_sixth_colon_are_dropped() -> None:
    recs = users.parse_assign(b"=a:u:1:2:/h:-:e:junk:more\n.\n")
    assert recs[0] == (b"!a\0", b"u\x001\x002\x00/h\x00-\x00e")


def test_any_first_character_but_plus_is_a_simple_assignment() -> None:
    recs = users.parse_assign(b"xjoe:u:1:2:/h:::\n.\n")
    assert recs[0][0] == b"!joe\0"


def test_dot_line_ends_the_file_and_rest_is_ignored() -> None:
    recs = users.parse_assign(b"=a:u:1:2:/h:::\n.anything\ngarbage\n")
    assert len(recs) == 2


@pytest.mark.parametrize("text", [
    b"",  # no dot line
    b"=a:u:1:2:/h:::\n",  # no dot line
    b"=a:u:1:2:/h:::",  # unterminated line
    b"=a:u:1:2:/h::\n.\n",  # five colons
    b"=a\n.\n",  # no colon
    b":u:1:2:/h:::\n.\n",  # colon first
    b"\n.\n",  # empty line
    b"=a:u:1:2:/h\0:::\n.\n",  # NUL
])
def test_bad_format(text: bytes) -> None:
    with pytest.raises(users.AssignError):
        users.parse_assign(text)


# --- lookups ---------------------------------------------------------------------

def _reader(tmp_path: Path, assign: bytes) -> cdb.Reader:
    path = tmp_path / "cdb"
    cdb.write_atomic(str(path), users.parse_assign(assign))
    return cdb.Reader.open(str(path))


def test_man_page_example(tmp_path: Path) -> None:
    with _reader(tmp_path, MAN_EXAMPLE) as r:
        assert users.lookup_cdb(r, b"joe") == Assignment(b"joe", b"507", b"100", b"/home/joe", b"", b"")
        assert users.lookup_cdb(r, b"joe-direct") == Assignment(b"joe", b"507", b"100", b"/home/joe", b"-", b"direct")
        assert users.lookup_cdb(r, b"bill") == Assignment(b"alias", b"7790", b"2108", b"/var/qmail/alias", b"-", b"bill")
        assert users.lookup_cdb(r, b"joe-") == Assignment(b"joe", b"507", b"100", b"/home/joe", b"-", b"")


def test_case_insensitive_but_ext_keeps_case(tmp_path: Path) -> None:
    with _reader(tmp_path, MAN_EXAMPLE) as r:
        assert users.lookup_cdb(r, b"JOE").user == b"joe"
        assert users.lookup_cdb(r, b"Joe-Direct").ext == b"Direct"
        assert users.lookup_cdb(r, b"BiLL").ext == b"BiLL"


def test_longest_wildcard_wins_and_simple_beats_wildcard(tmp_path: Path) -> None:
    assign = (b"+j:short:1:1:/s:-:s-:\n"
              b"+joe-:mid:2:2:/m:-:m-:\n"
              b"+joe-list-:long:3:3:/l:-:l-:\n"
              b"=joe-list-x:exact:4:4:/e:::\n"
              b".\n")
    with _reader(tmp_path, assign) as r:
        assert users.lookup_cdb(r, b"joe-list-x").user == b"exact"
        a = users.lookup_cdb(r, b"joe-list-y")
        assert (a.user, a.ext) == (b"long", b"l-y")
        a = users.lookup_cdb(r, b"joe-other")
        assert (a.user, a.ext) == (b"mid", b"m-other")
        a = users.lookup_cdb(r, b"jane")
        assert (a.user, a.ext) == (b"short", b"s-ane")
        assert users.lookup_cdb(r, b"bob") is None


def test_first_of_duplicate_assignments_wins(tmp_path: Path) -> None:
    with _reader(tmp_path, b"=a:first:1:1:/f:::\n=A:second:2:2:/s:::\n.\n") as r:
        assert users.lookup_cdb(r, b"a").user == b"first"


def test_wildcard_matches_its_own_prefix(tmp_path: Path) -> None:
    with _reader(tmp_path, b"+joe-:joe:1:1:/h:-:x:\n.\n") as r:
        assert users.lookup_cdb(r, b"joe-") == Assignment(b"joe", b"1", b"1", b"/h", b"-", b"x")
        assert users.lookup_cdb(r, b"joe") is None


def test_cdb_without_wildcard_list_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "cdb"
    cdb.write_atomic(str(path), [(b"!a\0", b"u\x001\x002\x00/h\x00\x00")])
    with pytest.raises(users.UsersCdbError) as e:
        users.lookup(b"a", str(path))
    assert e.value.code == users.QLX_CDB


def test_short_record_is_qlx_usage(tmp_path: Path) -> None:
    path = tmp_path / "cdb"
    cdb.write_atomic(str(path), [(b"", b""), (b"!a\0", b"u\x001")])
    with pytest.raises(users.UsersCdbError) as e:
        users.lookup(b"a", str(path))
    assert e.value.code == users.QLX_USAGE


def test_missing_cdb_is_not_found_and_garbage_is_an_error(tmp_path: Path) -> None:
    assert users.lookup(b"a", str(tmp_path / "none")) is None
    (tmp_path / "bad").write_bytes(b"short")
    with pytest.raises(users.UsersCdbError):
        users.lookup(b"a", str(tmp_path / "bad"))
    (tmp_path / "bad2").write_bytes(b"\xff" * 4096)
    with pytest.raises(users.UsersCdbError):
        users.lookup(b"a", str(tmp_path / "bad2"))


# --- qmail-newu as a process -----------------------------------------------------------

def test_newu_writes_cdb_read_back(qhome: QHome) -> None:
    code, err = newu(qhome, MAN_EXAMPLE)
    assert (code, err) == (0, b"")
    assert not (qhome.path / "users" / "cdb.tmp").exists()
    assert oct(cdb_of(qhome).stat().st_mode & 0o777) == oct(0o644)
    assert users.lookup(b"joe-direct", str(cdb_of(qhome))).ext == b"direct"
    with cdb.Reader.open(str(cdb_of(qhome))) as r:
        assert list(r.items()) == users.parse_assign(MAN_EXAMPLE)


@pytest.mark.parametrize("text", [b"=a:u:1:2:/h:::\n", b"=a:u:1:2:/h::\n.\n", b"=a:u:\0:2:/h:::\n.\n", b"x\n.\n"])
def test_newu_refuses_bad_format_and_keeps_old_cdb(qhome: QHome, text: bytes) -> None:
    assert newu(qhome, MAN_EXAMPLE) == (0, b"")
    before = cdb_of(qhome).read_bytes()
    assert newu(qhome, text) == (111, b"qmail-newu: fatal: bad format in users/assign\n")
    assert cdb_of(qhome).read_bytes() == before


def test_newu_without_assign(qhome: QHome) -> None:
    (qhome.path / "users" / "assign").unlink(missing_ok=True)
    res = run([qhome.bin("qmail-newu")])
    expect(res, 111)
    assert res.stderr == b"qmail-newu: fatal: unable to open users/assign\n"


def test_newu_bad_home() -> None:
    res = run([VENV_BIN / "qmail-newu"],
              env={"QMAILHOME": "/nonexistent/qmail", "PATH": "/usr/bin:/bin"})
    expect(res, 111)
    assert res.stderr == b"qmail-newu: fatal: unable to chdir\n"


def test_newu_huge_assign(qhome: QHome) -> None:
    lines = b"".join(b"=user%d:u%d:%d:%d:/home/u%d:::\n" % (i, i, 1000 + i, 100, i) for i in range(50000))
    assert newu(qhome, lines + b"+u-:w:1:1:/w:-::\n.\n") == (0, b"")
    assert users.lookup(b"USER49999", str(cdb_of(qhome))).homedir == b"/home/u49999"
    assert users.lookup(b"u-x", str(cdb_of(qhome))).user == b"w"


def test_newu_does_not_check_numbers(qhome: QHome) -> None:
    # qmail-newu copies the fields; qmail-lspawn interprets them.
    assert newu(qhome, b"=a:u:abc:-1:rel/dir:x:y:\n.\n") == (0, b"")
    assert users.lookup(b"a", str(cdb_of(qhome))) == Assignment(b"u", b"abc", b"-1", b"rel/dir", b"x", b"y")


# --- qmail-getpw -------------------------------------------------------------------------

def _pw(table: dict[bytes, PwEntry]):  # type: ignore[no-untyped-def]
    return lambda name: table.get(name)


PWS = {
    b"joe": PwEntry(b"joe", 507, 100, b"/home/joe"),
    b"joe-list": PwEntry(b"joe-list", 508, 100, b"/home/joelist"),
    b"root": PwEntry(b"root", 0, 0, b"/root"),
    b"nohome": PwEntry(b"nohome", 509, 100, b"/nonexistent"),
    b"notmine": PwEntry(b"notmine", 510, 100, b"/home/other"),
}
OWNERS = {b"/home/joe": 507, b"/home/joelist": 508, b"/root": 0, b"/home/other": 1}
ALIAS = PwEntry(b"alias", 7790, 2108, b"/var/qmail/alias")


def getpw(local: bytes) -> Assignment:
    return users.getpw(local, _pw(PWS), OWNERS.get, lambda: ALIAS)


def test_getpw_user_and_extension() -> None:
    assert getpw(b"joe") == Assignment(b"joe", b"507", b"100", b"/home/joe", b"", b"")
    assert getpw(b"joe-x-y") == Assignment(b"joe", b"507", b"100", b"/home/joe", b"-", b"x-y")
    assert getpw(b"JoE-Ext") == Assignment(b"joe", b"507", b"100", b"/home/joe", b"-", b"Ext")


def test_getpw_longest_account_name_first() -> None:
    assert getpw(b"joe-list-x").user == b"joe-list"
    assert getpw(b"joe-list-x").ext == b"x"


def test_getpw_rules_fall_to_alias() -> None:
    for local in (b"root", b"nohome", b"notmine", b"nobody-x", b"", b"-joe", b"joex"):
        assert getpw(local) == Assignment(b"alias", b"7790", b"2108", b"/var/qmail/alias", b"-", local)


def test_getpw_names_of_32_or_more_are_not_users() -> None:
    long = b"a" * 32
    table = {long: PwEntry(long, 600, 1, b"/home/joe"), long[:31]: PwEntry(long[:31], 601, 1, b"/home/x")}
    owners = {b"/home/joe": 600, b"/home/x": 601}
    a = users.getpw(long + b"-e", _pw(table), owners.get, lambda: ALIAS)
    assert a.user == b"alias"
    a = users.getpw(long[:31] + b"-e", _pw(table), owners.get, lambda: ALIAS)
    assert (a.user, a.ext) == (long[:31], b"e")


def test_getpw_without_alias() -> None:
    with pytest.raises(users.GetpwError) as e:
        users.getpw(b"nobody", _pw({}), OWNERS.get, lambda: None)
    assert e.value.code == users.QLX_NOALIAS


def test_getpw_temporary_stat_error_is_qlx_nfs() -> None:
    def owner(path: bytes) -> int | None:
        raise users.GetpwError(users.QLX_NFS, "stale")
    with pytest.raises(users.GetpwError) as e:
        users.getpw(b"joe", _pw(PWS), owner, lambda: ALIAS)
    assert e.value.code == users.QLX_NFS


def test_qmail_getpw_program_alias_in_single_user_home(qhome: QHome) -> None:
    res = expect(run([qhome.bin("qmail-getpw"), "No-Such-User-Xyz"], env={"PATH": "/usr/bin:/bin"}))
    me = pwd.getpwuid(os.getuid())
    assert res.stdout == b"\0".join([me.pw_name.encode(), str(os.getuid()).encode(), str(os.getgid()).encode(),
                                     str(qhome.path / "alias").encode(), b"-", b"No-Such-User-Xyz"]) + b"\0"
    assert res.stderr == b""


def test_qmail_getpw_program_real_user(qhome: QHome) -> None:
    try:
        pw = pwd.getpwnam("pqtest")
    except KeyError:
        pytest.skip("user pqtest missing")
    if pw.pw_uid == 0 or not os.path.isdir(pw.pw_dir) or os.stat(pw.pw_dir).st_uid != pw.pw_uid:
        pytest.skip("pqtest has no home of its own")
    res = expect(run([qhome.bin("qmail-getpw"), "PQtest-Foo-Bar"]))
    assert res.stdout == b"\0".join([b"pqtest", str(pw.pw_uid).encode(), str(pw.pw_gid).encode(),
                                     pw.pw_dir.encode(), b"-", b"Foo-Bar"]) + b"\0"


def test_qmail_getpw_program_usage(qhome: QHome) -> None:
    res = expect(run([qhome.bin("qmail-getpw")]), 100)
    assert res.stdout == b"" and res.stderr == b""


def test_qmail_getpw_program_root_is_not_a_user(qhome: QHome) -> None:
    res = expect(run([qhome.bin("qmail-getpw"), "root"]))
    assert res.stdout.split(b"\0")[4:6] == [b"-", b"root"]
