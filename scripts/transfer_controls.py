"""What the fine-tuning controls and joint training do on blood-cells: collects the cross-validations below into
results/transfer-controls.json (rendered in docs/validation.md).

    python scripts/transfer_controls.py --runs RUNS [--machine "..."]

Controls: the fine-tuning recipe at 10% of each training fold's cells (18 cells, where the PBC start matters most,
results/learning-curve.json), one control changed per row, all 5 folds:

    bloodcells cv --shards SHARDS --config launch/recipes/bloodcells-finetune.yaml --output-dir RUNS/lc-pbc-0.1-NAME \
        --init-from runs/pbc-pretrain --train-fraction 0.1 --eval-every 100 FLAGS

Joint training, fold 3 (the fold the recipes disagree least on and score worst on): blood-cells and PBC in one run
(PBC at sampling weight 0.25), started from the PBC model, beside the fine-tune and best.yaml on the same fold:

    bloodcells cv --shards SHARDS,PBC_SHARDS --shard-weights 1,0.25 --cell-crop 0.667 \
        --config launch/recipes/bloodcells-finetune.yaml --init-from runs/pbc-pretrain \
        --output-dir RUNS/cv-joint-finetune --folds 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from learning_curve import short, spread  # the same rounding and naming as the learning curve's rows

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "transfer-controls.json"
FOLDS = range(5)
BASE_FLAGS = "bloodcells-finetune.yaml --init-from runs/pbc-pretrain --train-fraction 0.1"
CONTROLS = [  # (change, run folder under RUNS, flags added to the recipe)
    ("none (the recipe: features_lr 0.3, bn_refit 50, no frozen epochs)", "lc-pbc-0.1", ""),
    ("the head's learning rate for the conv blocks", "lc-pbc-0.1-flr1", "--features-lr 1.0"),
    ("the PBC BatchNorm statistics kept", "lc-pbc-0.1-norefit", "--bn-refit 0"),
    ("2 epochs with the conv blocks frozen", "lc-pbc-0.1-freeze2", "--freeze-epochs 2"),
    ("from scratch (best.yaml, 12 epochs), for scale", "lc-scratch-0.1", "best.yaml --train-fraction 0.1"),
]
JOINT_FOLD = 3


def fold_result(run: Path) -> dict | None:
    """A finished fold's validation, or None (not run, or stopped before its end)."""
    path = run / "final.json"
    if not path.is_file():
        return None
    final = json.loads(path.read_text())
    return final if final.get("finished") else None


def provenance(final: dict, machine: str) -> dict:
    p = final["provenance"]
    return {"commit": p["git_commit"][:7], "date": p["time"][:10], "machine": machine,
            "precision": short(p.get("precision", "?"))}


def controls(runs: Path, machine: str) -> list[dict]:
    rows = []
    for change, folder, flags in CONTROLS:
        finals = [fold_result(runs / folder / f"fold-{k}") for k in FOLDS]
        done = [f for f in finals if f is not None]
        if not done:
            continue
        accuracy = [f["last_validation"]["accuracy"] for f in done]
        rows.append({
            "change": change, "flags": flags,
            "folds": [round(f["last_validation"]["accuracy"], 4) if f else None for f in finals],
            "accuracy": spread(accuracy), "macro_f1": spread([f["last_validation"]["macro_f1"] for f in done]),
            "train_seconds": [round(f["train_seconds"]) for f in done],
            "command": f"bloodcells cv --shards SHARDS --config launch/recipes/"
                       f"{flags if flags.startswith('best') else BASE_FLAGS + (' ' + flags if flags else '')}"
                       f" --eval-every 100 --output-dir {folder}",
            "provenance": provenance(done[0], machine)})
    return rows


def joint(runs: Path, machine: str) -> list[dict]:
    rows = []
    cv = json.loads((REPO / "results" / "blood-cells-cv.json").read_text())
    best = next(r for r in cv["rows"] if r["recipe"].startswith("best.yaml"))
    rows.append({"run": "best.yaml from scratch (blood-cells only)", "accuracy": best["folds"][JOINT_FOLD],
                 "command": f"results/blood-cells-cv.json, row {best['recipe']!r}", "provenance": best["provenance"]})
    for name, folder, command in [
            ("fine-tune: PBC model, then blood-cells only", "cv-finetune",
             "bloodcells cv --shards SHARDS --config launch/recipes/bloodcells-finetune.yaml --init-from runs/pbc-pretrain"),
            ("joint: PBC model, then blood-cells + PBC (weight 0.25) in one run", "cv-joint-finetune",
             "bloodcells cv --shards SHARDS,PBC_SHARDS --shard-weights 1,0.25 --cell-crop 0.667 --config "
             "launch/recipes/bloodcells-finetune.yaml --init-from runs/pbc-pretrain --folds 3")]:
        final = fold_result(runs / folder / f"fold-{JOINT_FOLD}")
        if final is None:
            continue
        validation = final["last_validation"]
        rows.append({"run": name, "accuracy": round(validation["accuracy"], 4),
                     "recall": {c: round(v["recall"], 3) for c, v in validation["per_class"].items()},
                     "train_samples": final["train_samples"], "train_seconds": round(final["train_seconds"]),
                     "command": command, "provenance": provenance(final, machine)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="the folder holding the cv output folders")
    parser.add_argument("--machine", default="2-core AMD EPYC (AVX512-BF16)")
    args = parser.parse_args()
    result = {
        "title": "What the fine-tuning controls and joint training do on blood-cells",
        "about": "Controls: honest 5-fold CV of bloodcells-finetune.yaml on 10% of each training fold's cells (18 "
                 "cells), one control changed per row; the folds are best.yaml's. Joint: fold 3 of the same folds "
                 "with all its training cells, validated on blood-cells' held-out fold only.",
        "controls": controls(args.runs, args.machine),
        "joint": {"fold": JOINT_FOLD, "rows": joint(args.runs, args.machine)},
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
