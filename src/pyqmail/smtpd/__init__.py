"""Receiving over SMTP: qmail-smtpd, qmail-newmrh."""
