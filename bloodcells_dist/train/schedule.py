"""The learning rate at every optimizer step: a pure function of the step and the schedule."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "onecycle", "constant")


def lr_at(step: int, *, schedule: str, peak: float, total: int, warmup: int) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`.

    cosine:   linear warm-up over `warmup` steps to `peak` (step 0 already takes peak / warmup), then half a
              cosine from peak down to 0 at step `total`.
    constant: the same warm-up, then `peak`.
    onecycle: a linear ramp over the first 30% of the steps from peak / 25 to peak (no separate warm-up),
              then half a cosine down to 0.
    """
    if schedule == "onecycle":
        ramp = max(1, int(0.3 * total))
        if step < ramp:
            return peak * (0.04 + 0.96 * step / ramp)
        return peak * 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, total - ramp)))
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    raise ValueError(f"unknown schedule {schedule!r} (expected one of {', '.join(SCHEDULES)})")
