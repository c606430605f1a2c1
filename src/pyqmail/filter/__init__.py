"""Filters on the queue: programs with qmail-queue's interface that pass the message on.

Each filter reads the message on descriptor 0 and the envelope on descriptor 1,
as qmail-queue(8) does, and hands both to the next program (another filter or
qmail-queue), passing its exit code and descriptor-6 text back untouched.
"""
