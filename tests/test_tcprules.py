"""tcprules and tcprulescheck against ucspi-tcp 0.88's: the same cdb bytes, messages, exit codes
and decisions, including the book's rules file, ranges, malformed and hostile input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import Result, expect, run
from pyqmail import cdb
from pyqmail.ucspi import rules
from ucspikit import ours, real

BOOK_RULES = (
    "192.168.1.2:deny\n"
    '192.168.1.:allow,RELAYCLIENT=""\n'
    '=www.example.com:allow,RELAYCLIENT=""\n'
    "=:allow\n"
    ":deny\n"
)

# (environment, what tcprulescheck prints) for the book's rules file.
BOOK_DECISIONS = [
    ({"TCPREMOTEIP": "192.168.1.2"}, b"rule 192.168.1.2:\ndeny connection\n"),
    ({"TCPREMOTEIP": "192.168.1.7"},
     b"rule 192.168.1.:\nset environment variable RELAYCLIENT=\nallow connection\n"),
    ({"TCPREMOTEIP": "192.168.1.2", "TCPREMOTEHOST": "www.example.com"},
     b"rule 192.168.1.2:\ndeny connection\n"),
    ({"TCPREMOTEIP": "10.0.0.1", "TCPREMOTEHOST": "www.example.com"},
     b"rule =www.example.com:\nset environment variable RELAYCLIENT=\nallow connection\n"),
    ({"TCPREMOTEIP": "10.0.0.1", "TCPREMOTEHOST": "mail.example.org"}, b"rule =:\nallow connection\n"),
    ({"TCPREMOTEIP": "10.0.0.1"}, b"rule :\ndeny connection\n"),
    ({}, b"rule :\ndeny connection\n"),
]

RULE_TEXTS = [
    BOOK_RULES,
    "1.2.3.4-7:allow\n10.2-3.:deny\n1.2.3.250-300:allow,X=/a/\n1.2.3.7-4:allow\n",
    "1.-5:allow\n=a-b.com:allow\njoe@1.2.3.4-5:allow\n1.2.3.04-006:deny\n",
    "# comment:deny\n  # x:allow\nnocolon\n\n1.2.3.4:allow  \t \n",
    '1.2.3.4:deny,A="a=b",B==c=,C=xyzx\n',
    "last:allow",
    "a\0b:allow,X=\"\0\"\n",
    "dup:allow,N=/1/\ndup:deny\n",
    "1.2.3.0-99999999999999999999999:allow\n",
    "18446744073709551616-2.:allow\n",
    ":allow,=/v/\n",
    "".join(f"10.{i // 256}.{i % 256}.:allow,N=/{i}/\n" for i in range(3000)),
]

BAD_LINES = [
    "1.2.x-5:allow\n", "1.2.3.4:allow,\n", "1.2.3.4:allow,A=\n", "1.2.3.4:allo\n",
    "1.2.3.4:denyX\n", "1.2.3.4:allowX\n", "1.2.3.4:allow,A=x\n", "a:b:allow\n", "1-2-3:allow\n",
    ":allow\r\n", "a\0b:bad\n", "ok:allow\nbad:deny,\nok2:allow\n", "192.168.:allow,RELAYCLIENT=\n",
    ":allow,A\n", "1.2.3.+4-5:allow\n",
]


def compile_both(tmp: Path, text: bytes) -> tuple[Result, Result]:
    """Run the real tcprules and ours on text into tmp/real.cdb and tmp/ours.cdb."""
    a = run([real("tcprules"), tmp / "real.cdb", tmp / "real.tmp"], input=text)
    b = run([ours("tcprules"), tmp / "ours.cdb", tmp / "ours.tmp"], input=text)
    return a, b


@pytest.mark.parametrize("text", RULE_TEXTS, ids=range(len(RULE_TEXTS)))
def test_cdb_bytes_as_ucspi_tcp(tmp_path: Path, text: str) -> None:
    a, b = compile_both(tmp_path, text.encode("latin-1"))
    expect(a, 0)
    expect(b, 0)
    assert b.stderr == a.stderr == b""
    assert (tmp_path / "ours.cdb").read_bytes() == (tmp_path / "real.cdb").read_bytes()
    assert not (tmp_path / "ours.tmp").exists()
    assert (tmp_path / "ours.cdb").stat().st_mode & 0o777 == (tmp_path / "real.cdb").stat().st_mode & 0o777


@pytest.mark.parametrize("text", BAD_LINES, ids=range(len(BAD_LINES)))
def test_bad_lines_as_ucspi_tcp(tmp_path: Path, text: str) -> None:
    for name in ("real", "ours"):
        (tmp_path / f"{name}.cdb").write_bytes(b"old")
    a, b = compile_both(tmp_path, text.encode("latin-1"))
    expect(a, 100)
    expect(b, 100)
    assert b.stderr == a.stderr
    assert b.stderr.startswith(b"tcprules: fatal: unable to parse this line: ")
    assert (tmp_path / "ours.cdb").read_bytes() == b"old"  # left alone


def test_usage_and_file_errors(tmp_path: Path) -> None:
    for argv in ([], ["a"]):
        a = run([real("tcprules"), *argv])
        b = run([ours("tcprules"), *argv])
        assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr) == (
            100, b"", b"tcprules: usage: tcprules rules.cdb rules.tmp\n")
    (tmp_path / "d").mkdir()
    cases = [
        [tmp_path / "x.cdb", tmp_path / "nonexistent" / "x.tmp"],
        [tmp_path / "d", tmp_path / "x.tmp"],
    ]
    for argv in cases:
        a = run([real("tcprules"), *argv], input=b":allow\n")
        b = run([ours("tcprules"), *argv], input=b":allow\n")
        assert (b.returncode, b.stderr) == (a.returncode, a.stderr), (a.explain(), b.explain())
        assert b.returncode == 111


def test_same_tmp_and_cdb(tmp_path: Path) -> None:
    cdbp = tmp_path / "r.cdb"
    expect(run([ours("tcprules"), cdbp, cdbp], input=b"1.2.3.4:deny\n"))
    res = expect(run([ours("tcprulescheck"), cdbp], env={"TCPREMOTEIP": "1.2.3.4"}))
    assert res.stdout == b"rule 1.2.3.4:\ndeny connection\n"


def check_both(cdb_path: Path, env: dict[str, str]) -> tuple[Result, Result]:
    a = run([real("tcprulescheck"), cdb_path], env=env)
    b = run([ours("tcprulescheck"), cdb_path], env=env)
    return a, b


@pytest.mark.parametrize("env,expected", BOOK_DECISIONS, ids=range(len(BOOK_DECISIONS)))
def test_book_rules_decisions(tmp_path: Path, env: dict[str, str], expected: bytes) -> None:
    """The book's tcp.smtp (chapter 2): compiled by either tcprules, checked by either tcprulescheck."""
    a, b = compile_both(tmp_path, BOOK_RULES.encode())
    expect(a)
    expect(b)
    for cdb_path in (tmp_path / "ours.cdb", tmp_path / "real.cdb"):
        r, o = check_both(cdb_path, env)
        expect(r)
        expect(o)
        assert o.stdout == r.stdout == expected


