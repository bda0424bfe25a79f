"""The one training configuration: defaults < recipe YAML < command-line `--key value` flags."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from .cli import UserError
from .files import read_user_yaml

FITS = ("crop", "pad", "stretch")  # how a window or frame meets image_size when their aspects differ
MAX_SIDE = 4096  # pixels per side of the model's input; the cell window's bound too


def geometry_problem(image_size: Sequence[int], cell_crop: float, fit: str) -> str:
    """What is wrong with an image size, cell window and fit (of a config, or of a model's recorded
    preprocessing, data/preprocess.py), or ''."""
    if len(image_size) != 2 or min(image_size) < 16 or max(image_size) > MAX_SIDE:
        return (f"image_size={list(image_size)}: give height and width, each at least 16 (4 max-pools) and at "
                f"most {MAX_SIDE} (larger cannot be held in memory)")
    if fit not in FITS:
        return f"fit={fit!r}: expected one of {', '.join(FITS)}"
    crop = cell_crop
    if not math.isfinite(crop) or crop < 0 or (1 < crop and (crop != int(crop) or not 16 <= crop <= MAX_SIDE)) \
            or (0 < crop <= 1 and crop < 0.05):
        return (f"cell_crop={crop:g}: 0 (the whole frame), a fraction 0.05-1 of the shorter side, or a window "
                f"side of 16 to {MAX_SIDE} pixels")
    return ""


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Saved as RUN/config.yaml; runtime state never goes in here."""

    # data
    shards: str = "shards"  # shard folder or URL prefix holding manifest.json; several, comma-separated (or a YAML list), train together: classes united by name, the first one validates
    shard_weights: tuple[float, ...] = ()  # with several shard folders: each one's sampling weight (1: every sample once per epoch, 0.5: half, 2: twice); () is all 1
    output_dir: str = "runs/default"  # the run folder: config, metrics, checkpoints, weights, final.json
    train_splits: tuple[str, ...] = ("train",)  # ("train", "val") trains the final model on both
    train_fraction: float = 1.0  # train on this share of the training groups (cells, patients), a seeded draw per class: a learning curve's points; 1: all
    val_split: str = "val"  # "" to skip validation
    val_fold: int = -1  # >= 0: grouped k-fold CV, fold k of train_splits is validation, the rest trains
    validate_on_train: bool = False  # allow val_split to be one of train_splits (it then scores samples it trained on; final.json says so)
    image_size: tuple[int, int] = (240, 320)  # (height, width) in pixels fed to the model
    cell_crop: float = 0.0  # a square window centred on the cell's nucleus, then resized: side in pixels (> 1) or as a fraction of the shorter side (<= 1); 0: the whole frame
    fit: str = "crop"  # where the aspect differs from image_size: crop (cover, centre-crop) | pad (fit, pad with the mean colour) | stretch
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
    channels_last: bool = False  # NHWC memory layout: faster convolutions on GPUs and recent CPUs
    compile: bool = False  # torch.compile the model
    # fine-tuning: start from a trained model of this framework instead of random weights
    init_from: str = ""  # the model to start from: a run folder, a Hub folder, a .safetensors file or a .pt2 / .pt export; "" trains from scratch
    class_map: tuple[str, ...] = ()  # SOURCE=NEW pairs for classes the two datasets spell otherwise (same names match by themselves, case aside)
    features_lr: float = 1.0  # the conv blocks' learning rate as a multiple of the head's (0.1 is usual when fine-tuning)
    freeze_epochs: int = 0  # first epochs in which the conv blocks (and their BatchNorm statistics) stay as they are: only the head trains
    bn_refit: int = 0  # with init_from: training batches that re-estimate BatchNorm's statistics before the first step (the data changed); 0 keeps the source's
    # optimisation
    epochs: int = 10  # passes over the training samples
    batch_size: int = 32  # per process, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 0.05  # peak learning rate, reached after warm-up
    momentum: float = 0.9  # SGD momentum; 0: plain SGD
    nesterov: bool = True  # Nesterov momentum (with momentum > 0)
    weight_decay: float = 5e-4  # L2 penalty of SGD, on every parameter
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 0.5  # linear warm-up from 0 (cosine and constant schedules)
    label_smoothing: float = 0.0  # share of the target spread over the other classes (0.1 is usual)
    mixup: float = 0.0  # mixup's Beta(a, a) parameter a (0.2-0.4 is usual); 0: off
    mixed_precision: str = "auto"  # auto: bf16 on a GPU that has it (else fp16), on a CPU only where it computes bf16 natively (AMX, AVX512-BF16; else fp32), a launch config's choice wins | no | fp16 | bf16
    seed: int = 0  # every random draw (weights, data order, augmentation) follows from it; 0 <= seed < 2**63
    # bookkeeping
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    log_every: int = 10  # optimizer steps between metrics.jsonl lines
    checkpoint_every: int = 100  # optimizer steps between mid-epoch checkpoints (a crash loses fewer); 0: epoch ends only
    keep_checkpoints: int = 2  # newest checkpoints kept
    collective_timeout: float = 600.0  # seconds a collective waits for every rank; then the run ends naming the silent rank
    tracker: str = "wandb"  # wandb | none
    wandb_project: str = "bloodcells_dist"  # W&B project the runs go to (offline unless logged in)
    wandb_group: str = ""  # W&B run group; `cv` sets it to the cross-validation folder's name

    def __post_init__(self) -> None:
        """Reject values that cannot work, with a message naming the key."""
        if len(self.image_size) != 2:
            raise UserError(f"config image_size={list(self.image_size)}: give height and width, e.g. 96,96")
        choices = {"data": ("auto", "cache", "stream"), "schedule": ("cosine", "onecycle", "constant"),
                   "mixed_precision": ("auto", "no", "fp16", "bf16"),
                   "tracker": ("wandb", "none")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"config {key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        positive = ("epochs", "batch_size", "grad_accum", "eval_every", "log_every", "keep_checkpoints",
                    "collective_timeout")
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
        if not 0 < self.train_fraction <= 1:
            raise UserError(f"config train_fraction={self.train_fraction}: must be in (0, 1]")
        ranges = (("dropout", 0, 1), ("label_smoothing", 0, 1), ("momentum", 0, 1), ("weight_decay", 0, math.inf),
                  ("warmup_epochs", 0, math.inf), ("aug_gain", 0, 1),
                  ("mixup", 0, math.inf))
        for key, low, high in ranges:
            if not low <= getattr(self, key) < high:
                raise UserError(f"config {key}={getattr(self, key)}: must be in [{low}, {high})")
        for key, low, high in (("aug_hue", 0, 0.5), ("aug_erase", 0, 1)):  # closed ranges
            if not low <= getattr(self, key) <= high:
                raise UserError(f"config {key}={getattr(self, key)}: must be in [{low}, {high}]")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"config seed={self.seed}: must be in [0, 2**63)")
        if self.val_split and self.val_fold < 0 and self.val_split in self.train_splits and not self.validate_on_train:
            raise UserError(f"config val_split={self.val_split!r} is also in train_splits {list(self.train_splits)}: "
                            "validation would score (and pick the best weights on) samples the model trains on; "
                            "set val_split '' to train without validation, or validate_on_train true if you mean it")
        if len(set(self.train_splits)) != len(self.train_splits) or "" in self.train_splits:
            raise UserError(f"config train_splits={list(self.train_splits)}: each split once, none empty")
        for key, low in (("workers", 0), ("checkpoint_every", 0), ("shuffle_buffer", 1), ("val_fold", -1)):
            if getattr(self, key) < low:
                raise UserError(f"config {key}={getattr(self, key)} must be at least {low}")
        if not (math.isfinite(self.features_lr) and self.features_lr >= 0):
            raise UserError(f"config features_lr={self.features_lr}: must be a finite number, 0 or more")
        if not 0 <= self.freeze_epochs <= self.epochs:
            raise UserError(f"config freeze_epochs={self.freeze_epochs}: must be in [0, epochs={self.epochs}]")
        if self.bn_refit < 0:
            raise UserError(f"config bn_refit={self.bn_refit} must be at least 0")
        for key in ("class_map", "bn_refit"):
            if getattr(self, key) and not self.init_from:
                raise UserError(f"config {key} applies only when starting from a model: set init_from too")
        folders = self.shard_folders()
        if "" in folders or len(set(folders)) != len(folders):
            raise UserError(f"config shards={self.shards!r}: each shard folder once, none empty")
        if self.shard_weights and len(self.shard_weights) != len(folders):
            raise UserError(f"config shard_weights={list(self.shard_weights)}: one weight per shard folder "
                            f"({len(folders)})")
        if not all(math.isfinite(w) and w > 0 for w in self.shard_weights):
            raise UserError(f"config shard_weights={list(self.shard_weights)}: every weight must be above 0")
        problem = geometry_problem(self.image_size, self.cell_crop, self.fit)
        if problem:
            raise UserError(f"config {problem}")

    def shard_folders(self) -> list[str]:
        """The shard folders (or URL prefixes) this run trains on, the validating one first."""
        return [part.strip() for part in self.shards.split(",")]

    def to_dict(self) -> dict:
        """Plain dict with lists for tuples, for YAML, JSON and trackers."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_yaml(self) -> str:
        """The resolved config as YAML (tuples as lists)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELD_TYPES = typing.get_type_hints(TrainConfig)


