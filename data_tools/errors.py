"""The one exception for bad data or bad arguments, and the CLI wrapper that turns it into exit 2.

Tools and the trainer's reader raise :class:`DataError` with a single line that
names the file or argument and says what was expected; whoever owns the
process prints it and exits 2, so a user never reads a traceback for a typo.
"""
from __future__ import annotations

import sys
from typing import Callable, Sequence

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a process stopped by SIGINT


class DataError(ValueError):
    """Bad input data or arguments; the message is one line meant for the user."""


def run_cli(body: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None) -> int:
    """Run a tool's ``body(argv)``; map DataError to exit 2 and Ctrl-C to 130, with one line on stderr."""
    try:
        return body(argv) or 0
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # Cleanup already ran in the except blocks below us; only report.
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