ORDER_RULES = (
    'joe@1.2.3.4:allow,A="1"\n'
    "joe@=h.example:deny\n"
    '=h.example:allow,B="2"\n'
    '1.2.:allow,C="3"\n'
    '=.example:allow,D="4"\n'
    '=:allow,E="5"\n'
)
ORDER_ENVS = [
    {"TCPREMOTEIP": "1.2.3.4", "TCPREMOTEINFO": "joe"},
    {"TCPREMOTEIP": "1.2.3.5", "TCPREMOTEINFO": "joe", "TCPREMOTEHOST": "h.example"},
    {"TCPREMOTEIP": "1.2.3.5", "TCPREMOTEHOST": "h.example"},
    {"TCPREMOTEIP": "1.2.3.5", "TCPREMOTEHOST": "x.example"},
    {"TCPREMOTEIP": "1.3.3.5", "TCPREMOTEHOST": "x.example"},
    {"TCPREMOTEIP": "1.3.3.5", "TCPREMOTEHOST": "x.Example"},
    {"TCPREMOTEIP": "1.3.3.5", "TCPREMOTEHOST": ""},
    {"TCPREMOTEIP": "1.3.3.5"},
    {"X": "1"},
    {"TCPREMOTEIP": "1.2.3.4", "TCPREMOTEINFO": ""},
]


