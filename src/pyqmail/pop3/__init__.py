"""Reading mail: qmail-popup, qmail-pop3d, checkpassword."""
