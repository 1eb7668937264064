"""One exception type for every mistake a person can fix.

The command line prints a `VitlabError` as a single line (`vitlab: error: ...`) and exits with
status 2, so every message must say what was wrong *and* what to do about it. Scripts outside the
command line (benchmarks/) do the same through `run_script`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class VitlabError(Exception):
    """A problem with the user's input, files or environment, with a one-line fix in the message."""

    exit_code = 2


class RunStopped(VitlabError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint (exit status 130, like Ctrl-C)."""

    exit_code = 130


def run_script(main: Callable[[], int | None]) -> None:
    """Run a script's `main` as the command line runs a command, then exit: a VitlabError becomes one line on stderr,
    `SCRIPT: error: ...`, and the error's exit status."""
    try:
        status = main()
    except VitlabError as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    sys.exit(status or 0)