def number(kind: type, value: object) -> int | float:
    """A value as the int or float a user means: 0.05, 5e-4, 1e-3 (which YAML 1.1 reads as text), 32, 1e2 for
    an int; True and 3.5 for an int are refused."""
    if isinstance(value, str):
        try:
            value = int(value) if kind is int else float(value)
        except ValueError:
            try:
                value = float(value)  # 1e2 for an int
            except ValueError:
                raise ValueError(f"expected {kind.__name__}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected {kind.__name__}")
    if kind is float:
        return float(value)
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("expected a whole number")
    return int(value)


def coerce(key: str, value: object) -> object:
    """Turn a YAML or command-line value into the field's type, or raise a UserError naming the key."""
    kind = FIELD_TYPES[key]
    try:
        if isinstance(value, str) and kind is not str:
            if value.count(",") >= MAX_ITEMS:  # refused before YAML spends seconds parsing it
                raise ValueError(f"{value.count(',') + 1} values; a list here holds a few")
            value = yaml.safe_load(value if "," not in value or value.startswith("[") else f"[{value}]")
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            items = value if isinstance(value, (list, tuple)) else [value]
            if len(items) > MAX_ITEMS:
                raise ValueError(f"{len(items)} values; a list here holds a few")
            return tuple(number(item, v) if item in (int, float) else item(v) for v in items)
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError("expected true or false")
            return value
        if kind in (int, float):
            return number(kind, value)
        if kind is str and isinstance(value, str):
            return value
        if key == "shards" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return ",".join(value)  # a recipe's list of shard folders
        if kind is str and value is None:
            return ""
        raise ValueError(f"expected {kind.__name__}")
    except (ValueError, TypeError, OverflowError, yaml.YAMLError) as err:
        raise UserError(f"config {key}={brief(value)}: {err}") from None


