"""sendmail: qmail 1.03's sendmail interface, run as mail programs run it.

The option mapping is checked against stand-in programs (shell scripts put
in place of QMAILHOME/bin/qmail-inject, qmail-qread, qmail-smtpd, as an
administrator's wrappers would be); the end-to-end tests queue for real
through the real qmail-inject, driven by Python's email package and by
s-nail, a Debian mail program.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP
from pathlib import Path

import pytest

from conftest import CI, QHome, Result, expect, run
from queuefmt import RECEIVED, files, parse_todo

ENV = {"PATH": "/usr/bin:/bin", "USER": "joe"}
USAGE = b"sendmail: usage: sendmail [ -t ] [ -fsender ] [ -Fname ] [ -bp ] [ -bs ] [ arg ... ]\n"
S_NAIL = "s-nail"  # Debian package s-nail


def sendmail(h: QHome, args: list[str], stdin: bytes = b"", env: dict[str, str] | None = None,
             prog: str | os.PathLike[str] | None = None) -> Result:
    return run([prog or h.bin("sendmail"), *args], input=stdin, env={**ENV, **(env or {})})


def stand_in(h: QHome, name: str, tmp_path: Path) -> Path:
    """Replace QMAILHOME/bin/name by a script that records $0, its arguments, cwd and environment."""
    out = tmp_path / f"{name}.out"
    script = h.bin(name)
    script.unlink(missing_ok=True)
    script.write_text("#!/bin/sh\n"
                      f"{{ printf '%s\\n' \"$0\" \"$@\"; echo ---; pwd; echo ---; env | sort; }} > {out}\n"
                      "exit 7\n")
    script.chmod(0o755)
    return out


def recorded(out: Path) -> tuple[list[str], str, dict[str, str]]:
    """Return (argv, cwd, environment) a stand-in recorded."""
    argv, cwd, env = out.read_text().split("---\n")
    pairs = (line.split("=", 1) for line in env.splitlines())
    return argv.splitlines(), cwd.strip(), {k: v for k, v in pairs}


# --- the option mapping ------------------------------------------------------------------------

@pytest.mark.parametrize("args,qiargs", [
    ([], ["-a", "--"]),
    (["-t"], ["-H", "--"]),
    (["r@x.y"], ["-a", "--", "r@x.y"]),
    (["-t", "-i", "-f", "s@x.y", "r@x.y"], ["-H", "-f", "s@x.y", "--", "r@x.y"]),
    (["-fs@x.y", "r"], ["-a", "-f", "s@x.y", "--", "r"]),
    (["-f", ""], ["-a", "-f", "", "--"]),
    (["-f", "a", "-f", "b"], ["-a", "-f", "b", "--"]),
    (["-oi", "-oem", "-odb", "-o", "", "-v", "-m", "-x", "-i", "-B8BITMIME", "-p", "smtp:h", "-e", "m", "r"],
     ["-a", "--", "r"]),
    (["-bm", "r"], ["-a", "--", "r"]),
    (["-bmx", "r"], ["-a", "--", "r"]),
    (["-E", "-Jfoo", "-Ebar", "-t", "r"], ["-H", "--", "r"]),
    (["-itv", "r"], ["-H", "--", "r"]),
    (["--", "-t"], ["-a", "--", "-t"]),
    (["r", "-t"], ["-a", "--", "r", "-t"]),
    (["-", "r"], ["-a", "--", "-", "r"]),
])
def test_options_become_qmail_inject_options(qhome: QHome, tmp_path: Path, args: list[str],
                                              qiargs: list[str]) -> None:
    out = stand_in(qhome, "qmail-inject", tmp_path)
    expect(sendmail(qhome, args), 7)
    argv, cwd, env = recorded(out)
    assert argv == ["bin/qmail-inject", *qiargs]
    assert cwd == str(qhome.path)
    assert "MAILNAME" not in env


def test_fullname_option_sets_mailname(qhome: QHome, tmp_path: Path) -> None:
    out = stand_in(qhome, "qmail-inject", tmp_path)
    expect(sendmail(qhome, ["-F", "Joe Q. Public", "-FJ2", "r"], env={"QMAILUSER": "q"}), 7)
    argv, _, env = recorded(out)
    assert argv == ["bin/qmail-inject", "-a", "--", "r"]
    assert env["MAILNAME"] == "J2" and env["QMAILUSER"] == "q"


NAMES = {"QMAILNAME": "Q", "MAILNAME": "M", "NAME": "N", "QMAILHOST": "qh", "MAILHOST": "mh", "QMAILUSER": "qu"}


@pytest.mark.parametrize("args, user, host", [
    (["-f", "s@x.y"], "s", "x.y"),
    (["-fs@x.y"], "s", "x.y"),
    (["-f", "a@b@c"], "a@b", "c"),      # split at the last @
    (["-f", "boss"], "boss", None),     # no @: no host at all
    (["-f", "boss@"], "boss", ""),
    (["-f", ""], "", None),
    (["-F", "Joe", "-f", "s@x.y"], "s", "x.y"),  # -F is lost
])
def test_sender_option_sets_the_from_line_variables(qhome: QHome, tmp_path: Path, args: list[str], user: str,
                                                    host: str | None) -> None:
    # netqmail/notqmail's sendmail (do_sender): -f also makes the From: line.
    out = stand_in(qhome, "qmail-inject", tmp_path)
    expect(sendmail(qhome, args, env=NAMES), 7)
    _, _, env = recorded(out)
    assert env["QMAILUSER"] == user and env.get("QMAILHOST") == host
    assert not {"QMAILNAME", "MAILNAME", "NAME", "MAILHOST"} & env.keys()


def test_without_sender_option_the_environment_stays(qhome: QHome, tmp_path: Path) -> None:
    out = stand_in(qhome, "qmail-inject", tmp_path)
    expect(sendmail(qhome, ["r"], env=NAMES), 7)
    _, _, env = recorded(out)
    assert {k: env.get(k) for k in NAMES} == NAMES


@pytest.mark.parametrize("args,stderr", [
    (["-I"], b"sendmail: illegal option -- I\n" + USAGE),
    (["-r", "s@x.y"], b"sendmail: illegal option -- r\n" + USAGE),
    (["-q"], b"sendmail: illegal option -- q\n" + USAGE),
    (["-ti", "-G"], b"sendmail: illegal option -- G\n" + USAGE),
    (["-bi"], USAGE),
    (["-bd"], USAGE),
    (["-b", ""], USAGE),
    (["-f"], b"sendmail: option requires an argument -- f\n" + USAGE),
    (["-t", "-o"], b"sendmail: option requires an argument -- o\n" + USAGE),
    (["-b"], b"sendmail: option requires an argument -- b\n" + USAGE),
])
def test_usage_errors(qhome: QHome, tmp_path: Path, args: list[str], stderr: bytes) -> None:
    out = stand_in(qhome, "qmail-inject", tmp_path)
    res = expect(sendmail(qhome, args), 100)
    assert (res.stdout, res.stderr) == (b"", stderr)
    assert not out.exists()


def test_missing_home(qhome: QHome) -> None:
    res = expect(sendmail(qhome, ["r@x.y"], env={"QMAILHOME": "/nonexistent/qmail"}), 111)
    assert res.stderr == b"sendmail: fatal: unable to switch to qmail home directory\n"


def test_missing_qmail_inject(qhome: QHome) -> None:
    qhome.bin("qmail-inject").unlink()
    res = expect(sendmail(qhome, ["r@x.y"]), 111)
    assert res.stderr == b"sendmail: fatal: unable to run qmail-inject\n"


def test_qmail_inject_not_executable(qhome: QHome) -> None:
    qhome.bin("qmail-inject").chmod(0o644)
    res = expect(sendmail(qhome, ["r@x.y"]), 111)
    assert res.stderr == b"sendmail: fatal: unable to run qmail-inject\n"


# --- -bp, -bs, mailq, newaliases ----------------------------------------------------------------

@pytest.mark.parametrize("args", [["-bp"], ["-bp", "-I"], ["-t", "-bpx", "r@x.y"]])
def test_bp_runs_qmail_qread(qhome: QHome, tmp_path: Path, args: list[str]) -> None:
    out = stand_in(qhome, "qmail-qread", tmp_path)
    expect(sendmail(qhome, args), 7)
    argv, cwd, _ = recorded(out)
    assert (argv, cwd) == (["bin/qmail-qread"], str(qhome.path))


def test_bp_after_an_illegal_option_is_a_usage_error(qhome: QHome, tmp_path: Path) -> None:
    out = stand_in(qhome, "qmail-qread", tmp_path)
    expect(sendmail(qhome, ["-I", "-bp"]), 100)
    assert not out.exists()


def test_mailq_name_runs_qmail_qread(qhome: QHome, tmp_path: Path) -> None:
    out = stand_in(qhome, "qmail-qread", tmp_path)
    link = tmp_path / "mailq"
    link.symlink_to(qhome.bin("sendmail"))
    expect(sendmail(qhome, ["-v"], prog=link), 7)
    argv, _, _ = recorded(out)
    assert argv == ["bin/qmail-qread"]


def test_newaliases_name_refuses(qhome: QHome, tmp_path: Path) -> None:
    link = tmp_path / "newaliases"
    link.symlink_to(qhome.bin("sendmail"))
    res = expect(sendmail(qhome, [], prog=link), 100)
    assert res.stderr == b"sendmail: fatal: please use fastforward/newaliases instead\n"


def test_bp_without_qmail_qread(qhome: QHome) -> None:
    qhome.bin("qmail-qread").unlink(missing_ok=True)
    res = expect(sendmail(qhome, ["-bp"]), 111)
    assert res.stderr == b"sendmail: fatal: unable to run qmail-qread\n"


def test_bs_runs_qmail_smtpd_as_a_local_client(qhome: QHome, tmp_path: Path) -> None:
    out = stand_in(qhome, "qmail-smtpd", tmp_path)
    expect(sendmail(qhome, ["-bs"]), 7)
    argv, cwd, env = recorded(out)
    assert (argv, cwd) == (["bin/qmail-smtpd"], str(qhome.path))
    assert {k: env.get(k) for k in ("RELAYCLIENT", "DATABYTES", "PROTO", "TCPLOCALIP", "TCPLOCALHOST",
                                    "TCPREMOTEIP", "TCPREMOTEHOST", "TCPREMOTEINFO")} == {
        "RELAYCLIENT": "", "DATABYTES": "0", "PROTO": "TCP", "TCPLOCALIP": "127.0.0.1",
        "TCPLOCALHOST": "localhost", "TCPREMOTEIP": "127.0.0.1", "TCPREMOTEHOST": "localhost",
        "TCPREMOTEINFO": "sendmail-bs"}


def test_bs_keeps_a_callers_proto_environment(qhome: QHome, tmp_path: Path) -> None:
    out = stand_in(qhome, "qmail-smtpd", tmp_path)
    expect(sendmail(qhome, ["-bs"], env={"PROTO": "TCP", "TCPREMOTEIP": "10.0.0.1"}), 7)
    _, _, env = recorded(out)
    assert env["TCPREMOTEIP"] == "10.0.0.1" and "RELAYCLIENT" not in env and "DATABYTES" not in env


def test_bs_without_qmail_smtpd(qhome: QHome) -> None:
    qhome.bin("qmail-smtpd").unlink(missing_ok=True)
    res = expect(sendmail(qhome, ["-bs"]), 111)
    assert res.stderr == b"sendmail: fatal: unable to run qmail-smtpd\n"


# --- for real: through qmail-inject into the queue -------------------------------------------------

def queued(h: QHome) -> list[tuple[bytes, list[bytes], bytes]]:
    out = []
    for name in files(h.queue)["todo"]:
        env = parse_todo((h.queue / "todo" / name).read_bytes())
        mess = (h.queue / "mess" / str(int(name) % 23) / name).read_bytes()
        m = RECEIVED.match(mess)
        assert m, mess[:200]
        out.append((env.sender, env.recipients, mess[m.end():]))
    return out


def test_queues_through_qmail_inject(qhome: QHome) -> None:
    stdin = b"Date: x\nMessage-ID: <y>\nTo: a@b.c, d\nBcc: e@f.g\nSubject: s\n\nbody\n"
    res = expect(sendmail(qhome, ["-t", "-i", "-f", "boss@x.y", "-F", "The Boss", "extra@x.y"], stdin))
    assert (res.stdout, res.stderr) == (b"", b"")
    ((sender, rcpts, mess),) = queued(qhome)
    assert sender == b"boss@x.y"
    assert rcpts == [b"extra@x.y", b"d@test.example.com", b"a@b.c", b"e@f.g"]
    # notqmail: the From: line is the -f address, and the -F name is lost with it.
    assert mess == (b"From: boss@x.y\nDate: x\nMessage-ID: <y>\n"
                    b"To: a@b.c, d@test.example.com\nSubject: s\n\nbody\n")


# What notqmail 1.09's sendmail and qmail-inject (built from source) queue for these arguments,
# with USER=joe, MAILHOST=mh.example and NAME=Envname in the environment.
@pytest.mark.parametrize("args, from_, sender", [
    (["-f", "boss@x.y"], b"From: boss@x.y", b"boss@x.y"),
    (["-fboss@x.y"], b"From: boss@x.y", b"boss@x.y"),
    (["-F", "Name", "-f", "boss@x.y"], b"From: boss@x.y", b"boss@x.y"),
    (["-f", "boss@x.y", "-F", "Name"], b"From: boss@x.y", b"boss@x.y"),
    (["-f", "boss"], b"From: boss@test.example.com", b"boss@test.example.com"),
    (["-f", "boss@"], b"From: boss@test.example.com", b"boss@test.example.com"),
    (["-f", "@x.y"], b'From: ""@x.y', b"@x.y"),
    (["-f", ""], b'From: ""@test.example.com', b""),
    (["-f", "<>"], b'From: "<>"@test.example.com', b"<>@test.example.com"),
    (["-f", "j q@x.y"], b'From: "j q"@x.y', b"j q@x.y"),
    (["-F", "Name"], b'From: "Name" <joe@mh.example>', b"joe@mh.example"),
])
def test_from_line_as_notqmail(qhome: QHome, args: list[str], from_: bytes, sender: bytes) -> None:
    env = {"MAILHOST": "mh.example", "NAME": "Envname"}
    expect(sendmail(qhome, [*args, "r@a.b"], b"Subject: s\n\nbody\n", env=env))
    ((got_sender, rcpts, mess),) = queued(qhome)
    assert (got_sender, rcpts) == (sender, [b"r@a.b"])
    assert [line for line in mess.split(b"\n") if line.startswith(b"From:")] == [from_]


def test_without_t_only_arguments_are_recipients(qhome: QHome) -> None:
    expect(sendmail(qhome, ["-oi", "r@x.y"], b"To: a@b.c\n\nbody\n"))
    ((_, rcpts, _),) = queued(qhome)
    assert rcpts == [b"r@x.y"]


def test_qmail_inject_failures_come_through(qhome: QHome) -> None:
    res = expect(sendmail(qhome, ["-t"], b"To: a>\n\nbody\n"), 100)
    assert res.stderr == b"qmail-inject: fatal: unable to parse this line:\nTo: a>\n"
    res = expect(sendmail(qhome, ["-t"], b"To: a@b.c\n\n", env={"QMAILQUEUE": "/nonexistent"}), 111)
    assert res.stderr == b"qmail-inject: fatal: unable to exec qq (#4.3.0)\n"
    assert queued(qhome) == []


def test_python_email_client(qhome: QHome) -> None:
    """What a Python program does: compose with the email package, pipe to sendmail -t -i -f."""
    msg = EmailMessage()
    msg["From"] = "Web App <app@example.org>"
    msg["To"] = "Ann <ann@example.net>, bob@example.net"
    msg["Cc"] = "carol@example.net"
    msg["Subject"] = "Your order"
    msg.set_content("Thank you.\n.\nBye\n")
    p = subprocess.run([qhome.bin("sendmail"), "-t", "-i", "-f", "bounces@example.org"],
                       input=msg.as_bytes(), capture_output=True, env=ENV, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (0, b"", b"")
    ((sender, rcpts, mess),) = queued(qhome)
    assert sender == b"bounces@example.org"
    assert rcpts == [b"bob@example.net", b"ann@example.net", b"carol@example.net"]
    got = BytesParser(policy=SMTP).parsebytes(mess)
    assert got["From"] == "Web App <app@example.org>"
    assert got["To"] == "Ann <ann@example.net>, bob@example.net"
    assert got["Subject"] == "Your order"
    assert got["Date"] and got["Message-ID"].endswith(".qmail@test.example.com>")
    assert got.get_content() == "Thank you.\n.\nBye\n"


def test_s_nail_client(qhome: QHome, tmp_path: Path) -> None:
    """s-nail, a mail program from Debian, sending through this sendmail as its MTA."""
    if shutil.which(S_NAIL) is None:
        if CI:
            pytest.fail(f"{S_NAIL} missing: .ci/run should install the Debian package {S_NAIL}")
        pytest.skip(f"{S_NAIL} not installed (Debian package {S_NAIL})")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LC_ALL": "C", "USER": pwd.getpwuid(os.getuid()).pw_name}
    p = subprocess.run([S_NAIL, "-:", "/", "-S", f"mta={qhome.bin('sendmail')}", "-S", "sendwait",
                        "-r", "sender@example.org", "-s", "Test subject", "-c", "cc@example.net",
                        "rcpt@example.net"],
                       input=b"hello body\n", capture_output=True, env=env, timeout=60)
    assert (p.returncode, p.stderr) == (0, b""), p
    ((sender, rcpts, mess),) = queued(qhome)
    assert sender == b"sender@example.org"
    assert sorted(rcpts) == [b"cc@example.net", b"rcpt@example.net"]
    got = BytesParser(policy=SMTP).parsebytes(mess)
    assert got["From"] == "sender@example.org"
    assert got["To"] == "rcpt@example.net"
    assert got["Subject"] == "Test subject"
    assert got.get_content() == "hello body\n"
