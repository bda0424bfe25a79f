"""What a training run knows about itself as it goes: saved in every checkpoint, restored on resume."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainState:
    """The trainer's progress. `epoch` is the epoch in progress (from 0); it moves on once that epoch's end work
    (validation, best weights, checkpoint) is done, so a resume knows whether only the end is left."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    best_macro_f1: float = -1.0
    best: dict | None = None  # validation metrics of the best epoch so far, with its "epoch"
    last_validation: dict | None = None  # metrics of the most recent validation
    train_seconds: float = 0.0  # time spent in training steps, over every sitting of the run
    layout: dict = field(default_factory=dict)  # processes, batch size, grad accumulation, steps per epoch, global batch
    init_from: dict = field(default_factory=dict)  # the model the run started from (transfer.py); {} from scratch
    classes: list[str] = field(default_factory=list)  # the shards' classes, label order (empty in older checkpoints)
    # The epoch in progress's layouts (plan.Segment: first step, processes, grad_accum, workers), one more each time
    # a resume changes them mid-epoch: with the step, the epoch's global position (what the stream has left).
    segments: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        """For trainer_state.json."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> TrainState:
        """From trainer_state.json (rundir.read_run_json refuses version 0.1's)."""
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})
