"""`qmail user add|del|passwd|list`: the POP3 virtual-user database, through the real qmail process."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from conftest import IS_ROOT, TEST_USER, QHome, expect, run
from pyqmail.pop3.passwords import verify


def ident() -> tuple[list[str], int, int]:
    """The --uid argument to use (pqtest as root, none otherwise) and the uid/gid expected."""
    if IS_ROOT:
        pw = pwd.getpwnam(TEST_USER)
        return ["--uid", TEST_USER], pw.pw_uid, pw.pw_gid
    return [], os.getuid(), pwd.getpwuid(os.getuid()).pw_gid


def user(qhome: QHome, *args: str, input: bytes = b"") -> tuple[int, bytes, bytes]:
    res = run([qhome.bin("qmail"), "user", *args[:1], "--home", str(qhome.path), *args[1:]], input=input,
              env={"PATH": "/usr/bin:/bin"})
    return res.returncode, res.stdout, res.stderr


def db(qhome: QHome) -> Path:
    return qhome.path / "users" / "poppasswd"


def test_add_list_passwd_del(qhome: QHome) -> None:
    extra, uid, gid = ident()
    assert user(qhome, "add", *extra, "pop@example.org", input=b"s3cret\n") == (0, b"", b"")
    home = qhome.path / "pop" / "pop@example.org"
    for sub in ("", "Maildir", "Maildir/tmp", "Maildir/new", "Maildir/cur"):
        st = (home / sub).stat()
        assert stat.S_ISDIR(st.st_mode) and (st.st_uid, st.st_gid) == (uid, gid)
        assert stat.S_IMODE(st.st_mode) == 0o700
    assert stat.S_IMODE(db(qhome).stat().st_mode) == 0o600
    name, stored, u, g, h = db(qhome).read_text().rstrip("\n").split(":")
    assert (name, u, g, h) == ("pop@example.org", str(uid), str(gid), str(home))
    assert verify(b"s3cret", stored) and not verify(b"s3cret\n", stored)

    other = qhome.path.parent / "elsewhere"
    assert user(qhome, "add", *extra, "--home-dir", str(other), "two", input=b"pw2\r\n")[0] == 0
    code, out, err = user(qhome, "list")
    assert (code, err) == (0, b"")
    assert out == (f"pop@example.org {uid} {gid} {home}\ntwo {uid} {gid} {other}\n").encode()
    assert b"scrypt" not in out

    assert user(qhome, "passwd", "two", input=b"new") == (0, b"", b"")
    assert verify(b"new", db(qhome).read_text().splitlines()[1].split(":")[1])
    assert user(qhome, "del", "pop@example.org") == (0, b"", b"")
    assert db(qhome).read_text().splitlines()[0].startswith("two:")
    assert home.is_dir()  # del keeps the mail
    assert user(qhome, "list")[1] == f"two {uid} {gid} {other}\n".encode()
    assert stat.S_IMODE(db(qhome).stat().st_mode) == 0o600
    assert sorted(os.listdir(qhome.path / "users")) == ["poppasswd", "poppasswd.lock"]


def test_checkpassword_accepts_added_user(qhome: QHome) -> None:
    extra, uid, gid = ident()
    expect(run([qhome.bin("qmail"), "user", "add", "--home", str(qhome.path), *extra, "v@x"], input=b"pw\n"))
    env = {"PATH": "/usr/bin:/bin", "QMAILHOME": str(qhome.path), "PYQMAIL_AUTH_DELAY": "0"}
    res = expect(run(["/bin/sh", "-c", 'exec "$@" 3<&0', "sh", qhome.bin("checkpassword"), "/bin/sh", "-c",
                      'echo "$USER $HOME"; pwd; id -u'], input=b"v@x\0pw\0stamp\0", env=env))
    home = qhome.path / "pop" / "v@x"
    assert res.stdout == f"v@x {home}\n{home}\n{uid}\n".encode()


def test_hostile_names(qhome: QHome) -> None:
    extra, _, _ = ident()
    db(qhome).write_bytes(b"# keep\n")
    for name, why in (("a:b", b"bad user name: 'a:b'"), ("a\nb", b"bad user name: 'a\\nb'"),
                      ("", b"empty user name"), ("#x", b"bad user name: '#x'"),
                      ("../x", b"bad user name: '../x'"), ("a b", b"bad user name: 'a b'"),
                      ("x" * 256, b"user name too long")):
        assert user(qhome, "add", *extra, name, input=b"pw\n") == (100, b"", b"qmail user: fatal: " + why + b"\n")
    assert user(qhome, "del", "a:b") == (100, b"", b"qmail user: fatal: no such user: a:b\n")
    assert user(qhome, "passwd", "", input=b"x\n") == (100, b"", b"qmail user: fatal: no such user: \n")
    assert db(qhome).read_bytes() == b"# keep\n"
    assert not (qhome.path / "pop").exists()


def test_bad_passwords(qhome: QHome) -> None:
    extra, _, _ = ident()
    for data, why in ((b"", b"empty password"), (b"\n", b"empty password"), (b"\r\nx", b"empty password"),
                      (b"a\0b\n", b"password contains NUL"), (b"x" * 512, b"password too long")):
        assert user(qhome, "add", *extra, "u", input=data) == (100, b"", b"qmail user: fatal: " + why + b"\n")
    assert not db(qhome).exists() or db(qhome).read_bytes() == b""
    assert user(qhome, "add", *extra, "u", input=b"ok\n")[0] == 0
    before = db(qhome).read_bytes()
    assert user(qhome, "passwd", "u", input=b"") == (100, b"", b"qmail user: fatal: empty password\n")
    assert user(qhome, "add", *extra, "u", input=b"again\n") == (100, b"", b"qmail user: fatal: user already exists: u\n")
    assert db(qhome).read_bytes() == before


def test_corrupt_lines_kept(qhome: QHome) -> None:
    extra, uid, gid = ident()
    corrupt = b"broken:$scrypt$x:notanumber:1:/nowhere\ngarbage without colons\n#comment:1:2:3:4\n"
    db(qhome).write_bytes(corrupt + b"last:hash:5:6:/h:/bin/sh")  # no final newline
    assert user(qhome, "add", *extra, "new", input=b"pw\n")[0] == 0
    lines = db(qhome).read_bytes().split(b"\n")
    assert b"\n".join(lines[:3]) + b"\n" == corrupt and lines[3] == b"last:hash:5:6:/h:/bin/sh"
    assert lines[4].startswith(b"new:") and lines[5] == b"" and len(lines) == 6
    code, out, err = user(qhome, "list")
    assert code == 0
    assert out == b"last 5 6 /h\nnew %d %d %s\n" % (uid, gid, bytes(qhome.path / "pop" / "new"))
    assert err == (b"qmail user: warning: %s line 1 is corrupt\nqmail user: warning: %s line 2 is corrupt\n"
                   % (bytes(db(qhome)), bytes(db(qhome))))
    assert user(qhome, "passwd", "broken", input=b"x\n") == (
        100, b"", b"qmail user: fatal: entry for broken is corrupt; fix it by hand\n")
    assert user(qhome, "del", "broken") == (0, b"", b"")  # a corrupt entry can still be removed
    assert user(qhome, "del", "new") == (0, b"", b"")
    assert db(qhome).read_bytes() == corrupt[len(b"broken:$scrypt$x:notanumber:1:/nowhere\n"):] + \
        b"last:hash:5:6:/h:/bin/sh\n"


def test_usage_and_missing_home(qhome: QHome, tmp_path: Path) -> None:
    assert user(qhome, "frob")[0] == 100
    assert run([qhome.bin("qmail"), "user"]).returncode == 100
    assert user(qhome, "add")[0] == 100
    res = run([qhome.bin("qmail"), "user", "list", "--home", str(tmp_path)])
    assert (res.returncode, res.stderr) == (
        100, f"qmail user: fatal: {tmp_path} is not a qmail installation (no users directory)\n".encode())
    assert user(qhome, "add", "--uid", "no-such-user-here", "z", input=b"x\n") == (
        100, b"", b"qmail user: fatal: no such user: no-such-user-here\n")


def test_unwritable_database_is_temporary(qhome: QHome) -> None:
    if IS_ROOT:
        users = qhome.path / "users"
        users.chmod(0o755)
        extra, _, _ = ident()
        res = run([qhome.bin("qmail"), "user", "add", "--home", str(qhome.path), *extra, "t"], input=b"pw\n",
                  user=TEST_USER)
        assert (res.returncode, res.stderr) == (
            111, f"qmail user: fatal: unable to create {qhome.path}/pop: Permission denied\n".encode()), res.explain()
        return
    (qhome.path / "users").chmod(0o555)
    try:
        code, out, err = user(qhome, "add", "t", input=b"pw\n")
        assert code == 111 and err.startswith(b"qmail user: fatal: unable to lock ")
    finally:
        (qhome.path / "users").chmod(0o755)


def test_root_mode_requires_uid(root_home: QHome) -> None:
    code, out, err = user(root_home, "add", "x", input=b"pw\n")
    assert (code, err) == (100, b"qmail user: fatal: --uid is required in a root-mode installation\n")
    code, out, err = user(root_home, "add", "--uid", "0", "x", input=b"pw\n")
    assert (code, err) == (100, b"qmail user: fatal: refusing uid 0: qmail-pop3d does not run as root\n")
    assert user(root_home, "add", "--uid", TEST_USER, "x", input=b"pw\n")[0] == 0
    st = (root_home.path / "users" / "poppasswd").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


def test_password_prompted_on_a_terminal(qhome: QHome) -> None:
    import pty
    import subprocess

    extra, _, _ = ident()
    for name, answers, code, err in (("t", (b"tty-pw\n", b"tty-pw\n"), 0, b""),
                                     ("u", (b"one\n", b"two\n"), 100,
                                      b"qmail user: fatal: passwords do not match\n")):
        master, slave = pty.openpty()
        # A new session has no controlling terminal: getpass prompts on stderr and reads the pty.
        p = subprocess.Popen([qhome.bin("qmail"), "user", "add", "--home", str(qhome.path), *extra, name],
                             stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True, env={"PATH": "/usr/bin:/bin"})
        os.close(slave)
        assert p.stderr is not None and p.stdout is not None
        try:
            seen = b""
            for prompt, answer in zip((b"Password: ", b"Again: "), answers):
                while not seen.endswith(prompt):
                    chunk = p.stderr.read1(100)
                    assert chunk, seen
                    seen += chunk
                os.write(master, answer)  # typed after the prompt: getpass flushes earlier input
            rest = p.stderr.read()
            out = p.stdout.read()
            assert p.wait(60) == code
        finally:
            os.close(master)
            p.stdout.close()
            p.stderr.close()
            if p.poll() is None:
                p.kill()
                p.wait()
        assert (out, rest) == (b"", b"\n" + err), (seen, rest)
    (line,) = db(qhome).read_text().splitlines()
    assert line.startswith("t:") and verify(b"tty-pw", line.split(":")[1])
