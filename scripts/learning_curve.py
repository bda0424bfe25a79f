"""The learning curve of blood-cells: honest CV accuracy against the number of training cells, from scratch and
from the PBC model. Collects the cross-validations `bloodcells cv ... --train-fraction F` wrote, adds the 100%
points of results/blood-cells-cv.json, writes results/learning-curve.json and draws docs/img/learning-curve.png.

    python scripts/learning_curve.py --shards SHARDS --runs scratch=RUNS/lc-scratch-{f} pbc=RUNS/lc-pbc-{f} \
        --fractions 0.1,0.25 [--machine "..."]

Each RUNS folder holds one `bloodcells cv` (fold-k/final.json, cv.json); `{f}` is the fraction as given (a
folder that does not exist is said and left out: a start may have fewer points than the other). The
cells a fold trained on are counted again from the shards with the trainer's own draw (group_subset), so the
figure is what the run saw. `--plot-only` redraws the picture from the results file (what `make docs` runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "learning-curve.json"
PLOT = REPO / "docs" / "img" / "learning-curve.png"
FULL_ROWS = {"scratch": "best.yaml", "pbc": "bloodcells-finetune.yaml"}  # the 100% points, by recipe-name prefix


def shard_groups(shards: Path) -> list[tuple[str, str, int]]:
    """(group, class, fold) of every train + val sample of a shard folder, read from the tars' JSON members."""
    manifest = json.loads((shards / "manifest.json").read_text())
    out = []
    for split in ("train", "val"):
        for shard in manifest["splits"].get(split, {}).get("shards", []):
            with tarfile.open(shards / shard["file"]) as tar:
                for member in tar:
                    if member.name.endswith(".json"):
                        meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                        out.append((meta["group"], meta["class_name"], meta["fold"]))
    return out


def training_cells(samples: list[tuple[str, str, int]], fold: int, fraction: float, seed: int) -> int:
    """The number of cells fold `fold` trains on at `fraction`, drawn as the trainer draws them."""
    import torch

    from bloodcells_dist.data.selection import group_subset

    rows = [i for i, (_, _, f) in enumerate(samples) if f != fold]
    classes = sorted({c for _, c, _ in samples})
    labels = torch.tensor([classes.index(c) for _, c, _ in samples])
    kept = group_subset(torch.tensor(rows), [g for g, _, _ in samples], labels, fraction, seed)
    return len({samples[i][0] for i in kept.tolist()})


def short(precision: str) -> str:
    """`bf16 (auto: the CPU has ...)` -> `bf16 (auto)`: how the results tables name a precision."""
    return precision.split(" (auto")[0] + " (auto)" if " (auto" in precision else precision


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def collect(args: argparse.Namespace) -> dict:
    samples = shard_groups(args.shards)
    folds = sorted({f for _, _, f in samples})
    points = []
    for spec in args.runs:
        start, pattern = spec.split("=", 1)
        for fraction in args.fractions.split(","):
            runs = Path(pattern.format(f=fraction))
            if not runs.is_dir():  # a point not run (yet): said, and left out of the curve
                print(f"note: no {runs}: the curve has no point for {start} at {fraction}")
                continue
            finals = [json.loads((runs / f"fold-{k}" / "final.json").read_text()) for k in folds]
            if not all(f.get("finished") for f in finals):
                raise SystemExit(f"error: {runs}: not every fold finished")
            config = (runs / "fold-0" / "config.yaml").read_text()
            seed = next((int(line.split(":")[1]) for line in config.splitlines() if line.startswith("seed:")), 0)
            accuracy = [f["last_validation"]["accuracy"] for f in finals]
            points.append({
                "start": start, "fraction": float(fraction),
                "cells": [training_cells(samples, k, float(fraction), seed) for k in folds],
                "samples": [f["train_samples"] for f in finals],
                "steps": [f["steps"] for f in finals], "epochs": finals[0]["epochs"],
                "folds": [round(a, 4) for a in accuracy], "accuracy": spread(accuracy),
                "macro_f1": spread([f["last_validation"]["macro_f1"] for f in finals]),
                "monocyte_recall": spread([f["last_validation"]["per_class"]["MONOCYTE"]["recall"] for f in finals]),
                "command": f"bloodcells cv --shards SHARDS --config launch/recipes/{FULL_ROWS[start]} --output-dir {runs.name}"
                           f" --train-fraction {fraction} --eval-every 100"
                           + (" --init-from runs/pbc-pretrain" if start == "pbc" else ""),
                "provenance": {"commit": finals[0]["provenance"]["git_commit"][:7], "date": finals[0]["provenance"]["time"][:10],
                               "machine": args.machine, "precision": short(finals[0]["provenance"].get("precision", "?"))},
            })
    cv = json.loads((REPO / "results" / "blood-cells-cv.json").read_text())
    for start, recipe in FULL_ROWS.items():
        row = next(r for r in cv["rows"] if r["recipe"].startswith(recipe))
        done = [f for f in row["folds"] if f is not None]
        points.append({"start": start, "fraction": 1.0, "cells": [training_cells(samples, k, 1.0, 0) for k in folds],
                       "folds": row["folds"], "accuracy": spread(done), "macro_f1": row["macro_f1"], "epochs": row["epochs"],
                       "command": f"results/blood-cells-cv.json, row {row['recipe']!r}", "provenance": row["provenance"]})
    return {"title": "blood-cells: honest 5-fold CV accuracy against the training cells of each fold",
            "about": "The fine-tuning recipe (from runs/pbc-pretrain) and best.yaml (from scratch) on a seeded share of "
                     "each training fold's recovered cells (train_fraction: a share of every class's cells, at least "
                     "one; the smaller share a subset of the larger), validated on the whole held-out fold. The "
                     "recipes' epochs are kept, so fewer cells also means fewer steps, as a lab running the recipe "
                     "on its own set would get.",
            "points": sorted(points, key=lambda p: (p["start"], p["fraction"]))}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    labels = {"scratch": "from scratch (best.yaml)", "pbc": "from the PBC model (bloodcells-finetune.yaml)"}
    for start, marker in (("scratch", "o"), ("pbc", "s")):
        points = [p for p in data["points"] if p["start"] == start]
        x = [statistics.fmean(p["cells"]) for p in points]
        ax.errorbar(x, [100 * p["accuracy"]["mean"] for p in points], yerr=[100 * p["accuracy"]["std"] for p in points],
                    marker=marker, capsize=3, label=labels[start])
        for xi, p in zip(x, points):
            ax.scatter([xi] * sum(f is not None for f in p["folds"]), [100 * f for f in p["folds"] if f is not None],
                       s=8, alpha=0.35, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ticks = sorted({round(statistics.fmean(p["cells"])) for p in data["points"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training cells per fold (mean over the 5 folds; log scale)")
    ax.set_ylabel("honest CV accuracy (%)")
    ax.set_title("blood-cells: how many cells does a model need?", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path)
    parser.add_argument("--runs", nargs="*", default=[], help="START=PATTERN with {f} for the fraction")
    parser.add_argument("--fractions", default="0.1,0.25")
    parser.add_argument("--machine", default="2-core AMD EPYC (AVX512-BF16)")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if not args.plot_only:
        RESULTS.write_text(json.dumps(collect(args), indent=1) + "\n")
        print(f"wrote {RESULTS}")
    plot(json.loads(RESULTS.read_text()), PLOT)
    print(f"wrote {PLOT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
