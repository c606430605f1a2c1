"""Injection: qmail-inject, sendmail, datemail, mailsubj, predate."""
