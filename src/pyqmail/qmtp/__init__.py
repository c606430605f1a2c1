"""QMTP and QMQP: qmail-qmtpd, qmail-qmqpd, qmail-qmqpc."""