@pytest.mark.parametrize("env", ORDER_ENVS, ids=range(len(ORDER_ENVS)))
def test_lookup_order(tmp_path: Path, env: dict[str, str]) -> None:
    a, b = compile_both(tmp_path, ORDER_RULES.encode())
    expect(a)
    expect(b)
    r, o = check_both(tmp_path / "ours.cdb", env)
    assert (o.returncode, o.stdout, o.stderr) == (r.returncode, r.stdout, r.stderr)


def test_manual_examples(tmp_path: Path) -> None:
    """tcprules(1)'s examples: first, second, third and fourth instructions."""
    text = b"joe@127.0.0.1:allow,N=/first/\n18.23.0.32:allow,N=/second/\n:allow,N=/third/\n127.:allow,N=/fourth/\n"
    expect(run([ours("tcprules"), tmp_path / "r.cdb", tmp_path / "r.tmp"], input=text))
    for env, which in [({"TCPREMOTEIP": "10.119.75.38"}, b"third"),
                       ({"TCPREMOTEIP": "18.23.0.32"}, b"second"),
                       ({"TCPREMOTEIP": "127.0.0.1", "TCPREMOTEINFO": "bill"}, b"fourth"),
                       ({"TCPREMOTEIP": "127.0.0.1", "TCPREMOTEINFO": "joe"}, b"first")]:
        res = expect(run([ours("tcprulescheck"), tmp_path / "r.cdb"], env=env))
        assert b"set environment variable N=" + which + b"\n" in res.stdout


def test_tcprulescheck_errors(tmp_path: Path) -> None:
    (tmp_path / "notcdb").write_bytes(b"hello\n")
    for argv in ([], [tmp_path / "missing.cdb"], [tmp_path / "notcdb"], [tmp_path]):
        a = run([real("tcprulescheck"), *argv], env={"TCPREMOTEIP": "1.2.3.4"})
        b = run([ours("tcprulescheck"), *argv], env={"TCPREMOTEIP": "1.2.3.4"})
        if argv == [tmp_path]:
            # ucspi-tcp 0.88 crashes (SIGSEGV) on a directory; we say why and exit 111.
            assert b.returncode == 111
            assert b.stderr.endswith(b": is a directory\n")
            continue
        assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr), (a.explain(), b.explain())


def test_truncated_cdb(tmp_path: Path) -> None:
    """Every truncation of a rules cdb gives what ucspi-tcp's tcprulescheck gives."""
    text = "".join(f"10.0.{i}.:allow,N=/{i}/\n" for i in range(40)) + "=h.example:deny\n:allow\n"
    expect(run([ours("tcprules"), tmp_path / "full.cdb", tmp_path / "t.tmp"], input=text.encode()))
    full = (tmp_path / "full.cdb").read_bytes()
    env = {"TCPREMOTEIP": "10.0.7.9", "TCPREMOTEHOST": "h.example"}
    cut = tmp_path / "cut.cdb"
    sizes = sorted({0, 1, 7, 8, 100, 1000, 2047, 2048, 2049, 2100, len(full) - 1, len(full) // 2,
                    len(full) - 8, len(full) - 100} | set(range(2048, len(full), 97)))
    for size in sizes:
        cut.write_bytes(full[:size])
        a, b = check_both(cut, env)
        assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr), (size, a.explain(), b.explain())


def test_garbage_cdb(tmp_path: Path) -> None:
    """Hostile cdbs: pointers past the end, huge lengths, loops of slots."""
    rng = random.Random(4)
    path = tmp_path / "g.cdb"
    for i in range(60):
        size = rng.choice([2056, 2100, 3000, 5000])
        data = bytearray(rng.randrange(256) for _ in range(size))
        if i % 3 == 0:
            # Plausible tables: every slot count small, positions inside the file.
            for b in range(256):
                data[b * 8:b * 8 + 8] = (rng.randrange(2048, size)).to_bytes(4, "little") + \
                    rng.randrange(0, 4).to_bytes(4, "little")
        path.write_bytes(bytes(data))
        a, b = check_both(path, {"TCPREMOTEIP": "1.2.3.4", "TCPREMOTEHOST": "a.b", "TCPREMOTEINFO": "u"})
        assert (b.returncode, b.stdout, b.stderr) == (a.returncode, a.stdout, a.stderr), (i, a.explain(), b.explain())


