"""qmail-showctl(8): every sentence of qmail 1.03's output, for ordinary and hostile control directories."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from pathlib import Path

import pytest

from conftest import IS_ROOT, TEST_USER, QHome, expect, run

PATH = "/usr/bin:/bin"

# The paragraphs of a home fresh from `qmail init test.example.com`, after the header.
FRESH = b"""
badmailfrom: (Default.) Any MAIL FROM is allowed.

bouncefrom: (Default.) Bounce user name is MAILER-DAEMON.

bouncehost: (Default.) Bounce host name is test.example.com.

concurrencylocal: (Default.) Local concurrency is 10.

concurrencyremote: (Default.) Remote concurrency is 20.

databytes: (Default.) SMTP DATA limit is 0 bytes.

defaultdomain: Default domain name is example.com.

defaulthost: (Default.) Default host name is test.example.com.

doublebouncehost: (Default.) 2B recipient host: test.example.com.

doublebounceto: (Default.) 2B recipient user: postmaster.

envnoathost: (Default.) Presumed domain name is test.example.com.

helohost: (Default.) SMTP client HELO host name is test.example.com.

idhost: (Default.) Message-ID host name is test.example.com.

localiphost: (Default.) Local IP address becomes test.example.com.

locals: 
Messages for test.example.com are delivered locally.

me: My name is test.example.com.

percenthack: (Default.) The percent hack is not allowed.

plusdomain: Plus domain name is example.com.

qmqpservers: (Default.) No QMQP servers.

queuelifetime: (Default.) Message lifetime in the queue is 604800 seconds.

rcpthosts: 
SMTP clients may send messages to recipients at test.example.com.

morercpthosts: (Default.) No effect.

morercpthosts.cdb: (Default.) No effect.

smtpgreeting: (Default.) SMTP greeting: 220 test.example.com.

smtproutes: (Default.) No artificial SMTP routes.

timeoutconnect: (Default.) SMTP client connection timeout is 60 seconds.

timeoutremote: (Default.) SMTP client data timeout is 1200 seconds.

timeoutsmtpd: (Default.) SMTP server data timeout is 1200 seconds.

virtualdomains: (Default.) No virtual domains.

