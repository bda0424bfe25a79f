"""The one training configuration: defaults < recipe YAML < command-line `--key value` flags."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from .cli import UserError


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Saved as RUN/config.yaml; runtime state never goes in here."""

    # data
    shards: str = "shards"  # shard folder or URL prefix holding manifest.json
    output_dir: str = "runs/default"
    train_splits: tuple[str, ...] = ("train",)  # ("train", "val") trains the final model on both
    val_split: str = "val"  # "" to skip validation
    val_fold: int = -1  # >= 0: grouped k-fold CV, fold k of train_splits is validation, the rest trains
    image_size: tuple[int, int] = (240, 320)  # (height, width) in pixels fed to the model
    cell_crop: int = 0  # >0: a square window of this side (source pixels) centred on the cell's nucleus, then resized
    data: str = "auto"  # cache (decode once, hold in memory) | stream (decode every epoch) | auto: cache if it fits
    cache_dir: str = ""  # where decoded caches are saved; "" is $XDG_CACHE_HOME (or ~/.cache)/bloodcells_dist
    cache_max_mb: int = 0  # most memory the decoded cache may take per process; 0: half of what is free
    workers: int = 2  # data worker processes per training process (stream; cache building)
    shuffle: bool = True  # new sample order every epoch (cache: a permutation; stream: shards + buffer)
    shuffle_buffer: int = 1000  # stream: samples held in each worker's shuffle buffer
    # augmentation (in batches on the training device, seeded by seed, epoch and sample)
    aug_flip: bool = True  # random horizontal and vertical flips
    aug_rot90: bool = True  # random multiple of 90 degrees (cropped/padded back to the frame)
    aug_affine: bool = True  # small rotation (+-15 deg), shift (5%) and scale (0.9-1.1)
    aug_color: bool = True  # brightness, contrast and saturation +-20%
    aug_hue: float = 0.0  # stain jitter: hue turned by up to +-aug_hue of a full turn (0.5 at most)
    aug_gain: float = 0.0  # stain jitter: each colour channel scaled by 1 +- aug_gain
    aug_erase: float = 0.0  # probability of erasing one rectangle (2-20% of the frame) to the mean colour
    # model: 4 x (conv -> BN -> ReLU -> maxpool), flatten, FC1 -> FC2 -> FC3
    widths: tuple[int, ...] = (32, 64, 128, 256)  # conv channels per block
    hidden: tuple[int, int] = (256, 128)  # FC1 and FC2 widths; FC3 maps to the classes
    dropout: float = 0.0  # before FC2 and FC3
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    # optimisation
    epochs: int = 10
    batch_size: int = 32  # per process, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 0.05  # peak learning rate, reached after warm-up
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 0.5  # linear warm-up from 0 (cosine and constant schedules)
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup's Beta(a, a) parameter a (0.2-0.4 is usual); 0: off
    mixed_precision: str = "auto"  # auto (hardware and launch config decide, see precision.py) | no | fp16 | bf16
    seed: int = 0
    # bookkeeping
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    log_every: int = 10  # optimizer steps between metrics.jsonl lines
    checkpoint_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0: only at epoch ends
    keep_checkpoints: int = 2  # newest checkpoints kept
    tracker: str = "wandb"  # wandb | none
    wandb_project: str = "bloodcells_dist"
    wandb_group: str = ""  # W&B run group; `cv` sets it to the cross-validation folder's name

    def __post_init__(self) -> None:
        """Reject values that cannot work, with a message naming the key."""
        choices = {"data": ("auto", "cache", "stream"), "schedule": ("cosine", "onecycle", "constant"),
                   "mixed_precision": ("auto", "no", "fp16", "bf16"),
                   "tracker": ("wandb", "none")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"config {key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        positive = ("epochs", "batch_size", "grad_accum", "eval_every", "log_every", "keep_checkpoints")
        for key in positive:
            if getattr(self, key) < 1:
                raise UserError(f"config {key}={getattr(self, key)} must be at least 1")
        if len(self.widths) != 4:
            raise UserError(f"config widths={list(self.widths)}: the design has exactly 4 conv blocks")
        if len(self.hidden) != 2:
            raise UserError(f"config hidden={list(self.hidden)}: give the FC1 and FC2 widths")
        for key in ("widths", "hidden"):
            if min(getattr(self, key)) < 1:
                raise UserError(f"config {key}={list(getattr(self, key))}: every width must be at least 1")
        if not (math.isfinite(self.lr) and self.lr > 0):  # also rejects nan
            raise UserError(f"config lr={self.lr}: must be a finite number above 0")
        # (key, low, high): the value must be in [low, high); nan fails every comparison, so it is rejected too
        ranges = (("dropout", 0, 1), ("label_smoothing", 0, 1), ("momentum", 0, 1), ("weight_decay", 0, math.inf),
                  ("warmup_epochs", 0, math.inf), ("aug_gain", 0, 1),
                  ("mixup", 0, math.inf))
        for key, low, high in ranges:
            if not low <= getattr(self, key) < high:
                raise UserError(f"config {key}={getattr(self, key)}: must be in [{low}, {high})")
        for key, low, high in (("aug_hue", 0, 0.5), ("aug_erase", 0, 1)):  # closed ranges
            if not low <= getattr(self, key) <= high:
                raise UserError(f"config {key}={getattr(self, key)}: must be in [{low}, {high}]")
        for key, low in (("workers", 0), ("checkpoint_every", 0), ("shuffle_buffer", 1), ("val_fold", -1)):
            if getattr(self, key) < low:
                raise UserError(f"config {key}={getattr(self, key)} must be at least {low}")
        if self.cell_crop and not 16 <= self.cell_crop <= 4096:
            raise UserError(f"config cell_crop={self.cell_crop}: 0 (the whole frame) or a window side of 16 to 4096 pixels")
        h, w = self.image_size
        if h < 16 or w < 16:
            raise UserError(f"config image_size={list(self.image_size)}: 4 max-pools need at least 16x16")

    def to_yaml(self) -> str:
        """The resolved config as YAML (tuples as lists)."""
        return yaml.safe_dump(to_dict(self), sort_keys=False)


def to_dict(config: TrainConfig) -> dict:
    """Plain dict with lists for tuples, for YAML, JSON and trackers."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


FIELD_TYPES = typing.get_type_hints(TrainConfig)


def coerce(key: str, value: object) -> object:
    """Turn a YAML or command-line value into the field's type, or raise a UserError naming the key."""
    kind = FIELD_TYPES[key]
    try:
        if isinstance(value, str) and kind is not str:
            value = yaml.safe_load(value if "," not in value or value.startswith("[") else f"[{value}]")
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            items = value if isinstance(value, (list, tuple)) else [value]
            return tuple(item(v) for v in items)
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind in (int, str) and isinstance(value, kind) and not isinstance(value, bool):
            return value
        if kind is str and value is None:
            return ""
        raise ValueError(f"expected {kind.__name__}")
    except (ValueError, TypeError, yaml.YAMLError) as err:
        raise UserError(f"config {key}={value!r}: {err}") from None


def check_keys(keys: Sequence[str], where: str) -> None:
    """Unknown keys are an error that names them."""
    unknown = [k for k in keys if k not in FIELD_TYPES]
    if unknown:
        raise UserError(f"unknown config key(s) in {where}: {', '.join(unknown)}")


def read_yaml(path: Path) -> dict:
    """A recipe file as a dict of known keys."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of key: value")
    check_keys(list(raw), str(path))
    return raw


def parse_overrides(tokens: Sequence[str]) -> dict:
    """`--key value` / `--key=value` pairs (dashes or underscores) into a dict of known keys."""
    overrides, i = {}, 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}: flags are --key value")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise UserError(f"flag --{key} needs a value")
            value, i = tokens[i + 1], i + 1
        check_keys([key], "command-line flags")
        overrides[key] = value
        i += 1
    return overrides


def build_config(recipe: Path | None = None, overrides: dict | None = None, base: dict | None = None) -> TrainConfig:
    """Defaults < base (a saved run's config) < recipe YAML < overrides, every value type-checked."""
    merged: dict = {}
    for layer in (base or {}, read_yaml(recipe) if recipe else {}, overrides or {}):
        check_keys(list(layer), "config")
        merged.update({k: coerce(k, v) for k, v in layer.items()})
    return TrainConfig(**merged)
