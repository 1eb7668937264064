"""One exception type for every mistake a person can fix.

The command line prints a `VitlabError` as a single line (`vitlab: error: ...`) and exits with
status 2, so every message must say what was wrong *and* what to do about it.
"""


class VitlabError(Exception):
    """A problem with the user's input, files or environment, with a one-line fix in the message."""

    exit_code = 2


class RunStopped(VitlabError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint (exit status 130, like Ctrl-C)."""

    exit_code = 130
