"""What a trained model is, in one place: `ModelSpec`, and the one way to save and load a model.

A spec holds the network's shape (what `build()` needs, nothing to guess: the convs have no bias), its classes,
how an image is prepared for it (`Preprocess`: window, size, fit, normalisation), the dataset it was trained on,
and, beside them, the recipe and the provenance. It is written as JSON into every weights file
(`.safetensors` metadata), the Hub folder (`config.json`) and the exports, and read back from all of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from ..cli import UserError
from ..data.preprocess import MEAN, STD, Preprocess, preprocess_from
from ..files import write_atomic
from ..pack.sources import check_class_name
from .model import BloodCellCNN
from .rundir import SPEC_KEY_SINCE_0_2, WEIGHTS_KEYS_0_1, HubDir, RunDir, version_0_1

SPEC_KEY = "spec"  # the weights file's metadata key holding the spec's JSON
MODEL_TYPE = "bloodcells_cnn"
PATHS = ("shards", "output_dir", "cache_dir", "init_from")  # a recipe never carries the training machine's paths
#        (where a model started from is its own record, `init_from`)


@dataclass(frozen=True)
class ModelSpec:
    """A trained model: network shape, classes, preprocessing; dataset, recipe and provenance beside."""

    classes: tuple[str, ...]
    preprocess: Preprocess
    widths: tuple[int, ...] = (32, 64, 128, 256)  # channels of the 4 conv blocks
    hidden: tuple[int, int] = (256, 128)  # FC1 and FC2 widths; FC3 maps to the classes
    dropout: float = 0.0  # before FC2 and FC3 (inactive in eval mode)
    conv_bias: bool = False  # the design's convs have no bias: BatchNorm has one
    dataset: str = ""  # the name its shards were packed under
    recipe: dict = field(default_factory=dict)  # the TrainConfig it was trained with, without paths
    provenance: dict = field(default_factory=dict)  # code version, libraries, device, precision
    init_from: dict = field(default_factory=dict)  # the model it started from (transfer.py), {} if from scratch

    def network(self) -> dict:
        """The keyword arguments of BloodCellCNN (also the keys its Hub config.json rebuilds it from)."""
        return {"num_classes": len(self.classes), "image_size": list(self.preprocess.image_size),
                "widths": list(self.widths), "hidden": list(self.hidden), "dropout": self.dropout,
                "conv_bias": self.conv_bias}

    def build(self) -> BloodCellCNN:
        """A new network of this shape (random weights) that carries this spec: its save_pretrained and
        push_to_hub write the whole spec as config.json."""
        return BloodCellCNN(**self.network(), config=self.to_json())

    def to_json(self) -> dict:
        """Hugging Face style config: network keys at the top (from_pretrained reads them), then the rest."""
        return {"model_type": MODEL_TYPE, "architectures": ["BloodCellCNN"], "library_name": "bloodcells_dist",
                **self.network(), "classes": list(self.classes),
                "id2label": {str(i): c for i, c in enumerate(self.classes)},
                "label2id": {c: i for i, c in enumerate(self.classes)},
                "cell_crop": self.preprocess.cell_crop, "fit": self.preprocess.fit,
                "mean": list(self.preprocess.mean), "std": list(self.preprocess.std),
                "dataset": self.dataset, "training_config": self.recipe, "provenance": self.provenance,
                "init_from": self.init_from}

    @classmethod
    def from_json(cls, raw: object) -> ModelSpec:
        """A spec from to_json's output; ValueError naming what is missing or wrong (or version 0.1)."""
        if not isinstance(raw, dict):
            raise ValueError(f"the model description is a {type(raw).__name__}, not an object")
        if SPEC_KEY_SINCE_0_2 not in raw and "classes" in raw:
            raise ValueError(version_0_1(f"no {SPEC_KEY_SINCE_0_2!r} in its description"))
        classes = raw.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
            raise ValueError("classes must be a non-empty list of names")
        check_class_names(classes)
        if raw.get("num_classes", len(classes)) != len(classes):
            raise ValueError(f"num_classes {raw['num_classes']} but {len(classes)} classes")
        if "id2label" in raw and raw["id2label"] != {str(i): c for i, c in enumerate(classes)}:
            raise ValueError("id2label does not match classes (order or names)")
        if "label2id" in raw and raw["label2id"] != {c: i for i, c in enumerate(classes)}:
            raise ValueError("label2id does not match classes (order or names)")
        try:
            widths, hidden = tuple(int(w) for w in raw["widths"]), tuple(int(h) for h in raw["hidden"])
            dropout, bias = float(raw.get("dropout", 0.0)), raw.get("conv_bias", False)
        except KeyError as err:
            raise ValueError(f"no {err.args[0]!r}") from None
        except (TypeError, ValueError):
            raise ValueError("widths, hidden and dropout must be numbers") from None
        if len(widths) != 4 or len(hidden) != 2 or min(widths + hidden) < 1 or not isinstance(bias, bool):
            raise ValueError(f"widths {list(widths)} / hidden {list(hidden)} / conv_bias {bias!r} do not describe "
                             "the design (4 conv widths, 2 FC widths, all >= 1)")
        recipe, provenance, start = raw.get("training_config", {}), raw.get("provenance", {}), raw.get("init_from", {})
        if not isinstance(recipe, dict) or not isinstance(provenance, dict) or not isinstance(start, dict):
            raise ValueError("training_config, provenance and init_from must be objects")
        return cls(classes=tuple(classes), preprocess=preprocess_from(raw), widths=widths,
                   hidden=hidden, dropout=dropout, conv_bias=bias, dataset=str(raw.get("dataset", "")),
                   recipe=recipe, provenance=provenance, init_from=start)

    @classmethod
    def from_config(cls, config: dict, classes: list[str], *, dataset: str = "", provenance: dict | None = None,
                    preprocess: Preprocess | None = None) -> ModelSpec:
        """The spec of a model trained with `config` (a TrainConfig as a dict)."""
        return cls(classes=tuple(classes), preprocess=preprocess or Preprocess(
            image_size=config["image_size"], cell_crop=config.get("cell_crop", 0), fit=config.get("fit", "crop"),
            mean=MEAN, std=STD), widths=tuple(config["widths"]), hidden=tuple(config["hidden"]),
            dropout=float(config["dropout"]), dataset=dataset,
            recipe={k: v for k, v in config.items() if k not in PATHS}, provenance=provenance or {})


