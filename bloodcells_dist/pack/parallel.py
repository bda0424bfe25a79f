"""Python-bound work over many images (decoding, hashing, writing tars), spread over processes when there is
enough of it and done in the calling process when there is not: a pool's start and stop cost about what
checking a hundred small images does (more when the caller holds torch, whose address space every fork copies),
so a pack of 56 small images was 2.5x slower through a pool than without one (0.42 s against 0.17 s, in a process
holding torch, on this project's 2-core AMD EPYC)."""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

MIN_PARALLEL = 128  # items: a smaller job runs in the calling process


def die_with_parent() -> None:
    """Pool initializer: on Linux, a worker gets SIGKILL when its parent dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class Workers(Executor):
    """An executor of up to `workers` processes, started at the first `map` of at least MIN_PARALLEL items and
    kept for what follows; until then (and always with one worker) everything runs in the calling process, in
    order. `submit` goes to the processes once they run, so a small job's later steps stay in process too."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        items = [list(it) for it in iterables]
        if self._pool is None and (self.workers < 2 or min(map(len, items), default=0) < MIN_PARALLEL):
            return map(fn, *items)
        if self._pool is None:
            # fork: the workers need no re-import of the package (spawn would cost seconds per pool)
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("fork"),
                                             initializer=die_with_parent)
        return self._pool.map(fn, *items, timeout=timeout, chunksize=chunksize)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args, **kwargs)
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:  # as a pool would: raised by result()
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
