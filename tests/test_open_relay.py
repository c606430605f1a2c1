"""The classic relay tricks against qmail-smtpd, qmail-qmtpd and qmail-qmqpd, end to end (issue 12 C).

A home whose rcpthosts and locals are test.example.com receives, without
RELAYCLIENT, every trick of the open-relay testers: the % hack, ! paths,
quoted local parts, source routes, trailing dots, IP literals, case, several
'@', a NUL. Each RCPT's reply is qmail's (553 for a domain outside
rcpthosts), the envelope qmail-queue receives holds exactly what qmail
accepts, and qmail-send (run on that queue, qmail-remote absent so that
nothing reaches the network) routes every accepted recipient to the local
channel: nothing leaves for a domain outside rcpthosts. The one exception
is qmail's own: a domain named in control/percenthack has user%other@domain
rewritten to user@other and sent out (qmail-send(8)), so percenthack must
never name a domain in rcpthosts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from conftest import expect, run
from queuefmt import files, parse_todo
from sendkit import Running, Site, make_site, remove_site

from pyqmail.send.log import safe
from pyqmail.smtpd import replies

H = b"test.example.com"
TCP = {"PATH": "/usr/bin:/bin", "PROTO": "TCP", "TCPREMOTEIP": "192.0.2.7", "TCPLOCALIP": "192.0.2.1"}
OK = b"250 ok\r\n"
NOGATEWAY = replies.NOGATEWAY
QMTP_DOMAIN = b"66:Dsorry, that domain isn't in my list of allowed rcpthosts (#5.7.1),"
QMTP_RECIPIENT = b"46:Dsorry, I can't handle that recipient (#5.1.3),"
KOK = re.compile(rb"\d+:Kok \d+ qp \d+,")
STARTING = re.compile(rb"starting delivery \d+: msg (\d+) to (local|remote) (.*)")

# (the RCPT argument, the envelope recipient qmail-smtpd queues or None for 553).
SMTP_TRICKS: list[tuple[bytes, bytes | None]] = [
    (b"<a@far.example>", None),
    (b"a@far.example", None),                                   # no brackets
    (b"<a%far.example@test.example.com>", b"a%far.example@test.example.com"),  # local unless percenthack
    (b"<a%test.example.com@far.example>", None),
    (b"<a@far.example%test.example.com>", None),
    (b"<far.example!a@test.example.com>", b"far.example!a@test.example.com"),  # no bang routing in qmail
    (b"<far.example!a>", b"far.example!a"),                     # no '@': allowed, qmail-send adds envnoathost
    (b"<a@test.example.com!far.example>", None),
    (b'<"a@far.example"@test.example.com>', b"a@far.example@test.example.com"),  # quotes dropped; last '@'
    (b'<"a@far.example">', None),
    (b"<a@far.example@test.example.com>", b"a@far.example@test.example.com"),
    (b"<a@test.example.com@far.example>", None),
    (b"<@test.example.com:a@far.example>", None),               # source route stripped
    (b"<@test.example.com,@test.example.com:a@far.example>", None),
    (b"<@far.example:a@test.example.com>", b"a@test.example.com"),
    (b"<a@far.example.>", None),
    (b"<a@test.example.com.>", None),                           # rcpthosts is exact: no trailing dot
    (b"<a@[127.0.0.1]>", b"a@test.example.com"),               # a local IP is localiphost (default: me)
    (b"<a%far.example@[127.0.0.1]>", b"a%far.example@test.example.com"),
    (b"<a@[192.0.2.99]>", None),
    (b"<a@TEST.Example.COM>", b"a@TEST.Example.COM"),
    (b"<a@Far.Example>", None),
    (b"<a@far.example\\>@test.example.com>", b"a@far.example>@test.example.com"),  # escaped '>'
    (b"<a@far.example\0@test.example.com>", None),              # a NUL ends the command
]

# (the recipient netstring's content, what qmail-qmtpd does: True queued, False 553, None unusable).
QMTP_TRICKS: list[tuple[bytes, bool | None]] = [
    (b"a@far.example", False),
    (b"a%far.example@test.example.com", True),
    (b"a%test.example.com@far.example", False),
    (b"far.example!a@test.example.com", True),
    (b"far.example!a", True),
    (b'"a@far.example"@test.example.com', True),
    (b"a@far.example@test.example.com", True),
    (b"a@test.example.com@far.example", False),
    (b"@test.example.com:a@far.example", False),
    (b"@far.example:a@test.example.com", True),
    (b"a@far.example.", False),
    (b"a@test.example.com.", False),
    (b"a@[127.0.0.1]", False),                                  # qmail-qmtpd has no localiphost
    (b"a@TEST.Example.COM", True),
    (b"a@Far.Example", False),
    (b"a@far.example\0@test.example.com", None),
]


@pytest.fixture
def site() -> Iterator[Site]:
    s = make_site(H.decode())
    s.home.bin("qmail-remote").unlink()  # remote deliveries are deferred, never sent
    yield s
    remove_site(s)


def smtp(site: Site, rcpts: list[bytes], env: dict[str, str] | None = None) -> list[bytes]:
    """Run one qmail-smtpd session sending rcpts then a message; return the replies to the RCPTs."""
    cmds = [b"HELO relay.tester", b"MAIL FROM:<s@client.example>"]
    cmds += [b"RCPT TO:" + r for r in rcpts] + [b"DATA", b"Subject: relay test\r\n\r\nhi\r\n.", b"QUIT"]
    res = expect(run([site.home.bin("qmail-smtpd")], input=b"".join(c + b"\r\n" for c in cmds),
                     env=dict(TCP, **(env or {})), user=site.user))
    lines = res.stdout.split(b"\r\n")
    assert lines[1:3] == [b"250 test.example.com", b"250 ok"], res.explain()
    return [x + b"\r\n" for x in lines[3:3 + len(rcpts)]]


def qmtp(site: Site, rcpts: list[bytes]) -> bytes:
    """Send one QMTP message to rcpts; return qmail-qmtpd's replies."""
    def ns(data: bytes) -> bytes:
        return b"%d:%s," % (len(data), data)

    wire = ns(b"\nSubject: relay test\n\nhi\n") + ns(b"s@client.example") + ns(b"".join(ns(r) for r in rcpts))
    return expect(run([site.home.bin("qmail-qmtpd")], input=wire, env=TCP, user=site.user)).stdout