servercert.pem: I have no idea what this file does.
"""
# servercert.pem: the certificate `qmail init` makes (pyqmail.admin.certs); qmail
# 1.03's qmail-showctl knows no TLS file and says so of it.


def header(qhome: QHome, home: str | None = None) -> bytes:
    """The compiled-in part, from the installation record `qmail init` wrote."""
    uids: dict[str, int] = {}
    gids: dict[str, int] = {}
    single = False
    for line in (qhome.path / "conf" / "install").read_text().splitlines():
        f = line.split()
        if f and f[0] == "user":
            uids[f[1]] = int(f[3])
        elif f and f[0] == "group":
            gids[f[1]] = int(f[3])
        elif f and f[0] == "mode":
            single = f[1] == "single"
    uids["root"] = uids["alias"] if single else 0
    order = ("alias", "qmaild", "qmaill", "root", "qmailp", "qmailq", "qmailr", "qmails")
    return (f"qmail home directory: {home or qhome.path}.\n"
            "user-ext delimiter: -.\n"
            "paternalism (in decimal): 2.\n"
            "silent concurrency limit: 120.\n"
            "subdirectory split: 23.\n"
            f"user ids: {', '.join(str(uids[r]) for r in order)}.\n"
            f"group ids: {gids['nofiles']}, {gids['qmail']}.\n").encode()


def showctl(qhome: QHome, code: int = 0, env: dict[str, str] | None = None, user: str | None = None) -> bytes:
    res = run([qhome.bin("qmail-showctl")], env={"PATH": PATH, **(env or {})}, user=user)
    expect(res, code)
    assert res.stderr == b"", res.explain()
    return res.stdout


def body(qhome: QHome, user: str | None = None) -> bytes:
    """The output after the header."""
    out = showctl(qhome, user=user)
    h = header(qhome)
    assert out.startswith(h), out[:400]
    return out[len(h):]


def paragraph(out: bytes, name: str) -> bytes:
    """The paragraph of control file name, up to the next blank line."""
    start = out.index(b"\n" + name.encode() + b": ") + 1
    end = out.find(b"\n\n", start)
    return out[start:end + 1 if end != -1 else len(out)]


def set_control(qhome: QHome, name: str, data: bytes) -> Path:
    p = qhome.path / "control" / name
    p.write_bytes(data)
    return p


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


# --- the whole output --------------------------------------------------------------

def test_fresh_home_whole_output(qhome: QHome) -> None:
    assert showctl(qhome) == header(qhome) + FRESH


def test_root_mode_header_has_the_qmail_ids(root_home: QHome) -> None:
    out = showctl(root_home)
    ids = [pwd.getpwnam(u).pw_uid for u in ("alias", "qmaild", "qmaill")] + [0] + [
        pwd.getpwnam(u).pw_uid for u in ("qmailp", "qmailq", "qmailr", "qmails")]
    assert f"user ids: {', '.join(map(str, ids))}.\n".encode() in out
    assert f"group ids: {grp.getgrnam('nofiles').gr_gid}, {grp.getgrnam('qmail').gr_gid}.\n".encode() in out
    assert out == header(root_home) + FRESH


def test_every_control_file_set(qhome: QHome) -> None:
    values = {
        "badmailfrom": b"spam@example.net\n@bad.example\n",
        "bouncefrom": b"bouncer\n", "bouncehost": b"bounce.example\n",
        "concurrencylocal": b"3\n", "concurrencyremote": b"255\n", "databytes": b"1000000\n",
        "defaulthost": b"dh.example\n", "doublebouncehost": b"db.example\n", "doublebounceto": b"dbuser\n",
        "envnoathost": b"ena.example\n", "helohost": b"helo.example\n", "idhost": b"id.example\n",
        "localiphost": b"lip.example\n", "percenthack": b"pc.example\n", "qmqpservers": b"10.0.0.1\n10.0.0.2\n",
        "queuelifetime": b"86400\n", "smtpgreeting": b"hello there\n",
        "smtproutes": b":relay.example\nx.example:y.example:2525\n",
        "timeoutconnect": b"30\n", "timeoutremote": b"600\n", "timeoutsmtpd": b"900\n",
        "virtualdomains": b"virt.example:joe\n",
        "morercpthosts": b"more.example\n",
    }
    for name, data in values.items():
        set_control(qhome, name, data)
    os.utime(qhome.path / "control" / "morercpthosts", (1000, 1000))
    set_control(qhome, "morercpthosts.cdb", b"")
    expected = b"""
badmailfrom: 
spam@example.net not accepted in MAIL FROM.
@bad.example not accepted in MAIL FROM.

bouncefrom: Bounce user name is bouncer.

bouncehost: Bounce host name is bounce.example.

concurrencylocal: Local concurrency is 3.

concurrencyremote: Remote concurrency is 255.

databytes: SMTP DATA limit is 1000000 bytes.

defaultdomain: Default domain name is example.com.

defaulthost: Default host name is dh.example.

doublebouncehost: 2B recipient host: db.example.

doublebounceto: 2B recipient user: dbuser.

envnoathost: Presumed domain name is ena.example.

helohost: SMTP client HELO host name is helo.example.

idhost: Message-ID host name is id.example.

localiphost: Local IP address becomes lip.example.

locals: 
Messages for test.example.com are delivered locally.

me: My name is test.example.com.

percenthack: 
The percent hack is allowed for user%host@pc.example.

plusdomain: Plus domain name is example.com.

qmqpservers: 
QMQP server: 10.0.0.1.
QMQP server: 10.0.0.2.

queuelifetime: Message lifetime in the queue is 86400 seconds.

rcpthosts: 
SMTP clients may send messages to recipients at test.example.com.

morercpthosts: 
SMTP clients may send messages to recipients at more.example.

morercpthosts.cdb: Modified recently enough; hopefully up to date.

smtpgreeting: SMTP greeting: 220 hello there.

smtproutes: 
SMTP route: :relay.example
SMTP route: x.example:y.example:2525

timeoutconnect: SMTP client connection timeout is 30 seconds.

timeoutremote: SMTP client data timeout is 600 seconds.

timeoutsmtpd: SMTP server data timeout is 900 seconds.

virtualdomains: 
Virtual domain: virt.example:joe

