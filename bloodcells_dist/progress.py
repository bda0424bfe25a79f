"""Progress bars that suit where they print: a live bar on a terminal, a plain line every so often in a log."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # seconds between lines when stderr is not a terminal (CI, nohup, a log file)


class LineStream:
    """A file for tqdm that turns its carriage-return redraws into whole lines, and drops the blank ones."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        """Each non-blank redraw as one line."""
        for part in text.replace("\n", "\r").split("\r"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")

    def flush(self) -> None:
        """Flush the underlying stream."""
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, disable: bool | None = False, **kwargs) -> tqdm:
    """tqdm on a terminal; elsewhere a line at most every LOG_INTERVAL_S seconds (none for shorter phases)
    instead of hundreds of carriage-return updates. `disable=True` hides it (e.g. on other ranks)."""
    if disable:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return tqdm(iterable, file=LineStream(sys.stderr), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
                delay=LOG_INTERVAL_S, **kwargs)
