"""Command-line plumbing shared by every entry point: user errors end in one line, not a traceback.

The error policy: code catches only what a user can cause (a bad path, bad data, a bad setting, a file someone
else wrote) and turns it into a UserError naming the problem; our own bugs keep their traceback.
BLOODCELLS_DEBUG=1 re-raises everything, user errors included, with its traceback."""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad path, bad input, bad config): printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (a UserError, so `error: ...` and exit 2) instead of the usage block, and
    no abbreviated flags (with 50 config flags, `--lr` must not silently match another)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def writable_folder(path: Path, flag: str) -> None:
    """Create an output folder named by `flag`, or a UserError saying why it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {flag} {path}: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {flag} {path}: permission denied")


def output_file(path: Path, flag: str) -> None:
    """Check a file to write named by `flag` before any work: not a folder, its folder created and writable."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name")
    writable_folder(path.parent, f"{flag} folder")


def output_file_in_folder(path: Path, flag: str) -> None:
    """Check a file to write named by `flag` before any work, its folder not created: not a folder itself, in a
    writable folder that exists; where a file stands in the way of that folder, it is named as a file."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: give a file name")
    folder = path.parent
    if not folder.is_dir():
        blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            raise UserError(f"{flag} {path}: {blocker} is {'a file' if blocker.is_file() else 'not a folder'}, "
                            "not a folder to write into")
        raise UserError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write to folder {folder}: permission denied")


def output_folder(path: Path, flag: str) -> None:
    """Check (and create) a folder to write into named by `flag` before any work: not a file, writable."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    writable_folder(path, flag)


# What the machine, not our code, says when an output cannot be written: a read-only file system, a full disk or
# quota, no permission, a folder where a file should go. One line, as for a UserError (BLOODCELLS_DEBUG: traceback).
ENVIRONMENT_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EISDIR,
                      errno.ENOTDIR}


def debugging() -> bool:
    """BLOODCELLS_DEBUG=1: every error keeps its traceback (user errors and tolerated tracker errors too)."""
    return os.environ.get("BLOODCELLS_DEBUG", "") not in ("", "0")


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run `main`, turning a UserError (a problem the user can fix) or Ctrl-C into one clear line on stderr and a
    non-zero exit. Anything else is a bug of ours and keeps its traceback. Warnings reach stderr as one
    `warning: ...` line each (once per place that raises them in this call, not once per interpreter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", UserWarning)
        warnings.showwarning = _one_line_warning
        return _run(main, argv)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    kind = "" if issubclass(category, UserWarning) else f"{category.__name__}: "
    print(f"warning: {kind}{message}", file=sys.stderr if file is None else file)


def _run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    try:
        return main(argv)
    except UserError as err:
        if debugging():
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if debugging() or err.errno not in ENVIRONMENT_ERRNOS or isinstance(err, BrokenPipeError):
            raise
        path = err.filename2 or err.filename  # a rename's target, not its temporary file
        where = f": {path}" if path else ""
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return closed_output()


def closed_output() -> int:
    """What the reader of our output closing it (`bloodcells train --help | head`) ends in: one line and the exit
    status of a program stopped by SIGPIPE, with stdout pointed at /dev/null so the flush at exit stays quiet."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    print("error: the output was closed before it was all written (broken pipe)", file=sys.stderr)
    return 141