def envelopes(site: Site) -> dict[int, list[bytes]]:
    """Return the recipients of every message in todo/, by message number."""
    q = site.home.queue
    return {int(n): parse_todo((q / "todo" / n).read_bytes()).recipients for n in files(q)["todo"]}


def as_routed(recip: bytes) -> bytes:
    """Return recip as qmail-send's log names it: envnoathost added where there is no '@', log-safe."""
    return safe(recip if b"@" in recip else recip + b"@" + H)


def routes(site: Site, msgs: dict[int, list[bytes]]) -> list[tuple[int, bytes, bytes]]:
    """Run qmail-send until it has started a delivery for every recipient of msgs;
    return (msg, channel, recipient) of each."""
    want = sum(len(r) for r in msgs.values())

    def started(lines: list[bytes]) -> list[tuple[int, bytes, bytes]]:
        out = []
        for line in lines:
            m = STARTING.match(line)
            if m and int(m.group(1)) in msgs:
                out.append((int(m.group(1)), m.group(2), m.group(3)))
        return out

    d = Running(site)
    try:
        lines = d.wait_for(lambda ls: len(started(ls)) >= want)
    finally:
        assert d.stop() == 0
    return started(lines)


def test_smtpd_and_qmtpd_relay_nothing(site: Site) -> None:
    got = smtp(site, [r for r, _ in SMTP_TRICKS])
    assert got == [OK if e is not None else NOGATEWAY for _, e in SMTP_TRICKS]
    (smtp_msg, smtp_rcpts), = envelopes(site).items()
    assert smtp_rcpts == [e for _, e in SMTP_TRICKS if e is not None]

    out = qmtp(site, [r for r, _ in QMTP_TRICKS])
    expected = [KOK if ok else re.compile(re.escape(QMTP_DOMAIN if ok is False else QMTP_RECIPIENT))
                for _, ok in QMTP_TRICKS]
    pos = 0
    for rx in expected:
        m = rx.match(out, pos)
        assert m, (out[pos:], rx)
        pos = m.end()
    assert pos == len(out)
    msgs = envelopes(site)
    (qmtp_rcpts,) = [r for n, r in msgs.items() if n != smtp_msg]
    assert qmtp_rcpts == [r for r, ok in QMTP_TRICKS if ok]

    # qmail-send: every accepted recipient is local.
    got_routes = routes(site, msgs)
    assert {ch for _, ch, _ in got_routes} == {b"local"}, got_routes
    assert sorted(r for _, _, r in got_routes) == sorted(as_routed(r) for rs in msgs.values() for r in rs)


