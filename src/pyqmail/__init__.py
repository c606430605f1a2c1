"""pyqmail: qmail, the mail transfer agent, rebuilt in Python."""
