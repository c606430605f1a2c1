"""qmailanalog: summaries of qmail-send activity logs."""