def test_relayclient_relays_everything(site: Site) -> None:
    # The control: with RELAYCLIENT set the same tricks are all taken, and far.example goes out.
    rcpts = [b"<a@far.example>", b"<@test.example.com:b@far.example>"]
    assert smtp(site, rcpts, {"RELAYCLIENT": ""}) == [OK, OK]
    msgs = envelopes(site)
    assert list(msgs.values()) == [[b"a@far.example", b"b@far.example"]]
    assert sorted(routes(site, msgs))[0][1:] == (b"remote", b"a@far.example")


def test_localiphost_is_checked_against_rcpthosts(site: Site) -> None:
    # A literal naming this host becomes control/localiphost before rcpthosts is checked:
    # a localiphost outside rcpthosts refuses it.
    site.home.control("localiphost", "other.example\n")
    assert smtp(site, [b"<a@[127.0.0.1]>", b"<a@other.example>"]) == [NOGATEWAY, NOGATEWAY]
    assert files(site.home.queue)["todo"] == []


def test_percenthack_on_a_rcpthosts_domain_relays(site: Site) -> None:
    # qmail's documented behaviour: qmail-smtpd accepts a%b@here (here is in rcpthosts), and
    # qmail-send, told by control/percenthack to apply the % hack to here, sends it to a@b.
    site.home.control("percenthack", "test.example.com\n")
    assert smtp(site, [b"<a%far.example@test.example.com>", b"<b@test.example.com>"]) == [OK, OK]
    msgs = envelopes(site)
    got = sorted((ch, r) for _, ch, r in routes(site, msgs))
    assert got == [(b"local", b"b@test.example.com"), (b"remote", b"a@far.example")]


def test_percenthack_on_another_domain_is_not_reachable(site: Site) -> None:
    # percenthack naming only a domain outside rcpthosts: qmail-smtpd refuses a%b@that-domain.
    site.home.control("percenthack", "far.example\n")
    assert smtp(site, [b"<a%other.example@far.example>"]) == [NOGATEWAY]
    assert files(site.home.queue)["todo"] == []


def test_qmqpd_relays_for_anyone_it_serves(site: Site) -> None:
    # qmail-qmqpd(8): no rcpthosts check at all; only tcpserver's rules may keep clients out.
    def ns(data: bytes) -> bytes:
        return b"%d:%s," % (len(data), data)

    res = expect(run([site.home.bin("qmail-qmqpd")], input=ns(ns(b"hi\n") + ns(b"s@c") + ns(b"a@far.example")),
                     env=TCP, user=site.user))
    assert KOK.fullmatch(res.stdout)
    assert list(envelopes(site).values()) == [[b"a@far.example"]]
