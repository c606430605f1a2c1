"""`qmail services`: write QMAILHOME/service as `qmail up` does, starting nothing (see pyqmail.admin.systemd)."""

from __future__ import annotations


def command(argv: list[str]) -> int:
    """Write the home's service directories; 0, 100 for usage, 111 for trouble."""
    from pyqmail.admin import systemd

    return systemd.services_command(argv)
