"""How a job's body runs from a command line: the jobs' logging and their exit codes.

Both the command line (``sidserve.cli``) and the jobs' ``run_cli`` functions use it; nothing
in the library imports the command line itself.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


def configure_logging() -> None:
    """Plain log lines at INFO. Ray Data's progress bars go to stderr on a terminal; off a TTY
    (CI, ``ray job logs``) they would print one line per update, so the jobs log plain lines."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def run_job(body: Callable[[], object]) -> int:
    """Run a job's body with the jobs' logging. Bad input (ValueError) or a missing/unreadable
    file (OSError) ends it with exit code 2 and the message on stderr, never a traceback."""
    configure_logging()
    try:
        body()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
