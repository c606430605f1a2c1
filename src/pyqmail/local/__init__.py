"""Local delivery: qmail-lspawn, qmail-local, qmail-getpw, users, dot-qmail, Maildir, mbox."""
