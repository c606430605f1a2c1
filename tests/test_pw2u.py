"""qmail-pw2u(8): passwd to assign, every option and every users/ file, exact output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import QHome, expect, run
from pyqmail.local import users

IS_ROOT = os.geteuid() == 0
UID = 4242 if IS_ROOT else os.getuid()


def homedir(base: Path, name: str, uid: int = UID) -> str:
    d = base / name
    d.mkdir()
    if IS_ROOT:
        os.chown(d, uid, 100)
    return str(d)


@pytest.fixture
def homes(tmp_path: Path) -> dict[str, str]:
    return {"joe": homedir(tmp_path, "joe"), "alias": homedir(tmp_path, "alias"),
            "other": homedir(tmp_path, "other", UID + 1 if IS_ROOT else UID)}


def pw2u(home: QHome, passwd: bytes, *opts: str) -> tuple[int, bytes, bytes]:
    res = run([home.bin("qmail-pw2u"), *opts], input=passwd, env={"PATH": "/usr/bin:/bin"})
    return res.returncode, res.stdout, res.stderr


def users_file(home: QHome, name: str, text: bytes) -> None:
    (home.path / "users" / name).write_bytes(text)


def line(user: str, uid: int, home: str, gid: int = 100) -> bytes:
    return f"{user}:x:{uid}:{gid}:Gecos Field:{home}:/bin/sh\n".encode()


def base_passwd(homes: dict[str, str]) -> bytes:
    return (b"root:x:0:0:root:/root:/bin/sh\n" + line("alias", UID, homes["alias"], 2108)
            + line("joe", UID, homes["joe"]))


def test_default_rules(qhome: QHome, homes: dict[str, str]) -> None:
    code, out, err = pw2u(qhome, base_passwd(homes))
    a, j = homes["alias"].encode(), homes["joe"].encode()
    u = str(UID).encode()
    assert (code, err) == (0, b"")
    assert out == (b"+:alias:" + u + b":2108:" + a + b":-::\n"
                   b"=alias:alias:" + u + b":2108:" + a + b":::\n"
                   b"+alias-:alias:" + u + b":2108:" + a + b":-::\n"
                   b"=joe:joe:" + u + b":100:" + j + b":::\n"
                   b"+joe-:joe:" + u + b":100:" + j + b":-::\n"
                   b".\n")


def test_output_feeds_qmail_newu(qhome: QHome, homes: dict[str, str]) -> None:
    code, out, _ = pw2u(qhome, base_passwd(homes))
    assert code == 0
    (qhome.path / "users" / "assign").write_bytes(out)
    expect(run([qhome.bin("qmail-newu")]))
    path = str(qhome.path / "users" / "cdb")
    assert users.lookup(b"Joe-Ext", path).ext == b"Ext"
    assert users.lookup(b"bob", path).user == b"alias"


def test_skips_uid0_uppercase_missing_and_foreign_homes(qhome: QHome, homes: dict[str, str], tmp_path: Path) -> None:
    pw = (base_passwd(homes) + line("Upper", UID, homes["joe"]) + line("gone", UID, str(tmp_path / "none"))
          + line("foreign", UID, homes["other"]) + b"short:x:1:1\n" + b"zero:x:abc:1::" + homes["joe"].encode() + b":\n"
          + b"nul\0:x:5:5::" + homes["joe"].encode() + b":\n")
    code, out, _ = pw2u(qhome, pw)
    assert code == 0
    names = [ln.split(b":")[0] for ln in out.splitlines()]
    assert names == [b"+", b"=alias", b"+alias-", b"=joe", b"+joe-", b"."]


def test_u_allows_uppercase(qhome: QHome, homes: dict[str, str]) -> None:
    code, out, _ = pw2u(qhome, base_passwd(homes) + line("Big", UID, homes["joe"]), "-u")
    assert code == 0 and b"=Big:Big:" in out and b"+Big-:Big:" in out
    code, out, _ = pw2u(qhome, base_passwd(homes) + line("Big", UID, homes["joe"]), "-u", "-U")
    assert b"Big" not in out


def test_H_ignores_homes_h_stops(qhome: QHome, homes: dict[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "none")
    pw = base_passwd(homes) + line("gone", UID, missing) + line("foreign", UID, homes["other"])
    code, out, _ = pw2u(qhome, pw, "-H")
    assert code == 0 and b"=gone:gone:" in out and b"=foreign:" in out
    code, out, err = pw2u(qhome, pw, "-h")
    assert (code, out, err) == (111, b"", b"qmail-pw2u: fatal: unable to stat " + missing.encode() + b"\n")
    code, out, _ = pw2u(qhome, base_passwd(homes) + line("foreign", UID, homes["other"]), "-h")
    assert code == 0 and b"foreign" not in out
    code, out, _ = pw2u(qhome, pw, "-h", "-o")
    assert code == 0 and b"gone" not in out


def test_c_and_C_and_slash(qhome: QHome, homes: dict[str, str]) -> None:
    code, out, _ = pw2u(qhome, base_passwd(homes), "-c+")
    assert b"+joe+:joe:" in out and b"+joe-" not in out
    code, out, _ = pw2u(qhome, base_passwd(homes), "-c", ".")
    assert b"+joe.:joe:" in out
    code, out, _ = pw2u(qhome, base_passwd(homes), "-C")
    assert [ln[:1] for ln in out.splitlines()] == [b"+", b"=", b"=", b"."]
    code, out, _ = pw2u(qhome, base_passwd(homes), "-/")
    assert out.splitlines()[0].endswith(b":-/::") and out.splitlines()[2].endswith(b":-/::")
    assert out.splitlines()[1].endswith(b":::")


def test_usage(qhome: QHome) -> None:
    assert pw2u(qhome, b"", "-x") == (100, b"", b"qmail-pw2u: illegal option -- x\n")
    assert pw2u(qhome, b"", "-c") == (100, b"", b"qmail-pw2u: option requires an argument -- c\n")


# qmail-pw2u's output is buffered, and qmail's subfd_read flushes it before every read of
# standard input: the lines made from the passwd file are written once its end is read, even
# when the alias user then turns out to be missing (all checked against notqmail 1.09 built
# from source, also with random passwd files, users/ files and options).
NO_ALIAS = b"qmail-pw2u: fatal: unable to find alias user\n"


def test_no_alias_user(qhome: QHome, homes: dict[str, str]) -> None:
    code, out, err = pw2u(qhome, line("joe", UID, homes["joe"]))
    u, j = str(UID).encode(), homes["joe"].encode()
    assert (code, out, err) == (111, b"=joe:joe:" + u + b":100:" + j + b":::\n+joe-:joe:" + u + b":100:" + j
                                + b":-::\n", NO_ALIAS)


def test_no_alias_after_a_large_output(qhome: QHome) -> None:
    pw = b"".join(line(f"user{i}", UID, "/", 1) for i in range(300))
    code, out, err = pw2u(qhome, pw, "-H")
    assert (code, err) == (111, NO_ALIAS)
    _, full, _ = pw2u(qhome, pw + line("alias", UID, "/"), "-H")
    assert full == out + b"+:alias:" + str(UID).encode() + b":100:/:-::\n" + full[full.index(b"=alias:"):]
    assert len(out) > 2 * 8192


def test_unterminated_last_line_stays_in_the_buffer(qhome: QHome) -> None:
    # Its lines are made after the end of input was read: only what overflowed the buffer
    # on the way is written, cut where one of qmail's substdio_put calls did not fit.
    users_file(qhome, "mailnames", b"u3:" + b":".join(b"n%d" % j for j in range(1000)) + b"\n")
    code, out, err = pw2u(qhome, b"u3:x:1500:100:G:/h:/bin/sh", "-H")
    assert (code, err) == (111, NO_ALIAS)
    _, full, _ = pw2u(qhome, b"u3:x:1500:100:G:/h:/bin/sh\nalias:x:1500:100:G:/h:/bin/sh\n", "-H")
    assert len(out) == 49126 and out == full[:49126]  # notqmail 1.09: 6 buffers, then 8 bytes of a line
    assert out.endswith(b"\n+n986-:u3:1500:100:/h:")
    code, out, err = pw2u(qhome, b"joe:x:1500:100:G:/h:/bin/sh\nbob:x:1500:100:G:/h:/bin/sh", "-H")
    assert (code, out, err) == (111, b"=joe:joe:1500:100:/h:::\n+joe-:joe:1500:100:/h:-::\n", NO_ALIAS)


def test_include_exclude(qhome: QHome, homes: dict[str, str]) -> None:
    pw = base_passwd(homes) + line("bob", UID, homes["joe"]) + line("carl", UID, homes["joe"])
    users_file(qhome, "include", b"alias\nJOE  \n# bob\nbob\t\n\ncarl\n")
    users_file(qhome, "exclude", b"carl\n")
    code, out, _ = pw2u(qhome, pw)
    assert [ln.split(b":")[0] for ln in out.splitlines()] == [b"+", b"=alias", b"+alias-", b"=joe", b"+joe-",
                                                             b"=bob", b"+bob-", b"."]


def test_mailnames(qhome: QHome, homes: dict[str, str]) -> None:
    pw = base_passwd(homes) + line("bob", UID, homes["joe"])
    users_file(qhome, "mailnames", b"joe:joe.shmoe::js\nghost:g\nBOB:first\nbob:robert\n")
    code, out, _ = pw2u(qhome, pw)
    names = [ln.split(b":")[0] for ln in out.splitlines()]
    assert names == [b"+", b"=alias", b"+alias-", b"=joe.shmoe", b"+joe.shmoe-", b"=js", b"+js-",
                     b"=robert", b"+robert-", b"."]


def test_subusers_and_append(qhome: QHome, homes: dict[str, str]) -> None:
    users_file(qhome, "subusers", b"list:JOE:ml:\nincomplete:joe\nnocolon\n")
    users_file(qhome, "append", b"=extra:x:1:2:/x:::\nno newline")
    code, out, err = pw2u(qhome, base_passwd(homes))
    j, u = homes["joe"].encode(), str(UID).encode()
    assert (code, err) == (0, b"")
    assert out.endswith(b"=list:joe:" + u + b":100:" + j + b":-:ml:\n"
                        b"+list-:joe:" + u + b":100:" + j + b":-:ml-:\n"
                        b"=extra:x:1:2:/x:::\nno newline.\n")


def test_subuser_for_unknown_user(qhome: QHome, homes: dict[str, str]) -> None:
    _, full, _ = pw2u(qhome, base_passwd(homes))
    users_file(qhome, "subusers", b"list:nobody:ml:\n")
    code, out, err = pw2u(qhome, base_passwd(homes))
    # The passwd file's lines were written when its end was read (qmail's subfd_read).
    assert (code, out, err) == (111, full[:-2], b"qmail-pw2u: fatal: unable to find nobody user for subuser\n")


def test_unreadable_control_file(qhome: QHome, homes: dict[str, str]) -> None:
    (qhome.path / "users" / "include").mkdir()
    code, out, err = pw2u(qhome, base_passwd(homes))
    assert (code, out, err) == (111, b"", b"qmail-pw2u: fatal: unable to read controls\n")


def test_hostile_input(qhome: QHome, homes: dict[str, str]) -> None:
    junk = b"\xff\xfe::::::\n" * 1000 + b":::::::\n" + b"a" * 100000 + b"\n" + b"x:y:99999999999999999999999:1::/:\n"
    code, out, _ = pw2u(qhome, base_passwd(homes) + junk + b"no newline at end", "-H")
    assert code == 0
    assert out.startswith(b"+:alias:") and out.endswith(b".\n")
    # uid wraps as qmail's unsigned long, and the text is copied as given.
    assert b"=x:x:99999999999999999999999:1:/:::\n" in out
