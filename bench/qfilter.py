"""The filter chain's cost per message: qmail-queue alone, control/smtpfilters, a $QMAILQUEUE wrapper.

usage: python bench/qfilter.py [N]

Queues N messages of 4 KB (default 200) from a warm parent through the
queueing client (pyqmail.queue.qq.QQ, as qmail-smtpd does) three ways into a
fresh single-user home, and prints ms per message for each:

- plain: QMAILHOME/bin/qmail-queue (fork fast path);
- smtpfilters: control/smtpfilters holding one filter (/bin/cat): the
  client starts qmail-qfilter's stub by fork, it execs cat and becomes
  qmail-queue without a new interpreter;
- wrapper: $QMAILQUEUE naming `#!/bin/sh exec qmail-qfilter /bin/cat`, as
  admins set it from tcprules: /bin/sh and a Python interpreter per message.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import fresh_home, report, timed  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    home = fresh_home()
    os.environ["QMAILHOME"] = home
    os.chdir(home)
    from pyqmail import home as _home
    from pyqmail.queue.qq import QQ

    _home.set_default(home)
    body = (b"Subject: bench\n\n" + b"x" * 75 + b"\n") * 44
    wrapper = os.path.join(home, "qfilter-wrapper")
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\nexec {home}/bin/qmail-qfilter /bin/cat\n")
    os.chmod(wrapper, 0o755)
    filters = os.path.join(home, "control", "smtpfilters")

    def one(env: dict[str, str] | None = None) -> None:
        q = QQ(env, network=True)
        q.write(body)
        assert q.close(b"a@b", [b"u@bench.example.com"]) == b""

    results = {}
    results["plain"] = report("plain qmail-queue", timed(one, n))
    with open(filters, "w") as f:
        f.write("/bin/cat\n")
    results["smtpfilters"] = report("control/smtpfilters: qmail-qfilter /bin/cat", timed(one, n))
    os.unlink(filters)
    env = dict(os.environ, QMAILQUEUE=wrapper)
    results["wrapper"] = report("QMAILQUEUE=sh wrapper: qmail-qfilter /bin/cat", timed(lambda: one(env), n))
    print(f"smtpfilters costs {1000 * (results['smtpfilters'] - results['plain']):.1f} ms per message, "
          f"the wrapper {1000 * (results['wrapper'] - results['plain']):.1f} ms")


if __name__ == "__main__":
    main()