def test_huge_rules_file(tmp_path: Path) -> None:
    """100,000 rules with ranges: compiled, found, and identical to ucspi-tcp's file."""
    lines = [f"10.{i // 256 % 256}.{i % 256}.1-3:allow,N=/{i}/\n" for i in range(30000)]
    lines += [f"=h{i}.example.com:deny\n" for i in range(10000)]
    text = "".join(lines).encode()
    a, b = compile_both(tmp_path, text)
    expect(a)
    expect(b)
    assert (tmp_path / "ours.cdb").read_bytes() == (tmp_path / "real.cdb").read_bytes()
    res = expect(run([ours("tcprulescheck"), tmp_path / "ours.cdb"], env={"TCPREMOTEIP": "10.1.2.3"}))
    assert res.stdout == b"rule 10.1.2.3:\nset environment variable N=258\nallow connection\n"


def test_long_line(tmp_path: Path) -> None:
    """A 4 MB rule (one huge variable) is compiled like ucspi-tcp's; a 20 MB line is refused."""
    value = "v" * (4 << 20)
    a, b = compile_both(tmp_path, f":allow,BIG=/{value}/\n".encode())
    expect(a)
    expect(b)
    assert (tmp_path / "ours.cdb").read_bytes() == (tmp_path / "real.cdb").read_bytes()
    res = run([ours("tcprules"), tmp_path / "x.cdb", tmp_path / "x.tmp"], input=b"x" * (20 << 20))
    expect(res, 111)
    assert res.stderr == b"tcprules: fatal: unable to read input: out of memory\n"
    assert not (tmp_path / "x.cdb").exists()


def test_atomic_replacement(tmp_path: Path) -> None:
    """A failed compile leaves the old cdb; a good one replaces it whole."""
    path = tmp_path / "r.cdb"
    expect(run([ours("tcprules"), path, tmp_path / "r.tmp"], input=b"1.2.3.4:deny\n"))
    expect(run([ours("tcprules"), path, tmp_path / "r.tmp"], input=b"1.2.3.4:allow\nbad\x01:x\n"), 100)
    res = expect(run([ours("tcprulescheck"), path], env={"TCPREMOTEIP": "1.2.3.4"}))
    assert res.stdout == b"rule 1.2.3.4:\ndeny connection\n"
    expect(run([ours("tcprules"), path, tmp_path / "r.tmp"], input=b"1.2.3.4:allow\n"))
    res = expect(run([ours("tcprulescheck"), path], env={"TCPREMOTEIP": "1.2.3.4"}))
    assert res.stdout == b"rule 1.2.3.4:\nallow connection\n"


# Pure units.

def test_candidates_order() -> None:
    keys = list(rules.candidates(b"1.2.3.4", b"a.b.c", b"joe"))
    assert keys == [b"joe@1.2.3.4", b"joe@=a.b.c", b"1.2.3.4", b"=a.b.c", b"1.2.3.", b"1.2.", b"1.",
                    b"=.b.c", b"=.c", b"=", b""]
    assert list(rules.candidates(b"10.0.0.1", None, None)) == [b"10.0.0.1", b"10.0.0.", b"10.0.", b"10.", b""]
    assert list(rules.candidates(b"::1", None, None)) == [b"::1", b"::", b":", b""]


def test_compile_line_units() -> None:
    assert rules.compile_line(b"1.2.3.4-5:deny,A=/x/\n") == [(b"1.2.3.4", b"D\0+A=x\0"), (b"1.2.3.5", b"D\0+A=x\0")]
    assert rules.compile_line(b"#x:deny\n") == []
    assert rules.compile_line(b"no colon\n") == []
    with pytest.raises(rules.RuleError) as e:
        rules.compile_line(b"a:allow,B=\n")
    assert e.value.shown == b"a:allow,B="
    assert rules.decide(b"D\0+A=1\0+B\0+C=2=3\0junk") == (True, [(b"A", b"1"), (b"C", b"2=3")])
    assert rules.scan_ulong(b"18446744073709551617x") == (1, 20)


def test_reader_round_trip_with_cdb_module(tmp_path: Path) -> None:
    path = tmp_path / "r.cdb"
    expect(run([ours("tcprules"), path, tmp_path / "r.tmp"], input=BOOK_RULES.encode()))
    with cdb.Reader.open(str(path)) as r:
        assert list(r.items()) == [(b"192.168.1.2", b"D\0"), (b"192.168.1.", b"+RELAYCLIENT=\0"),
                                   (b"=www.example.com", b"+RELAYCLIENT=\0"), (b"=", b""), (b"", b"D\0")]
