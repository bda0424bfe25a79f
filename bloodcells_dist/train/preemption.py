"""Graceful stop on SIGTERM / SIGUSR1 (what SLURM and cloud schedulers send before they kill a job), and a
clear end when another process of the run dies.

A signal only sets a flag. At each optimizer step every rank asks whether any rank saw one (one tiny
all-reduce), so all ranks stop at the same step, write one checkpoint together and exit 0; `--resume`
continues exactly. Installed before the data loaders start, so forked data workers inherit the handler
and survive a signal sent to the whole process group (SLURM signals every process of a job step).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed
from accelerate import Accelerator

from ..output import say
from .rundir import RunDir

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A collective waits at most the config's collective_timeout, then fails instead of hanging (gloo's default is
# 30 min). Gloo notices a killed peer on the same network at once (connection reset); the timeout bounds the cases
# where nothing tells it (a stopped process, a machine gone from the network).
AT_STEP_ENV = "BLOODCELLS_AT_STEP"  # test hook: "N:kill", "N:sigstop", "N:stop"... at optimizer step N
PEER_LOST_MARKERS = ("connection reset by peer", "connection closed by peer", "timed out", "broken pipe")
GLOO_TIMEOUT = "application timeout caused pair closure"  # gloo's own words when collective_timeout ran out
COLLECTIVE_SOURCES = ("gloo", "c10d", "nccl", "processgroup")  # where a collective's own errors come from


def lost_peer(err: BaseException) -> bool:
    """Whether an exception says that another process of the run is gone (killed, crashed or unreachable):
    torch.distributed's own errors, or a RuntimeError raised by a collective's backend (gloo, c10d, NCCL) that
    says the connection dropped or timed out. Any other error is not ours to reword."""
    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (GLOO_TIMEOUT in text or (
        any(m in text for m in PEER_LOST_MARKERS) and any(source in text for source in COLLECTIVE_SOURCES)))


def silent_ranks(folder: Path, rank: int, world_size: int, grace: float) -> list[int]:
    """After a collective failed: say in the run folder that this rank still answers, give the other survivors
    `grace` seconds to say so too (they time out in the same collective), and return the ranks that did not
    (stopped, killed, or cut off). Every machine sees the run folder (checked at the start)."""
    mark = RunDir(folder).answered
    mark.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (mark / str(rank)).write_text(f"{now}\n")
    time.sleep(grace)
    answered = set()
    for other in range(world_size):
        try:
            if abs(float((mark / str(other)).read_text()) - now) <= grace:  # this failure's, not an earlier one's
                answered.add(other)
        except (OSError, ValueError):
            continue
    return [r for r in range(world_size) if r not in answered]


class StopSignal:
    """Remembers a stop signal; `requested` tells, identically on every rank, whether to stop now. `close()`
    puts back the handlers that were there before (an in-process caller keeps its own)."""

    def __init__(self) -> None:
        self.received: str | None = None  # the signal this process saw
        self.stopping = False  # agreed by all ranks
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name

    def close(self) -> None:
        """Restore the handlers this object replaced."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def at_step(self, step: int, rank: int) -> None:
        """The interruption tests' deterministic hook, read once a step is complete (its log line and checkpoint
        written): BLOODCELLS_AT_STEP="N:action[:rank]" acts after optimizer step N, on every rank or on one.
        `kill` sends SIGKILL, `sigstop` SIGSTOP (a hung rank) and `sigterm` SIGTERM to this process (the real
        handlers run), `stop` acts as a stop
        signal without one (for in-process callers), `pause` prints `paused at step N` and waits for a line on
        stdin. A test then names the step instead of sleeping and polling."""
        planned, _, rest = os.environ.get(AT_STEP_ENV, "").partition(":")
        action, _, only = rest.partition(":")
        if planned != str(step) or (only and only != str(rank)) or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return  # not this step or rank, or a group the launcher restarted (--max_restarts): a one-off failure
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "sigstop":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif action == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        elif action == "stop":
            self.received = AT_STEP_ENV
        elif action == "pause":
            say(f"paused at step {step}", every_rank=True)  # the rank the test paused
            sys.stdin.readline()

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any rank received a stop signal. Collective when there are several processes."""
        if not self.stopping:
            if accelerator.num_processes == 1:
                self.stopping = self.received is not None
            else:
                if self.received is not None:
                    accelerator.set_trigger()
                self.stopping = accelerator.check_trigger()
        return self.stopping
