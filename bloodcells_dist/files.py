"""Writing files so that a reader sees the old file, no file, or the whole new one: never half of one."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, for writers that need it) to write to; renamed over `path`
    once the block ends without an error, removed if it raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write text or bytes to `path` atomically (fsynced before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path | str, value: object, *, sort_keys: bool = False) -> None:
    """JSON (indented, newline-terminated), atomically."""
    write_atomic(path, json.dumps(value, indent=1, sort_keys=sort_keys) + "\n")
