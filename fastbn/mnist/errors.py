"""The name fastbn-mnist reports under and its user errors, shared by all its parts."""

PROG = "fastbn-mnist"


class UsageError(Exception):
    """A user error: reported as one line and exit status 2, never a traceback."""