MAX_ITEMS = 64  # values in a list-valued key (image_size, widths, train_splits...): more is a mistake or an attack


def brief(value: object, width: int = 80) -> str:
    """repr(value) cut to `width` characters: a message names a value, it never prints a huge one."""
    text = repr(value) if not isinstance(value, (list, tuple)) or len(value) <= MAX_ITEMS else f"[{len(value)} values]"
    return text if len(text) <= width else text[:width - 3] + "..."


def check_keys(keys: Sequence[str], where: str) -> None:
    """Unknown keys are an error that names them."""
    unknown = [k for k in keys if k not in FIELD_TYPES]
    if unknown:
        raise UserError(f"unknown config key(s) in {where}: {', '.join(unknown)}")


def read_yaml(path: Path) -> dict:
    """A recipe file as a dict of known keys."""
    raw = read_user_yaml(path, "config") or {}  # one line for a key given twice or a YAML bomb
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a mapping of key: value")
    check_keys(list(raw), str(path))
    return raw


@dataclasses.dataclass(frozen=True)
class FieldDoc:
    """A TrainConfig key as the source documents it: its section, type, default and comment."""

    name: str
    section: str
    kind: str
    default: object
    help: str


def field_docs() -> list[FieldDoc]:
    """Every TrainConfig key in source order, with the section comment above it and its own trailing comment:
    the one description that --help and docs/config.md are generated from."""
    lines = inspect.getsource(TrainConfig).splitlines()
    defaults = TrainConfig()
    docs, section = [], ""
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("# "):
            section = stripped[2:]
            continue
        match = re.match(r"(\w+): ([^=]+?) = (.+?)(?:  # (.*))?$", stripped)
        if match and match.group(1) in FIELD_TYPES:
            name = match.group(1)
            value = getattr(defaults, name)
            docs.append(FieldDoc(name, section, match.group(2), list(value) if isinstance(value, tuple) else value,
                                 match.group(4) or ""))
    return docs


