"""A synthetic qmail-send log, the same for a seed, for the analog tests and benchmark."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pyqmail.svc.tai64 import label

SUCCESS = (b"did_1+0+0/", b"did_0+0+1/", b"1.2.3.4_accepted_message./Remote_host_said:_250_ok_1234/")
FAILURE = (b"Sorry,_no_mailbox_here_by_that_name._(#5.1.1)/",
           b"5.6.7.8_does_not_like_recipient./Remote_host_said:_550_no_such_user/")
DEFERRAL = (b"Connected_to_5.6.7.8_but_connection_died._(#4.4.2)/",
            b"Sorry,_I_wasn't_able_to_establish_an_SMTP_connection._(#4.4.1)/")
RETRY = 400.0  # seconds between attempts of a deferred delivery


@dataclass
class Counts:
    """What a generated log holds, for checking the summaries against."""

    messages: int = 0
    deliveries: int = 0
    success: int = 0
    failure: int = 0
    deferral: int = 0
    reasons: dict[bytes, int] = field(default_factory=dict)


def generate(messages: int, seed: int = 1, start: float = 1_000_000_000.0,
             tai64n: bool = False) -> tuple[bytes, Counts]:
    """Return a log of that many messages (interleaved as a busy qmail-send writes them) and its counts.

    Times are whole microseconds, so the numeric and TAI64N forms of one
    seed say the same thing.
    """
    rng = random.Random(seed)
    counts = Counts()
    events: list[tuple[int, int, bytes]] = []  # (microseconds, sequence, report)
    seq = 0

    def at(t: float, text: bytes) -> None:
        nonlocal seq
        seq += 1
        events.append((round(t * 1_000_000), seq, text))

    t = start
    delivery = 0
    for i in range(messages):
        t += rng.expovariate(1 / 2.0)
        msg = 100000 + i
        sender = b"" if rng.random() < 0.05 else b"user%d@example.com" % rng.randrange(20)
        at(t, b"new msg %d" % msg)
        at(t + 0.0001, b"info msg %d: bytes %d from <%s> qp %d uid %d" % (
            msg, rng.randrange(300, 40000), sender, 20000 + i, rng.choice((101, 1000, 1001))))
        end = t + 0.0002
        for r in range(rng.choice((1, 1, 1, 2, 3))):
            chan = b"local" if rng.random() < 0.4 else b"remote"
            recip = b"rcpt%d@%s" % (rng.randrange(50), rng.choice((b"example.org", b"example.net", b"Example.COM")))
            begin = t + 0.001 * (r + 1)
            while True:
                delivery += 1
                took = rng.uniform(0.01, 3.0)
                at(begin, b"starting delivery %d: msg %d to %s %s" % (delivery, msg, chan, recip))
                at(begin, b"status: local 1/10 remote 1/20")
                roll = rng.random()
                if roll < 0.8:
                    kind, reason = b"success", rng.choice(SUCCESS)
                    counts.success += 1
                elif roll < 0.88:
                    kind, reason = b"failure", rng.choice(FAILURE)
                    counts.failure += 1
                else:
                    kind, reason = b"deferral", rng.choice(DEFERRAL)
                    counts.deferral += 1
                counts.deliveries += 1
                counts.reasons[reason] = counts.reasons.get(reason, 0) + 1
                at(begin + took, b"delivery %d: %s: %s" % (delivery, kind, reason))
                at(begin + took, b"status: local 0/10 remote 0/20")
                end = max(end, begin + took + 0.0001)
                if kind != b"deferral":
                    break
                begin += took + RETRY
        at(end, b"end msg %d" % msg)
        counts.messages += 1
    events.sort()
    lines = []
    for micro, _seq, text in events:
        if tai64n:
            stamp = label(micro * 1000)
        else:
            stamp = b"%d.%06d" % divmod(micro, 1_000_000)
        lines.append(stamp + b" " + text + b"\n")
    return b"".join(lines), counts
