"""A trained model as a Hugging Face Hub model folder: config.json, model.safetensors and a model card.

    python -m bloodcells_dist.hub save --model RUN_OR_FILE --out DIR [--overwrite]
    python -m bloodcells_dist.hub push DIR --repo-id USER/NAME [--private]      # needs `hf auth login`

`from_pretrained(DIR or "USER/NAME")` rebuilds the model from the folder alone (no file of the run folder,
no code of the run); `predict`, `evaluate` and `export` take such a folder as `--model`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__
from .checkpoint import BEST_NAME, load_model, save_model
from .cli import UserError, run_main
from .model import BloodCellCNN
from .transforms import preprocess_from

CONFIG_NAME = "config.json"  # the Hub's names (huggingface_hub.constants.CONFIG_NAME / SAFETENSORS_SINGLE_FILE)
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
MODEL_TYPE = "bloodcells_cnn"


def is_hub_folder(path: Path) -> bool:
    """Whether `path` is a folder written by save_pretrained (or downloaded from the Hub)."""
    return (Path(path) / CONFIG_NAME).is_file() and (Path(path) / WEIGHTS_NAME).is_file()


def hub_config(meta: dict) -> dict:
    """config.json: architecture, widths, classes, image size, normalisation; the training recipe beside them."""
    classes = meta["classes"]
    return {
        "architectures": ["BloodCellCNN"],
        "model_type": MODEL_TYPE,
        "library_name": "bloodcells_dist",
        "bloodcells_dist_version": __version__,
        "num_classes": len(classes),
        "classes": classes,
        "id2label": {str(i): c for i, c in enumerate(classes)},
        "label2id": {c: i for i, c in enumerate(classes)},
        "image_size": meta["image_size"],  # [height, width] the image is resized to
        "cell_crop": meta["cell_crop"],  # >0: first a square window centred on the nucleus (pixels, or <= 1: share of the shorter side)
        "fit": meta["fit"],  # crop | pad | stretch: how the image meets image_size when the aspects differ
        "mean": meta["mean"],  # per RGB channel, applied to pixels scaled to [0, 1]
        "std": meta["std"],
        "widths": meta["model"]["widths"],  # channels of the 4 conv blocks
        "hidden": meta["model"]["hidden"],  # FC1 and FC2 widths
        "dropout": meta["model"]["dropout"],
        "dataset": meta.get("dataset", ""),  # the name its shards were packed under
        # The recipe, without this machine's paths.
        "training_config": {k: v for k, v in meta.get("config", {}).items() if k not in ("shards", "output_dir")},
    }


def measured_metrics(model_path: Path, meta: dict) -> list[dict]:
    """What was measured on these weights, each with its split: the run's validation at the kept epoch
    (final.json) and every `evaluate` result written beside them (eval-*.json)."""
    weights = model_path / BEST_NAME if model_path.is_dir() else model_path
    run = weights.parent
    def entry(split: str, source: str, record: dict) -> dict:
        return {"split": split, "source": source, "samples": record.get("samples"), "accuracy": record["accuracy"],
                "macro_f1": record.get("macro_f1"), "per_class": record.get("per_class", {})}

    found = []
    final = run / "final.json"
    config = meta.get("config", {})
    if final.is_file() and config.get("val_split"):
        summary = json.loads(final.read_text())
        record = summary.get("best" if weights.name == BEST_NAME else "final") or {}
        fold = config.get("val_fold", -1)
        if "accuracy" in record:
            found.append(entry(config["val_split"] + (f" (fold {fold})" if fold is not None and fold >= 0 else ""),
                               "validation during training" + (
                                   f", epoch {record['epoch']} (chose these weights: optimistic)"
                                   if "epoch" in record else ""), record))
    for path in sorted(run.glob("eval-*.json")):
        record = json.loads(path.read_text())
        if not isinstance(record.get("model", ""), str):
            continue  # an ensemble's score (a list of models) is not this model's
        scored = Path(record.get("model", ""))  # as typed, maybe relative: compare the weights' file names
        scored_name = scored.name if scored.suffix == ".safetensors" else BEST_NAME
        if "accuracy" not in record or scored_name != weights.name:
            continue  # an evaluation of other weights (e.g. last.safetensors)
        fold = record.get("fold")
        found.append(entry(record.get("split", "?") + (f" (fold {fold})" if fold is not None else ""),
                           f"`evaluate`{' with TTA' if record.get('tta') else ''} ({path.name})", record))
    return found


def model_card(config: dict, metrics: list[dict]) -> str:
    """README.md: Hub metadata, what the model is, its recipe, what was measured and on which split, its use."""
    train = config["training_config"]
    recipe_keys = ("train_splits", "val_split", "val_fold", "image_size", "cell_crop", "fit", "epochs", "batch_size",
                   "grad_accum", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs",
                   "label_smoothing", "mixup", "dropout", "aug_flip", "aug_rot90", "aug_affine", "aug_color", "aug_hue",
                   "aug_gain", "aug_erase", "mixed_precision", "seed")
    recipe = {k: train[k] for k in recipe_keys if k in train}
    dataset = config.get("dataset") or "unknown"
    header = {
        "library_name": "bloodcells_dist",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "white-blood-cells", "pytorch", "safetensors"],
    }
    if metrics:
        header["model-index"] = [{"name": "bloodcells-cnn", "results": [
            {"task": {"type": "image-classification"},
             "dataset": {"name": dataset, "type": dataset, "split": m["split"]},
             "metrics": [{"type": "accuracy", "value": round(m["accuracy"], 4)}]
             + ([{"type": "f1", "name": "macro F1", "value": round(m["macro_f1"], 4)}] if m.get("macro_f1") is not None else [])}
            for m in metrics]}]
    classes = config["classes"]
    side = config.get("cell_crop") or 0
    side = f"{side:g}x{side:g}-pixel" if side > 1 else f"square ({side:g} of the shorter side)"
    crop = (f" cropped to the {side} window centred on the cell's stained nucleus "
            "(`bloodcells_dist.transforms.cell_window`), then" if config.get("cell_crop") else "")
    if metrics:
        rows = "\n".join(
            f"| {m['split']} | {m['source']} | {m['samples'] if m['samples'] is not None else ''} | {m['accuracy']:.4f} | "
            f"{'' if m.get('macro_f1') is None else format(m['macro_f1'], '.4f')} | "
            + " | ".join(f"{m['per_class'].get(c, {}).get('recall', float('nan')):.3f}" for c in classes) + " |"
            for m in metrics)
        measured = (f"| split | measured by | images | accuracy | macro F1 | {' | '.join(f'recall {c}' for c in classes)} |\n"
                    f"|---|---|---|---|---|{'---|' * len(classes)}\n{rows}\n")
    else:
        measured = "Nothing was measured on these weights before they were saved (no final.json or eval-*.json).\n"
    return f"""---
{yaml.safe_dump(header, sort_keys=False)}---