METAVARS = {"int": "N", "float": "X", "bool": "true|false", "str": "TEXT", "tuple[int, int]": "N,N",
            "tuple[int, ...]": "N,N,...", "tuple[float, ...]": "X,X,...", "tuple[str, ...]": "NAME,..."}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """A --key flag (dashes; underscores accepted) for every TrainConfig key, grouped by section, with its type,
    default and comment. Only flags given on the command line appear in the parsed namespace."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for doc in field_docs():
        group = groups.setdefault(doc.section, parser.add_argument_group(f"config: {doc.section}"))
        default = ",".join(map(str, doc.default)) if isinstance(doc.default, list) else doc.default
        group.add_argument(f"--{doc.name.replace('_', '-')}", dest=f"config.{doc.name}", default=argparse.SUPPRESS,
                           metavar=METAVARS[doc.kind], help=f"{doc.help} (default: {default!s})".replace("%", "%%"))
        if "_" in doc.name:  # --key_name works too, unlisted
            group.add_argument(f"--{doc.name}", dest=f"config.{doc.name}", default=argparse.SUPPRESS,
                               help=argparse.SUPPRESS)


def config_overrides(namespace: argparse.Namespace) -> dict:
    """The config keys given as flags: {key: text as typed}."""
    return {k.removeprefix("config."): v for k, v in vars(namespace).items() if k.startswith("config.")}


def build_config(recipe: Path | None = None, overrides: dict | None = None, base: dict | None = None) -> TrainConfig:
    """Defaults < base (a saved run's config) < recipe YAML < overrides, every value type-checked."""
    merged: dict = {}
    for layer in (base or {}, read_yaml(recipe) if recipe else {}, overrides or {}):
        check_keys(list(layer), "config")
        merged.update({k: coerce(k, v) for k, v in layer.items()})
    return TrainConfig(**merged)


# What a resumed run may change: where things are and how it reports. The rest shapes the model, the data or
# the schedule, and a resume continues exactly the run that was started.
RESUMABLE = ("output_dir", "shards", "workers", "data", "cache_dir", "cache_max_mb", "log_every", "checkpoint_every",
             "keep_checkpoints", "collective_timeout", "eval_every", "tracker", "wandb_project", "wandb_group")


def check_resume_config(started: TrainConfig, resumed: TrainConfig) -> None:
    """UserError naming the first key a resume would change that it may not (see RESUMABLE)."""
    for key in FIELD_TYPES:
        was, now = getattr(started, key), getattr(resumed, key)
        if key not in RESUMABLE and was != now:
            show = lambda v: list(v) if isinstance(v, tuple) else v
            raise UserError(f"cannot resume with {key}={show(now)!r}: the run was started with {show(was)!r}, and "
                            f"{key} shapes its model, data or schedule; resume with the run's value, or start a new run")
