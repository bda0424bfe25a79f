"""Does `bloodcells label-issues` find wrong labels? Flip a known share of a PBC subset's labels, cross-validate,
rank, and score the flagged images against the flips.

A stratified subset of the PBC class folders is copied (under --work) into class folders, FLIP_SHARE of its
images (fixed seed) into another class drawn at random; the flips are recorded. Then `pack` (no test split),
`cv` (a small model at 64x64 on CPU) and `label-issues`. Precision and recall are measured over every flagged
image and over the top-ranked images as many as the flips (3%). Writes results/label-issues.json.

    nice -n 15 python benchmarks/bench_label_issues.py [--src /work/data/pbc] [--images 2000] [--epochs 12]
        [--recipe launch/recipes/pbc-pretrain.yaml --image-size 96,96] [--cv-args "--init-from RUN"]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bloodcells_dist.train.provenance import provenance  # noqa: E402

FLIP_SHARE = 0.03
MODEL = ["--widths", "8,16,32,32", "--hidden", "64,32", "--batch-size", "32",
         "--tracker", "none", "--mixed-precision", "no", "--workers", "1"]


def make_subset(src: Path, out: Path, images: int, seed: int) -> dict[str, tuple[str, str]]:
    """Copy a stratified subset into out/CLASS/, FLIP_SHARE of it under a wrong class: {rel path: (true, given)}."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {c: sorted(p for p in (src / c).iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and
                       not p.name.startswith(".")) for c in classes}
    total = sum(map(len, files.values()))
    chosen = [(c, p) for c in classes for p in rng.sample(files[c], round(images * len(files[c]) / total))]
    flipped = set(rng.sample(range(len(chosen)), round(FLIP_SHARE * len(chosen))))
    labels: dict[str, tuple[str, str]] = {}
    for i, (true, path) in enumerate(chosen):
        given = rng.choice([c for c in classes if c != true]) if i in flipped else true
        (out / given).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, out / given / path.name)
        labels[f"{given}/{path.name}"] = (true, given)
    return labels


def run(command: list[str]) -> None:
    """A step, echoed, that must succeed."""
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def scores(flagged: list[str], flips: set[str]) -> dict:
    """Precision and recall of the flagged paths against the flipped ones."""
    hits = len(set(flagged) & flips)
    return {"flagged": len(flagged), "correct": hits, "precision": hits / max(len(flagged), 1),
            "recall": hits / max(len(flips), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=Path("/work/data/pbc"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/report-work/label-issues"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", type=Path, help="train this recipe (e.g. launch/recipes/pbc-pretrain.yaml) "
                        "instead of the tiny 64x64 model")
    parser.add_argument("--image-size", default="64,64")
    parser.add_argument("--cv-args", default="", help="more `bloodcells cv` arguments, e.g. '--init-from RUN' "
                        "(a model that never saw these images: PBC's test split from a model of its train split)")
    args = parser.parse_args()
    model = ["--config", str(args.recipe), "--tracker", "none"] if args.recipe else MODEL
    model += ["--image-size", args.image_size, *shlex.split(args.cv_args)]
    started = time.perf_counter()
    shutil.rmtree(args.work, ignore_errors=True)
    labels = make_subset(args.src, args.work / "data", args.images, args.seed)
    flips = {p for p, (true, given) in labels.items() if true != given}
    with open(args.work / "flips.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "true", "given"], *([p, *labels[p]] for p in sorted(flips))])
    bc = [sys.executable, "-m", "bloodcells_dist"]
    shards, cv_dir = args.work / "shards", args.work / "cv"
    run([*bc, "pack", "--src", str(args.work / "data"), "--out", str(shards), "--test-fraction", "0",
         "--groups", "files", "--overwrite"])
    cv = [*bc, "cv", "--shards", str(shards), "--output-dir", str(cv_dir), *model, "--epochs", str(args.epochs)]
    run(cv)
    run([*bc, "label-issues", str(cv_dir)])
    with open(cv_dir / "label-issues.csv", newline="") as f:
        flagged = [row["path"] for row in csv.DictReader(f)]
    packed = {row["path"] for row in csv.DictReader(open(cv_dir / "relabelled.csv", newline=""))}
    flips &= packed  # a flipped file the audit excluded (a duplicate) cannot be flagged
    summary = json.loads((cv_dir / "cv.json").read_text())
    result = {
        "what": f"{len(packed)} PBC images (stratified, seed {args.seed}), {len(flips)} labels flipped "
                f"({FLIP_SHARE:.0%}); 5-fold cv of {args.recipe.name if args.recipe else 'a tiny model'} at "
                f"{args.image_size.replace(',', 'x')}, {args.epochs} epochs{' ' + args.cv_args if args.cv_args else ''}; "
                f"cleanlab find_label_issues",
        "images": len(packed), "flipped": len(flips),
        "cv_accuracy": summary["accuracy"], "all_flagged": scores(flagged, flips),
        "top_ranked": scores(flagged[:len(flips)], flips),
        "seconds": round(time.perf_counter() - started),
        "command": "nice -n 15 python benchmarks/bench_label_issues.py " + shlex.join(sys.argv[1:]),
        "cv_command": shlex.join(cv[2:]),
        "provenance": provenance(),
    }
    (REPO / "results").mkdir(exist_ok=True)
    (REPO / "results" / "label-issues.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("all_flagged", "top_ranked", "cv_accuracy", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
