"""What a run prints about itself: progress bars that suit where they print (a live bar on a terminal, a
plain line every so often in a log), one start summary line, then an ETA once an epoch has been timed."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, TextIO

from tqdm import tqdm

if TYPE_CHECKING:  # the packer prints progress too, and never loads torch or accelerate for it
    from accelerate import Accelerator

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


def device_name(accelerator: Accelerator) -> str:
    """The devices training runs on, e.g. '2 x cpu' or '8 x cuda (NVIDIA H100 80GB HBM3)'."""
    device = accelerator.device
    name = f"{accelerator.num_processes} x {device.type}"
    if device.type == "cuda":
        import torch  # loaded already wherever an Accelerator exists

        name += f" ({torch.cuda.get_device_name(device)})"
    return name


def start_summary(accelerator: Accelerator, *, precision: str, why: str, batch_size: int, grad_accum: int,
                  steps_per_epoch: int, epochs: int, data: str) -> str:
    """One line: device and count, precision (and why), processes, global batch, steps per epoch, data path."""
    global_batch = batch_size * accelerator.num_processes * grad_accum
    return (f"start: {device_name(accelerator)}, precision {precision} ({why}), "
            f"{accelerator.num_processes} process(es), global batch {global_batch} "
            f"({batch_size} x {accelerator.num_processes} x accum {grad_accum}), {steps_per_epoch} steps/epoch x "
            f"{epochs} epochs, data {data}")


def eta_line(epoch_seconds: float, epochs_left: int) -> str:
    """Time left at the pace of the epoch just timed (training and validation), and when that is."""
    left = epoch_seconds * epochs_left
    finish = time.strftime("%H:%M", time.localtime(time.time() + left))
    return f"eta: {epoch_seconds:.0f} s per epoch, {epochs_left} epoch(s) left, about {left / 60:.1f} min (done ~{finish})"
