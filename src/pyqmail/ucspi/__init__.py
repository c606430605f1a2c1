"""UCSPI-TCP: tcpserver, tcprules, tcprulescheck, rblsmtpd, recordio, tcp-env."""
