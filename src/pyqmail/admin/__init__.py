"""Administration: the `qmail` front command, the installer, qmail-showctl."""
