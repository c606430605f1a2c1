"""The boot scripts qmail installs in QMAILHOME/boot, as the book lists them.

Each starts qmail-start with one default delivery and splogger as logger; an
administrator copies one to QMAILHOME/rc. The +df forms put dot-forward first
so that sendmail-style ~/.forward files work.
"""

from __future__ import annotations

_HEAD = "#!/bin/sh\n\n# Using splogger to send the log through syslog.\n"
_DF = "# Using dot-forward to support sendmail-style ~/.forward files.\n"

# name: (comment lines after the splogger/dot-forward ones, delivery instruction)
_BINMAIL = '-r "${SENDER:-MAILER-DAEMON}" -d "$USER"'
_SCRIPTS = {
    "home": ("# Using qmail-local to deliver messages to ~/Mailbox by default.\n", "./Mailbox"),
    "proc": ("# Using procmail to deliver messages to /var/spool/mail/$USER by default.\n",
             "|preline procmail"),
    "binm1": ("# Using binmail to deliver messages to /var/spool/mail/$USER by default.\n"
              "# Using BSD 4.4 binmail interface: /usr/libexec/mail.local -r\n",
              f"|preline -f /usr/libexec/mail.local {_BINMAIL}"),
    "binm2": ("# Using binmail to deliver messages to /var/spool/mail/$USER by default.\n"
              "# Using SVR4 binmail interface: /bin/mail -r\n",
              f"|preline -f /bin/mail {_BINMAIL}"),
    "binm3": ("# Using binmail to deliver messages to /var/spool/mail/$USER by default.\n"
              "# Using V7 binmail interface: /bin/mail -f\n",
              '|preline -f /bin/mail -f "${SENDER:-MAILER-DAEMON}" -d "$USER"'),
}


def scripts(qmail_home: str) -> dict[str, str]:
    """Return {name: text} of every boot script for an installation in qmail_home."""
    out = {}
    env = f'exec env - PATH="{qmail_home}/bin:$PATH" \\\n'
    for name, (comment, delivery) in _SCRIPTS.items():
        long_ = delivery.startswith("|preline -f")
        if long_:
            start = f"qmail-start \\\n'{delivery}' \\\nsplogger qmail\n"
        else:
            start = f"qmail-start {delivery if not delivery.startswith('|') else repr_sh(delivery)} splogger qmail\n"
        out[name] = _HEAD + comment + "\n" + env + start
        df_delivery = f"'|dot-forward .forward\n{delivery}'"
        df_tail = " \\\nsplogger qmail\n" if long_ else " splogger qmail\n"
        out[name + "+df"] = _HEAD + _DF + comment + "\n" + env + "qmail-start " + df_delivery + df_tail
    return out


def repr_sh(s: str) -> str:
    """Quote s for sh with single quotes (s holds no single quote)."""
    return f"'{s}'"