def check_class_names(classes: list[str]) -> None:
    """ValueError unless every class is a plain name (as pack requires: it names CSV columns and metrics) and no
    two are the same in any case (evaluate matches folder names in any case)."""
    for name in classes:
        try:
            check_class_name(name, "classes")
        except UserError as err:
            raise ValueError(str(err)) from None
    folded = [c.casefold() for c in classes]
    twice = sorted({c for c in classes if folded.count(c.casefold()) > 1})
    if twice:
        raise ValueError(f"classes name {', '.join(map(repr, twice))} more than once (in some case)")


def save_weights(model: torch.nn.Module, spec: ModelSpec, path: Path) -> None:
    """The weights with the spec in the file's metadata, written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(path, save(state, metadata={SPEC_KEY: json.dumps(spec.to_json())}))


def read_weights(path: Path) -> tuple[BloodCellCNN, ModelSpec]:
    """A weights file written by save_weights, as an eval-mode network and its spec."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if SPEC_KEY not in meta:
            raise ValueError(version_0_1("its metadata has no spec but classes apart") if
                             any(k in meta for k in WEIGHTS_KEYS_0_1) else f"no {SPEC_KEY!r} in its metadata")
        spec = ModelSpec.from_json(json.loads(meta[SPEC_KEY]))
        model = spec.build()
        model.load_state_dict(load_file(str(path)))  # strict: every weight, nothing extra
    except (ValueError, RuntimeError, OSError, SafetensorError) as err:  # JSON, shapes, missing keys, not a file
        raise UserError(f"{path} is not a usable bloodcells_dist model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return model.eval(), spec


def read_hub_folder(folder: Path) -> tuple[BloodCellCNN, ModelSpec]:
    """A Hub model folder (config.json + model.safetensors), checked before the network is built."""
    hub = HubDir(folder)
    try:
        raw = json.loads(hub.config.read_text())
        spec = ModelSpec.from_json(raw)
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type is {raw.get('model_type')!r}, not {MODEL_TYPE!r}")
        # What BloodCellCNN.from_pretrained(folder) does, but strict (every weight, nothing extra) and quiet
        # (the mixin prints to stdout, where predict may be writing its CSV).
        model = spec.build()
        model.load_state_dict(load_file(str(hub.weights)))
    except (ValueError, RuntimeError, OSError, SafetensorError) as err:
        raise UserError(f"{folder} is not a usable bloodcells_dist Hub model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return model.eval(), spec


def load_model(path: Path | str) -> tuple[BloodCellCNN, ModelSpec]:
    """An eval-mode model and its spec from a run folder (RunDir.weights), a .safetensors file, a Hub model folder,
    or a Hub repo named hf://USER/NAME (downloaded and cached by huggingface_hub): only that prefix reaches the
    Hub, so a mistyped local path is never taken for a repo id."""
    text = str(path)
    if text.startswith("hf:/"):  # hf://USER/NAME (a Path keeps one slash)
        return download_hub_model(text.removeprefix("hf:").lstrip("/"))
    path = Path(path)
    if path.is_dir() and HubDir(path).holds_model():
        return read_hub_folder(path)
    if path.is_dir():
        path = RunDir(path).weights()
    if not path.is_file():
        hint = f" (a Hub repo is named hf://{path})" if text.count("/") == 1 and not path.exists() else ""
        raise UserError(f"no model at {path}{hint}")
    return read_weights(path)


def download_hub_model(repo_id: str) -> tuple[BloodCellCNN, ModelSpec]:
    """A Hub repo's model (config.json and weights), downloaded and cached by huggingface_hub."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=list(HubDir.NAMES)))
    except Exception as err:  # offline, no such repo, no access, a malformed id: all the user's to fix
        raise UserError(f"no Hub repo {repo_id} could be downloaded ({type(err).__name__})") from None
    return read_hub_folder(folder)
