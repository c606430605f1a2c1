"""Supervision and logging: supervise, svscan, multilog, splogger, ..."""
