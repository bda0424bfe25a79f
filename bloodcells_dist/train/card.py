"""The model card (the Hub folder's README.md) of a ModelSpec and what was measured on its weights: written by
`hub save` (tools) and by the Hub mixin's save_pretrained (train/model.py), so it lives in the train stage."""

from __future__ import annotations

import yaml

from .spec import ModelSpec

RECIPE_KEYS = ("train_splits", "val_split", "val_fold", "image_size", "cell_crop", "fit", "epochs", "batch_size",
               "grad_accum", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs",
               "label_smoothing", "mixup", "dropout", "aug_flip", "aug_rot90", "aug_affine", "aug_color", "aug_hue",
               "aug_gain", "aug_erase", "mixed_precision", "seed")
PROVENANCE_KEYS = ("bloodcells_dist", "git_commit", "git_dirty", "torch", "device", "precision", "processes")


def model_card(spec: ModelSpec, metrics: list[dict], *, license_id: str = "mit") -> str:
    """README.md: Hub metadata, what the model is, what was measured and on which split, its recipe and
    provenance, its use and limits."""
    classes, pre = list(spec.classes), spec.preprocess
    dataset = spec.dataset or "unknown"
    recipe = {k: spec.recipe[k] for k in RECIPE_KEYS if k in spec.recipe}
    header: dict = {"library_name": "bloodcells_dist", "license": license_id, "pipeline_tag": "image-classification",
              "tags": ["image-classification", "white-blood-cells", "pytorch", "safetensors"], "datasets": [dataset]}
    if metrics:
        header["model-index"] = [{"name": "bloodcells-cnn", "results": [
            {"task": {"type": "image-classification"},
             "dataset": {"name": dataset, "type": dataset, "split": m["split"]},
             "metrics": [{"type": "accuracy", "value": round(m["accuracy"], 4)}]
             + ([{"type": "f1", "name": "macro F1", "value": round(m["macro_f1"], 4)}] if m.get("macro_f1") is not None else [])}
            for m in metrics]}]
    side = (f"{pre.cell_crop:g}x{pre.cell_crop:g}-pixel" if pre.cell_crop > 1
            else f"square ({pre.cell_crop:g} of the shorter side)")
    crop = (f" cut to the {side} window centred on the cell's stained nucleus "
            "(`bloodcells_dist.data.preprocess.cell_window`), then" if pre.cell_crop else "")
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
    origin = "\n".join(f"- {k}: {spec.provenance[k]}" for k in PROVENANCE_KEYS if k in spec.provenance) or "- not recorded"
    synthetic = (" (`bloodcells_dist`'s synthetic stand-in: a demo model, not a model of real cells)"
                 if dataset == "synthetic" else "")
    return f"""---
{yaml.safe_dump(header, sort_keys=False)}---

# White blood cell classifier (bloodcells_dist)

A small CNN trained from scratch that sorts a stained white blood cell image into one of {len(classes)} classes:
{', '.join(classes)}. The reference design: 4 x (3x3 conv without bias, BatchNorm, ReLU, 2x2 max-pool) with
widths {list(spec.widths)}, then fully connected layers {list(spec.hidden)} and the class logits.

**Input**: an RGB image{crop} resized to {pre.image_size[0]}x{pre.image_size[1]} (height x width; `fit`
{pre.fit} where the aspect differs), scaled to [0, 1] and normalised with mean {list(pre.mean)} and std
{list(pre.std)} (all in `config.json`).
**Output**: logits over the classes in `config.json`'s `classes` / `id2label` order.

```python
from bloodcells_dist.train.model import BloodCellCNN
network = BloodCellCNN.from_pretrained("THIS_REPO_OR_FOLDER")   # the network alone, from config.json
from bloodcells_dist.train.spec import load_model
model, spec = load_model("hf://THIS_REPO")  # or a folder; with spec.classes and spec.preprocess
```
or `bloodcells predict --model THIS_FOLDER images/ --out preds.csv`.

## Measured

{measured}
Accuracy on a validation split reads higher than on new cells; the validation row, where present, also chose
these weights among the epochs. Only an `evaluate` row on a held-out `test` split measures unseen cells.

## Training recipe

Dataset: "{dataset}"{synthetic}.

```yaml
{yaml.safe_dump(recipe, sort_keys=False).rstrip()}
```

{start_line(spec.init_from)} Provenance:
{origin}

## Intended use and limits

For research, teaching and benchmarking of white-blood-cell image classifiers. It has seen the staining,
microscope and cropping of "{dataset}" only; accuracy on other sources is unknown. Respect the dataset's own
licence where it differs from the model card's.

**This is not a medical device.** It is not validated for, and must not be used in, diagnosis, screening or
any clinical decision.
"""


def start_line(init_from: dict) -> str:
    """The card's sentence on where training started: from scratch, or from which model, dataset and commit."""
    if not init_from:
        return "Trained with `bloodcells_dist` (SGD, from scratch, no pretrained weights)."
    classes = init_from.get("classes", {})
    mapped = ", ".join(f"{a} as {b}" for a, b in classes.get("mapped", {}).items())
    return (f"Trained with `bloodcells_dist` (SGD). Started from the model `{init_from.get('source', '?')}`, trained "
            f"on \"{init_from.get('dataset') or 'unknown'}\" (commit {init_from.get('commit') or 'not recorded'}): "
            f"classes kept {', '.join(classes.get('kept', [])) or 'none'}"
            + (f"; mapped {mapped}" if mapped else "")
            + f"; new {', '.join(classes.get('fresh', [])) or 'none'}; dropped {', '.join(classes.get('dropped', [])) or 'none'}"
            + (f"; layers started fresh: {', '.join(init_from['fresh_layers'])}" if init_from.get("fresh_layers") else "")
            + ".")
