"""Delivery scheduling: qmail-start and qmail-send."""
