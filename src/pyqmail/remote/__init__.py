"""Remote delivery: qmail-rspawn, qmail-remote, DNS, smtproutes, tcpto."""
