"""What a user reads, through one channel: `say` (a line on stdout) and `warn` (a `warning: ...` line on stderr),
from the main process of a launch only, unless a line is one rank's own (then `every_rank`).

Torch-free on purpose, so that commands which never train can print through it without importing torch; the
main process is told by the process group when there is one, else by the launcher's rank variables."""

from __future__ import annotations

import os
import sys

RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK")  # torchrun / accelerate, MPICH / Intel MPI, Open MPI


def main_process() -> bool:
    """Whether this is the main process (global rank 0) of its launch, or a process launched alone."""
    dist = sys.modules.get("torch.distributed")  # only a process that imported torch can be in a process group
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def say(text: str, *, every_rank: bool = False, stderr: bool = False) -> None:
    """One message for the user (stdout, or stderr for what is not a result), from the main process or,
    every_rank, from each; flushed, so that a killed run's log keeps it."""
    if every_rank or main_process():
        print(text, file=sys.stderr if stderr else sys.stdout, flush=True)


def warn(text: str, *, every_rank: bool = False) -> None:
    """A warning the user must see, once: `warning: text` on stderr, from the main process (or, every_rank, from
    each rank that saw the problem)."""
    say(f"warning: {text}", every_rank=every_rank, stderr=True)
