"""qmail-start with a remote recipient: qmail-send -> qmail-rspawn -> qmail-remote -> a test SMTP server."""

from __future__ import annotations

import pytest

from remotekit import SmtpServer
from sendkit import Running, Site, make_site, qqueue, remove_site

STATUS0 = b"status: local 0/10 remote 0/20"


@pytest.fixture
def site() -> Site:
    s = make_site("test.example.com")
    yield s
    remove_site(s)


def test_remote_delivery_through_smtproutes(site: Site) -> None:
    with SmtpServer(replies={"RCPT": [b"250 ok\r\n", b"550 no such user\r\n"]}) as srv:
        site.home.control("smtproutes", f":[127.0.0.1]:{srv.port}\n")
        d = Running(site, env=site.env(DNSCACHEIP="127.0.0.1:9"))
        try:
            d.wait_for(STATUS0)
            qqueue(site.home, b"s@x.example", [b"ok@far.example", b"bad@far.example"],
                   b"Subject: far\n\n.dot\nremote\n", user=site.user)
            lines = d.wait_for(lambda ls: any(x.startswith(b"end msg ") for x in ls))
        finally:
            assert d.stop() == 0
    done = sorted(x.split(b": ", 1)[1] for x in lines if x.startswith(b"delivery "))
    assert done == sorted([
        b"success: 127.0.0.1_accepted_message./Remote_host_said:_250_ok_12345_qp_1/",
        b"failure: 127.0.0.1_does_not_like_recipient./Remote_host_said:_550_no_such_user/"
        b"Giving_up_on_127.0.0.1./",
    ])
    # (the bounce for bad@ may also have reached the server, from <>)
    ours = [s for s in srv.sessions if s.commands[2:3] == [b"MAIL FROM:<s@x.example>"]]
    assert len(ours) == 2 and all(s.commands[:2] == [b"EHLO test.example.com", b"HELO test.example.com"] for s in ours)
    data = next(s.data for s in ours if s.data)
    assert data.startswith(b"Received: (qmail ") and data.endswith(b"Subject: far\r\n\r\n..dot\r\nremote\r\n")
