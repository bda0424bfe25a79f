"""Command-line plumbing shared by every entry point: user errors end in one line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad path, bad input, bad config): printed as one line, exit code 2."""


def writable_folder(path: Path, flag: str) -> None:
    """Create an output folder named by `flag`, or a UserError saying why it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {flag} {path}: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {flag} {path}: permission denied")


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