servercert.pem: I have no idea what this file does.
"""
    assert body(qhome) == expected


# --- me and the defaults that follow it -------------------------------------------------

def test_without_me(qhome: QHome) -> None:
    (qhome.path / "control" / "me").unlink()
    out = body(qhome)
    assert paragraph(out, "me") == b"me: (Default.) My name is undefined! Uh-oh.\n"
    assert paragraph(out, "bouncehost") == b"bouncehost: (Default.) Bounce host name is bouncehost.\n"
    assert paragraph(out, "smtpgreeting") == b"smtpgreeting: (Default.) SMTP greeting: 220 smtpgreeting.\n"
    assert paragraph(out, "idhost") == b"idhost: (Default.) Message-ID host name is idhost.\n"
    assert paragraph(out, "bouncefrom") == b"bouncefrom: (Default.) Bounce user name is MAILER-DAEMON.\n"


def test_empty_me_is_an_empty_name(qhome: QHome) -> None:
    set_control(qhome, "me", b"")
    out = body(qhome)
    assert paragraph(out, "me") == b"me: My name is .\n"
    assert paragraph(out, "bouncehost") == b"bouncehost: (Default.) Bounce host name is .\n"


def test_unreadable_me_is_fatal(qhome: QHome) -> None:
    p = qhome.path / "control" / "me"
    p.unlink()
    p.mkdir()
    assert showctl(qhome, 111) == header(qhome) + b"Oops! Trouble reading control/me."


# --- how control files are read ----------------------------------------------------------

def test_crlf_and_blanks(qhome: QHome) -> None:
    set_control(qhome, "me", b"crlf.example\r\n")
    set_control(qhome, "bouncefrom", b"user \t \nsecond line\n")
    set_control(qhome, "helohost", b"  leading\t\n")
    set_control(qhome, "locals", b"a.example\r\n\n# comment\n   \n\t\nb.example  \n  #indented\nc.example\r \n")
    set_control(qhome, "concurrencylocal", b"7\r\n")
    out = body(qhome)
    assert paragraph(out, "me") == b"me: My name is crlf.example?.\n"
    assert paragraph(out, "bouncehost") == b"bouncehost: (Default.) Bounce host name is crlf.example?.\n"
    assert paragraph(out, "bouncefrom") == b"bouncefrom: Bounce user name is user.\n"
    assert paragraph(out, "helohost") == b"helohost: SMTP client HELO host name is   leading.\n"
    assert paragraph(out, "locals") == (b"locals: \nMessages for a.example? are delivered locally.\n"
                                        b"Messages for b.example are delivered locally.\n"
                                        b"Messages for   #indented are delivered locally.\n"
                                        b"Messages for c.example? are delivered locally.\n")
    assert paragraph(out, "concurrencylocal") == b"concurrencylocal: Local concurrency is 7.\n"


def test_list_without_final_newline_empty_list_and_nul_bytes(qhome: QHome) -> None:
    set_control(qhome, "rcpthosts", b"x.example\ny.example")
    set_control(qhome, "smtproutes", b"\n\n#only comments\n")
    set_control(qhome, "virtualdomains", b"a\0b:u\n\0hidden:v\nc\0\n\xe9t\xe9:w\n")
    out = body(qhome)
    assert paragraph(out, "rcpthosts") == (b"rcpthosts: \n"
                                           b"SMTP clients may send messages to recipients at x.example.\n"
                                           b"SMTP clients may send messages to recipients at y.example.\n")
    assert paragraph(out, "smtproutes") == b"smtproutes: \n"
    assert paragraph(out, "virtualdomains") == (b"virtualdomains: \nVirtual domain: a\nVirtual domain: b:u\n"
                                                b"Virtual domain: c\nVirtual domain: \n"
                                                b"Virtual domain: ?t?:w\n")


@pytest.mark.parametrize("data,shown", [
    (b"42", b"Local concurrency is 42."),
    (b"12abc\n", b"Local concurrency is 12."),
    (b"abc\n", b"(Default.) Local concurrency is 10."),
    (b" 5\n", b"(Default.) Local concurrency is 10."),
    (b"-5\n", b"(Default.) Local concurrency is 10."),
    (b"+5\n", b"(Default.) Local concurrency is 10."),
    (b"0\n", b"Local concurrency is 0."),
    (b"2147483647\n", b"Local concurrency is 2147483647."),
    (b"2147483648\n", b"Local concurrency is 0."),  # negative as a C int: shown as 0
    (b"4294967301\n", b"Local concurrency is 5."),  # the int keeps the low 32 bits
    (b"18446744073709551623\n", b"Local concurrency is 7."),  # the unsigned long wraps
    (b"\n5\n", b"(Default.) Local concurrency is 10."),
    (b"", b"(Default.) Local concurrency is 10."),
])
def test_numbers(qhome: QHome, data: bytes, shown: bytes) -> None:
    set_control(qhome, "concurrencylocal", data)
    assert paragraph(body(qhome), "concurrencylocal") == b"concurrencylocal: " + shown + b"\n"


def test_empty_number_file_reads_digits_left_by_the_line_before(qhome: QHome) -> None:
    # qmail 1.03 scans an empty first line without a bound, through what the
    # control library read last: concurrencylocal's 5, then badmailfrom's 123.
    set_control(qhome, "concurrencylocal", b"5\n")
    set_control(qhome, "concurrencyremote", b"")
    out = body(qhome)
    assert paragraph(out, "concurrencyremote") == b"concurrencyremote: Remote concurrency is 5.\n"
    set_control(qhome, "concurrencylocal", b"")
    set_control(qhome, "badmailfrom", b"x@y\n123  \n")
    out = body(qhome)
    assert paragraph(out, "concurrencylocal") == b"concurrencylocal: Local concurrency is 123.\n"
    assert paragraph(out, "concurrencyremote") == b"concurrencyremote: Remote concurrency is 123.\n"
    # A shorter last line ends with a NUL: the longer line's digits behind it do not count.
    set_control(qhome, "badmailfrom", b"123456\n78")
    assert paragraph(body(qhome), "concurrencylocal") == b"concurrencylocal: Local concurrency is 78.\n"
    # A first line that is only a newline overwrites the buffer with it: no digits.
    set_control(qhome, "concurrencylocal", b"\n")
    assert paragraph(body(qhome), "concurrencylocal") == b"concurrencylocal: (Default.) Local concurrency is 10.\n"


def test_unprintable_bytes_show_as_question_marks(qhome: QHome) -> None:
    set_control(qhome, "smtpgreeting", b"caf\xc3\xa9 \x1b[1m\x7f\n")
    assert paragraph(body(qhome), "smtpgreeting") == b"smtpgreeting: SMTP greeting: 220 caf?? ?[1m?.\n"


@pytest.mark.parametrize("name", ["badmailfrom", "bouncefrom", "concurrencylocal", "virtualdomains"])
def test_unreadable_file(qhome: QHome, name: str) -> None:
    p = qhome.path / "control" / name
    p.mkdir()  # opens, but cannot be read: as qmail, "Trouble reading"
    out = body(qhome)
    assert paragraph(out, name) == name.encode() + b": Oops! Trouble reading this file.\n"
    assert name.encode() + b": I have no idea" not in out


def test_file_without_permission(qhome: QHome) -> None:
    set_control(qhome, "doublebounceto", b"x\n")
    set_control(qhome, "smtproutes", b"a:b\n")
    user = unprivileged(qhome)
    (qhome.path / "control" / "doublebounceto").chmod(0)
    (qhome.path / "control" / "smtproutes").chmod(0)
    out = body(qhome, user=user)
    assert paragraph(out, "doublebounceto") == b"doublebounceto: Oops! Trouble reading this file.\n"
    assert paragraph(out, "smtproutes") == b"smtproutes: Oops! Trouble reading this file.\n"


def test_huge_control_files(qhome: QHome) -> None:
    hosts = b"".join(b"host%d.example\n" % i for i in range(200000))
    set_control(qhome, "rcpthosts", hosts)
    set_control(qhome, "me", b"m" * 3_000_000 + b"\nsecond\n")
    out = body(qhome)
    para = paragraph(out, "rcpthosts")
    assert para.count(b"\n") == 200001
    assert para.endswith(b"SMTP clients may send messages to recipients at host199999.example.\n")
    assert paragraph(out, "me") == b"me: My name is " + b"m" * 3_000_000 + b".\n"


# --- rcpthosts and morercpthosts -----------------------------------------------------------

def test_morercpthosts_without_rcpthosts(qhome: QHome) -> None:
    (qhome.path / "control" / "rcpthosts").unlink()
    out = body(qhome)
    assert paragraph(out, "rcpthosts") == b"rcpthosts: (Default.) SMTP clients may send messages to any recipient.\n"
    assert paragraph(out, "morercpthosts") == b"morercpthosts: (Default.) No rcpthosts; morercpthosts is irrelevant.\n"
    set_control(qhome, "morercpthosts", b"m.example\n")
    assert paragraph(body(qhome), "morercpthosts") == (
        b"morercpthosts: \nNo rcpthosts; doesn't matter that morercpthosts has m.example.\n")


def test_unreadable_rcpthosts_counts_as_present(qhome: QHome) -> None:
    p = qhome.path / "control" / "rcpthosts"
    p.unlink()
    p.mkdir()
    out = body(qhome)
    assert paragraph(out, "rcpthosts") == b"rcpthosts: Oops! Trouble reading this file.\n"
    assert paragraph(out, "morercpthosts") == b"morercpthosts: (Default.) No effect.\n"


def test_morercpthosts_cdb_states(qhome: QHome) -> None:
    ctl = qhome.path / "control"

    def cdb_line() -> bytes:
        return paragraph(body(qhome), "morercpthosts.cdb")

    assert cdb_line() == b"morercpthosts.cdb: (Default.) No effect.\n"
    set_control(qhome, "morercpthosts.cdb", b"")
    assert cdb_line() == b"morercpthosts.cdb: Oops! morercpthosts.cdb exists but morercpthosts doesn't.\n"
    (ctl / "morercpthosts.cdb").unlink()
    set_control(qhome, "morercpthosts", b"m.example\n")
    assert cdb_line() == b"morercpthosts.cdb: Oops! morercpthosts exists but morercpthosts.cdb doesn't.\n"
    set_control(qhome, "morercpthosts.cdb", b"")
    os.utime(ctl / "morercpthosts", (2000, 2000))
    os.utime(ctl / "morercpthosts.cdb", (1000, 1000))
    assert cdb_line() == b"morercpthosts.cdb: Oops! morercpthosts.cdb is older than morercpthosts.\n"
    os.utime(ctl / "morercpthosts.cdb", (2000.9, 2000.9))  # same second: recent enough
    os.utime(ctl / "morercpthosts", (2000.1, 2000.1))
    assert cdb_line() == b"morercpthosts.cdb: Modified recently enough; hopefully up to date.\n"


# --- files qmail does not know, and trouble finding the control directory ------------------

def test_unknown_files_in_directory_order(qhome: QHome) -> None:
    ctl = qhome.path / "control"
    for name in ("zzz", "aaa", "locals.bak", ".hidden", "databytes~"):
        set_control(qhome, name, b"x\n")
    (ctl / "subdir").mkdir()
    (ctl / "morercpthosts.cdb").write_bytes(b"")
    os.symlink("/nonexistent", ctl / "dangling")
    odd = b"odd\x01name\xff"
    with open(os.path.join(os.fsencode(ctl), odd), "wb"):
        pass
    out = body(qhome)
    unknown = [n for n in os.listdir(os.fsencode(ctl))
               if n not in (b"me", b"locals", b"rcpthosts", b"defaultdomain", b"plusdomain", b"morercpthosts.cdb")]
    tail = b"".join(b"\n" + n + b": I have no idea what this file does.\n" for n in unknown)
    assert out.endswith(b"virtualdomains: (Default.) No virtual domains.\n" + tail)
    assert odd + b": I have no idea" in out  # printed as it is, unlike values


def test_no_home(qhome: QHome) -> None:
    bad = str(qhome.path / "nonexistent")
    out = showctl(qhome, 111, env={"QMAILHOME": bad})
    assert out == header(qhome, bad) + f"Oops! Unable to chdir to {bad}.\n".encode()


def test_no_control_directory(qhome: QHome) -> None:
    shutil.rmtree(qhome.path / "control")
    assert showctl(qhome, 111) == header(qhome) + b"Oops! Unable to chdir to control.\n"


def test_control_directory_not_listable(qhome: QHome) -> None:
    user = unprivileged(qhome)
    (qhome.path / "control").chmod(0o111)
    assert showctl(qhome, 111, user=user) == header(qhome) + b"Oops! Unable to open current directory.\n"


def test_closed_output_kills_showctl_by_sigpipe(qhome: QHome) -> None:
    import subprocess

    set_control(qhome, "rcpthosts", b"".join(b"h%d.example\n" % i for i in range(5000)))
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([qhome.bin("qmail-showctl")], stdout=w, stderr=subprocess.PIPE, env={"PATH": PATH},
                           timeout=60)
    finally:
        os.close(w)
    assert p.returncode == -13 and p.stderr == b""