# White blood cell classifier (bloodcells_dist)

A small CNN trained from scratch that sorts a stained white blood cell image into one of {len(classes)} classes:
{', '.join(classes)}. The reference design: 4 x (3x3 conv, BatchNorm, ReLU, 2x2 max-pool) with widths
{config['widths']}, then fully connected layers {config['hidden']} and the class logits.

**Input**: an RGB image{crop} resized to {config['image_size'][0]}x{config['image_size'][1]} (height x width; `fit`
{config.get('fit', 'stretch')} where the aspect differs), scaled to
[0, 1] and normalised with mean {config['mean']} and std {config['std']} (all in `config.json`).
**Output**: logits over the classes in `config.json`'s `classes` / `id2label` order.

```python
from bloodcells_dist.hub import from_pretrained
model, meta = from_pretrained("THIS_REPO_OR_FOLDER")    # eval mode; meta holds classes, image_size, cell_crop, mean, std
```
or `python -m bloodcells_dist.predict --model THIS_FOLDER images/ --out preds.csv`.

## Measured

{measured}
Accuracy on a split of TRAIN (validation) reads higher than on new cells; the validation row, where
present, also chose these weights among the epochs. Only an `evaluate` row on `test` measures held-out cells.

## Training recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False).rstrip()}
```

Trained with `bloodcells_dist` {config.get('bloodcells_dist_version', '')} (SGD, from scratch, no pretrained weights).

## Intended use and limits

For research, teaching and benchmarking of white-blood-cell image classifiers. Trained on the dataset
"{dataset}"{" (`bloodcells_dist`'s synthetic stand-in: a demo model, not a model of real cells)" if dataset == "synthetic" else ""};
it has seen that dataset's staining, microscope and cropping only; accuracy on other sources is unknown.

**This is not a medical device.** It is not validated for, and must not be used in, diagnosis, screening or
any clinical decision.
"""


def save_pretrained(model_path: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Write the Hub folder for a run folder's best weights (or a .safetensors file) into `out`."""
    model_path, out = Path(model_path), Path(out)
    model, meta = load_model(model_path)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty; pass --overwrite to replace it")
        for name in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    config = hub_config(meta)
    save_model(model, out / WEIGHTS_NAME, classes=meta["classes"], config=meta.get("config") or {
        "image_size": meta["image_size"], "cell_crop": meta["cell_crop"], "fit": meta["fit"], **meta["model"]},
        dataset=meta.get("dataset", ""), mean=meta["mean"], std=meta["std"])
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    (out / CARD_NAME).write_text(model_card(config, measured_metrics(model_path, meta)))
    return out


def from_pretrained(name_or_path: str | Path, *, revision: str | None = None, cache_dir: str | None = None
                    ) -> tuple[BloodCellCNN, dict]:
    """The model (eval mode) and its metadata from a Hub folder, or a Hub repo id (downloaded and cached)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        if "://" in str(name_or_path) or str(name_or_path).count("/") > 1 or folder.suffix:
            raise UserError(f"{name_or_path} is neither a model folder nor a Hub repo id (USER/NAME)")
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(str(name_or_path), revision=revision, cache_dir=cache_dir,
                                            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]))
        except Exception as err:  # offline, no such repo, no access: all the user's to fix
            raise UserError(f"cannot download {name_or_path} from the Hub ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not is_hub_folder(folder):
        raise UserError(f"{folder} has no {CONFIG_NAME} and {WEIGHTS_NAME}: not a saved Hub model folder")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        if not isinstance(config, dict):
            raise ValueError(f"{CONFIG_NAME} holds a {type(config).__name__}, not an object")
        if config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}")
        check_labels(config)
        preprocess_from(config, legacy_fit="stretch")
        model = BloodCellCNN(num_classes=len(config["classes"]), image_size=config["image_size"],
                             widths=config["widths"], hidden=config["hidden"], dropout=config["dropout"])
        model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))  # strict: every weight, nothing extra
    except (KeyError, ValueError, TypeError, RuntimeError, OSError, SafetensorError) as err:
        raise UserError(f"{folder} is not a bloodcells_dist Hub model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0]})") from None
    meta = {"classes": config["classes"], "image_size": config["image_size"], "cell_crop": config.get("cell_crop", 0),
            "fit": config.get("fit", "stretch"), "mean": config["mean"], "std": config["std"],
            "model": {k: config[k] for k in ("widths", "hidden", "dropout")},
            "config": config.get("training_config", {}), "dataset": config.get("dataset", "")}
    return model.eval(), meta


def check_labels(config: dict) -> None:
    """ValueError unless classes, num_classes, id2label and label2id tell the same class order."""
    classes = config["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ValueError("classes must be a non-empty list of names")
    if "num_classes" in config and config["num_classes"] != len(classes):
        raise ValueError(f"num_classes {config['num_classes']} but {len(classes)} classes")
    if "id2label" in config and config["id2label"] != {str(i): c for i, c in enumerate(classes)}:
        raise ValueError("id2label does not match classes (order or names)")
    if "label2id" in config and config["label2id"] != {c: i for i, c in enumerate(classes)}:
        raise ValueError("label2id does not match classes (order or names)")


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload a saved Hub folder to `repo_id` (created if needed) in one commit; return the commit URL."""
    if not is_hub_folder(folder):
        raise UserError(f"{folder} is not a saved Hub model folder (run `python -m bloodcells_dist.hub save` first)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                             allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
                             commit_message="Upload bloodcells_dist model")
    return str(getattr(info, "commit_url", info))


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `save` a run as a Hub folder, `push` a Hub folder."""
    parser = argparse.ArgumentParser(prog="python -m bloodcells_dist.hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    save = sub.add_parser("save", help="write config.json, model.safetensors and README.md for a trained model")
    save.add_argument("--model", type=Path, required=True, help="run folder (uses best.safetensors) or .safetensors file")
    save.add_argument("--out", type=Path, required=True, help="folder to write")
    save.add_argument("--overwrite", action="store_true", help="replace the files of an earlier save in --out")
    push = sub.add_parser("push", help="upload a saved folder to the Hugging Face Hub (needs `hf auth login` or HF_TOKEN)")
    push.add_argument("dir", type=Path)
    push.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME")
    push.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "save":
        out = save_pretrained(args.model, args.out, overwrite=args.overwrite)
        print(f"wrote {out / CONFIG_NAME}, {out / WEIGHTS_NAME} and {out / CARD_NAME}; "
              f"push it with: python -m bloodcells_dist.hub push {out} --repo-id USER/NAME")
    else:
        try:
            url = push_to_hub(args.dir, args.repo_id, private=args.private)
        except UserError:
            raise
        except Exception as err:  # no login, no network, no permission
            raise UserError(f"push to {args.repo_id} failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        print(f"pushed {args.dir} to https://huggingface.co/{args.repo_id} ({url})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
