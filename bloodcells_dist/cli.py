"""Command-line plumbing shared by every entry point: user errors end in one line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A problem the user can fix (bad path, bad input, bad config): printed as one line, exit code 2."""


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run `main`, turning a UserError or Ctrl-C into one clear line on stderr and a non-zero exit."""
    try:
        return main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
