"""The queue: qmail-queue, qmail-queued, qmail-qread, qmail-qstat and the queue layout."""
