"""Start from a trained model (`init_from`): its weights, class rows matched by name, and the fine-tuning controls.

    source -> (weights, spec)        a run folder, a Hub folder, a .safetensors file, or a .pt2 / .pt export
    match_classes(...)               which output row of the source each class of this run takes (or a fresh one)
    transfer_weights(...)            copy what fits into a freshly built network; say what was kept and why
    refit_batchnorm(...)             BatchNorm running statistics re-estimated on the new training data
    optimizer_groups(...)            the feature layers at features_lr x the head's learning rate
    feature_parameters(...)          the conv blocks' parameters, held still for the first freeze_epochs epochs

Everything here runs once, before the first step (a resumed run gets its weights from its checkpoint), except
the freeze, which is a pure function of the epoch, so a resumed run freezes and thaws where the uninterrupted
one does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..cli import UserError
from ..output import warn
from .rundir import HubDir, RunDir
from .spec import ModelSpec, load_model

EXPORT_SUFFIXES = (".pt2", ".pt")  # torch.export and TorchScript exports keep the module's parameter names
FC3 = "classifier.7"  # the logits layer: one row per class (model.py)
FC1 = "classifier.1"  # its input size follows the image size


@dataclass(frozen=True)
class ClassMatch:
    """For each class of this run, the source row it starts from (None: a fresh row); and what was done."""

    rows: tuple[int | None, ...]
    kept: tuple[str, ...]  # same name (case aside)
    mapped: tuple[tuple[str, str], ...]  # (source name, this run's name) through class_map
    fresh: tuple[str, ...]  # no source class: a new row
    dropped: tuple[str, ...]  # source classes this run does not have

    def line(self) -> str:
        """What was kept, mapped, started fresh and dropped, in one line."""
        show = lambda names: f" ({', '.join(names)})" if names else ""
        return (f"kept {len(self.kept)}{show(self.kept)}, mapped {len(self.mapped)}"
                f"{show([f'{a}->{b}' for a, b in self.mapped])}, fresh {len(self.fresh)}{show(self.fresh)}, "
                f"dropped {len(self.dropped)}{show(self.dropped)}")

    def record(self) -> dict:
        """What the spec and the model card keep of it."""
        return {"kept": list(self.kept), "mapped": {a: b for a, b in self.mapped}, "fresh": list(self.fresh),
                "dropped": list(self.dropped)}


def parse_class_map(entries: Sequence[str]) -> dict[str, str]:
    """class_map entries "source=this" -> {source name: this run's name}; UserError for a malformed entry."""
    mapping: dict[str, str] = {}
    for entry in entries:
        source, sep, target = entry.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise UserError(f"config class_map entry {entry!r}: expected SOURCE=NEW, e.g. neutrophil=NEUTROPHIL")
        if source.strip().casefold() in {k.casefold() for k in mapping}:
            raise UserError(f"config class_map maps {source.strip()!r} twice")
        mapping[source.strip()] = target.strip()
    return mapping


def match_classes(source: Sequence[str], target: Sequence[str], class_map: dict[str, str]) -> ClassMatch:
    """Each target class takes the source row of the same name (case-insensitive) or the one class_map maps to
    it. Two source classes for one target, or a class_map naming a class neither side has, is a UserError."""
    by_name = {name.casefold(): i for i, name in enumerate(source)}
    targets = {name.casefold(): name for name in target}
    wanted: dict[str, tuple[int, str]] = {}  # target (casefolded) -> (source row, how)
    for old, new in class_map.items():
        if old.casefold() not in by_name:
            raise UserError(f"config class_map {old}={new}: the source model has no class {old!r} "
                            f"(it has {', '.join(source)})")
        if new.casefold() not in targets:
            raise UserError(f"config class_map {old}={new}: this run's data has no class {new!r} "
                            f"(it has {', '.join(target)})")
        if new.casefold() in wanted:
            raise UserError(f"config class_map maps two source classes to {new!r}")
        wanted[new.casefold()] = (by_name[old.casefold()], "mapped")
    mapped_sources = {row for row, _ in wanted.values()}
    for name in target:
        key = name.casefold()
        if key not in wanted and key in by_name and by_name[key] not in mapped_sources:
            wanted[key] = (by_name[key], "kept")
    rows = tuple(wanted[n.casefold()][0] if n.casefold() in wanted else None for n in target)
    used = {r for r in rows if r is not None}
    return ClassMatch(rows=rows,
                      kept=tuple(n for n in target if wanted.get(n.casefold(), (0, ""))[1] == "kept"),
                      mapped=tuple((source[wanted[n.casefold()][0]], n) for n in target
                                   if wanted.get(n.casefold(), (0, ""))[1] == "mapped"),
                      fresh=tuple(n for n, r in zip(target, rows) if r is None),
                      dropped=tuple(s for i, s in enumerate(source) if i not in used))


def read_source(path: str) -> tuple[dict[str, torch.Tensor], ModelSpec]:
    """The source model's weights (a state dict) and spec: a run folder, a Hub folder, a .safetensors file, or a
    .pt2 / .pt export. Anything else (an ONNX file, a folder that is not a model) is a UserError in one line."""
    where = Path(path)
    if not where.exists():
        raise UserError(f"config init_from {path}: no such file or folder")
    if where.is_file() and where.suffix in EXPORT_SUFFIXES:
        from ..tools.export import load_exported

        exported, spec = load_exported(where)
        if not isinstance(exported, nn.Module):
            raise UserError(f"config init_from {path}: this export keeps no weights to start from")
        return {k: v.detach().clone() for k, v in exported.state_dict().items()}, spec
    if where.is_file() and where.suffix == ".onnx":
        raise UserError(f"config init_from {path}: an ONNX export cannot be trained further; start from the run "
                        "folder, the Hub folder, its .safetensors, or a .pt2 / .pt export")
    if where.is_dir() and not (HubDir(where).config.exists() or RunDir(where).weights().exists()):
        raise UserError(f"config init_from {path}: not a model (a run folder has last.safetensors, a Hub folder "
                        "config.json and model.safetensors)")
    try:
        model, spec = load_model(where)
    except UserError as err:
        raise UserError(f"config init_from: {err}") from None
    return model.state_dict(), spec


def transfer_weights(model: nn.Module, spec: ModelSpec, source_state: dict[str, torch.Tensor], source: ModelSpec,
                     class_map: dict[str, str]) -> tuple[ClassMatch, list[str]]:
    """Copy the source's weights into `model` (freshly built, seeded): the conv blocks and FC2 must have the
    same shapes (else a UserError: another architecture); FC1 is kept when the image size gives it the same
    input; FC3's rows follow the class match, new classes keep their fresh rows. Returns the match and the
    layers that started fresh."""
    if tuple(source.widths) != tuple(spec.widths) or tuple(source.hidden) != tuple(spec.hidden):
        raise UserError(f"config init_from: another architecture (conv widths {list(source.widths)}, FC widths "
                        f"{list(source.hidden)}; this run has {list(spec.widths)}, {list(spec.hidden)}): set widths "
                        "and hidden as the source's")
    match = match_classes(source.classes, spec.classes, class_map)
    own = model.state_dict()
    missing = sorted(set(own) - set(source_state))
    if missing:
        raise UserError(f"config init_from: the source has no {missing[0]} (another architecture)")
    fresh_layers, loaded = [], {}
    for name, tensor in own.items():
        weights = source_state[name]
        if name.startswith(FC3):
            rows = weights.to(tensor.dtype)
            new = tensor.clone()
            for i, row in enumerate(match.rows):
                if row is not None:
                    new[i] = rows[row]
            loaded[name] = new
        elif weights.shape == tensor.shape:
            loaded[name] = weights.to(tensor.dtype)
        elif name.startswith(FC1):
            loaded[name] = tensor
            if name.endswith("weight"):
                fresh_layers.append("FC1")
        else:
            raise UserError(f"config init_from: {name} is {list(weights.shape)} in the source and "
                            f"{list(tensor.shape)} here (another architecture)")
    model.load_state_dict(loaded)
    return match, fresh_layers


def preprocessing_differences(source: ModelSpec, spec: ModelSpec) -> list[str]:
    """How this run prepares images differently from the source model (size, window, fit, normalisation)."""
    a, b = source.preprocess, spec.preprocess
    pairs = {"image_size": (list(a.image_size), list(b.image_size)), "cell_crop": (a.cell_crop, b.cell_crop),
             "fit": (a.fit, b.fit), "mean": (list(a.mean), list(b.mean)), "std": (list(a.std), list(b.std))}
    return [f"{k} {was} -> {now}" for k, (was, now) in pairs.items() if was != now]


def start_from(model: nn.Module, spec: ModelSpec, path: str, class_map_entries: Sequence[str],
               loaded: tuple[dict[str, torch.Tensor], ModelSpec] | None = None) -> tuple[dict, str]:
    """Load the source (or the already `loaded` read_source of it) into `model`; (the record the spec keeps, the
    line the run prints). Warns, in one line, when this run prepares images otherwise than the source did."""
    state, source = loaded or read_source(path)
    match, fresh_layers = transfer_weights(model, spec, state, source, parse_class_map(class_map_entries))
    changed = preprocessing_differences(source, spec)
    if changed:
        warn(f"init_from {path}: this run prepares images otherwise than the source model did "
             f"({'; '.join(changed)}): its features were learnt on other inputs")
    record = {"source": str(path), "dataset": source.dataset, "classes": match.record(),
              "fresh_layers": fresh_layers, "preprocessing_changed": changed,
              "commit": source.provenance.get("git_commit", source.provenance.get("commit", "")),
              "source_classes": list(source.classes)}
    fresh = f"; fresh layers: {', '.join(fresh_layers)}" if fresh_layers else ""
    line = (f"init_from {path} (dataset {source.dataset or 'unknown'}, {len(source.classes)} classes): "
            f"{match.line()}{fresh}")
    return record, line


@torch.no_grad()
def refit_batchnorm(features: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int) -> int:
    """Re-estimate the BatchNorm running statistics of `features` as the plain average over `count` batches of
    the new training data (the source's statistics describe the source's images). Returns the batches used."""
    norms = [m for m in features.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
        m.train()
    used = 0
    for images, _ in batches:
        if used == count:
            break
        features(images)
        used += 1
    for m, (momentum, training) in zip(norms, saved):
        m.momentum = momentum
        m.train(training)
    return used


def optimizer_groups(model: nn.Module, features_lr: float) -> list[dict]:
    """Parameter groups: the conv blocks at features_lr x the learning rate, the fully connected head at 1 x.
    (One group when features_lr is 1: the optimizer state then has the layout of every earlier run.)"""
    if features_lr == 1.0:
        return [{"params": list(model.parameters()), "lr_scale": 1.0}]
    features = [p for n, p in model.named_parameters() if n.startswith("features.")]
    head = [p for n, p in model.named_parameters() if not n.startswith("features.")]
    return [{"params": features, "lr_scale": features_lr}, {"params": head, "lr_scale": 1.0}]


def feature_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The conv blocks' parameters (what freeze_epochs holds still)."""
    return [p for n, p in model.named_parameters() if n.startswith("features.")]

