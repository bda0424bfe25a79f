"""pack/parallel.py: a small job stays in the calling process, a large one goes to processes that its later steps
share, and an error reaches the caller either way."""

from __future__ import annotations

import os

import pytest

from bloodcells_dist.pack.parallel import MIN_PARALLEL, Workers


def pid_of(_: object) -> int:
    return os.getpid()


def fails(value: int) -> int:
    raise OSError(f"disk full at {value}")


def test_a_small_job_runs_in_process_and_a_large_one_in_processes_that_later_steps_share():
    with Workers(2) as workers:
        assert set(workers.map(pid_of, range(MIN_PARALLEL - 1))) == {os.getpid()}
        assert workers.submit(pid_of, 0).result() == os.getpid()  # no pool yet: nothing is started for a submit
        pids = set(workers.map(pid_of, range(MIN_PARALLEL), chunksize=8))
        pids.add(workers.submit(pid_of, 0).result())  # the pool now runs, and takes what follows
        pids |= set(workers.map(pid_of, range(3)))
        assert os.getpid() not in pids and 1 <= len(pids) <= 2  # (the pool starts its second process when needed)


def test_one_worker_never_starts_a_process_and_results_keep_their_order():
    with Workers(1) as workers:
        assert set(workers.map(pid_of, range(5 * MIN_PARALLEL))) == {os.getpid()}
        assert list(workers.map(pow, range(300), [2] * 300)) == [i * i for i in range(300)]
    with Workers(2) as workers:
        assert list(workers.map(pow, range(300), [2] * 300, chunksize=7)) == [i * i for i in range(300)]


@pytest.mark.parametrize("size", [1, MIN_PARALLEL])
def test_an_error_is_raised_by_result_in_process_as_from_a_pool(size):
    with Workers(2) as workers:
        list(workers.map(pid_of, range(size)))
        future = workers.submit(fails, 7)
        with pytest.raises(OSError, match="disk full at 7"):
            future.result()
