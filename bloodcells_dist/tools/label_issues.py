"""Rank the training images whose given label the out-of-fold predictions of a cross-validation contradict.

    bloodcells label-issues CV_DIR [--out DIR] [--shards DIR] [--max-shown 300]
    bloodcells label-issues --predictions RUN/eval-test.predictions.csv --shards DIR --out DIR

The second form ranks held-out images scored by `bloodcells evaluate` (e.g. a test split, by a model trained on
the other splits): any predictions from a model that never saw the images will do, out-of-fold or held out.

Reads CV_DIR/oof-predictions.csv (written by `bloodcells cv`: every image's class probabilities from the fold
model that never saw it) and asks cleanlab (`cleanlab.filter.find_label_issues`, ranked by label quality, the
self-confidence) which labels look wrong. Writes, into CV_DIR (or --out):
- label-issues.csv: the flagged images, most suspect first: rank, path (in the packed source), key, group (the
  cell or patient the packer grouped it with), given label, suggested label (the predicted class), its probability,
  and the label quality (the probability of the given one);
- relabelled.csv: a listing (path,label) of every packed image, the flagged ones under their suggested label.
  Review it (edit any label back), put it in the source folder, and `bloodcells pack --src SRC/relabelled.csv`;
- label-issues.html: the flagged groups (one row per cell or patient: how many of its images are flagged) and
  the gallery (given label, suggested label, confidence), one tile per group: on a dataset of augmented copies
  (blood-cells: about 45 per cell) one mislabelled cell is one entry, not a page of its copies.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import pages
from ..cli import Parser, UserError, run_main
from ..data.stream import numbered
from ..files import write_atomic
from ..output import say
from ..pack.manifest import ShardManifest
from ..pages import Tile
from .cv import OOF_NAME
from .evaluate import read_predictions

MAX_SHOWN = 300  # flagged images shown on the page (all are in the CSV)


def find_issues(classes: list[str], rows: list[dict]) -> list[dict]:
    """The rows cleanlab flags, most suspect (lowest label quality) first, with their rank, suggested label, its
    probability and the label quality."""
    from cleanlab.filter import find_label_issues

    labels = np.array([classes.index(r["label"]) for r in rows])
    probs = np.array([r["probs"] for r in rows], dtype=np.float64)
    probs /= probs.sum(1, keepdims=True)  # the CSV's 5 decimals: rows sum to 1 within rounding, cleanlab wants exactly
    ranked = find_label_issues(labels, probs, return_indices_ranked_by="self_confidence")
    return [{**rows[i], "rank": rank, "suggested": classes[int(probs[i].argmax())],
             "suggested_probability": float(probs[i].max()), "label_quality": float(probs[i, labels[i]])}
            for rank, i in enumerate(ranked, 1)]


def shard_facts(shards: str, manifest: ShardManifest, wanted: set[str]) -> tuple[dict[str, dict], dict[str, bytes]]:
    """Every packed image's metadata (source path, class, split) by key, and the JPEG bytes of the `wanted` keys,
    in one read of the shards."""
    metas, images = {}, {}
    urls = [u for s in manifest.splits for u in manifest.shard_urls(shards, s)]
    for _, _, sample in numbered(urls):
        key = sample["__key__"]
        metas[key] = json.loads(sample["json"])
        if key in wanted:
            images[key] = sample["jpg"]
    return metas, images


def by_group(issues: list[dict], metas: dict[str, dict]) -> list[dict]:
    """The flagged images per group (cell, patient or file, as packed), most flagged first: the group, its given
    label, the most common suggestion, how many of its images are flagged out of how many, and its most suspect
    image (the first in `issues`, which is ranked)."""
    sizes = Counter(m.get("group", key) for key, m in metas.items())
    groups: dict[str, dict] = {}
    for r in issues:
        name = metas.get(r["key"], {}).get("group", r["key"])
        g = groups.setdefault(name, {"group": name, "given": r["label"], "first": r, "flagged": 0,
                                     "images": sizes.get(name, 1), "suggested": Counter()})
        g["flagged"] += 1
        g["suggested"][r["suggested"]] += 1
    return sorted(({**g, "suggested": g["suggested"].most_common(1)[0][0]} for g in groups.values()),
                  key=lambda g: (-g["flagged"], g["first"]["rank"]))


def write_csvs(out: Path, issues: list[dict], metas: dict[str, dict]) -> None:
    """label-issues.csv (the flagged images) and relabelled.csv (every packed image, the flagged ones relabelled)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["rank", "path", "key", "group", "given_label", "suggested_label", "suggested_probability",
                     "label_quality"])
    for r in issues:
        meta = metas.get(r["key"], {})
        writer.writerow([r["rank"], meta.get("path", ""), r["key"], meta.get("group", ""), r["label"], r["suggested"],
                         f"{r['suggested_probability']:.4f}", f"{r['label_quality']:.4f}"])
    write_atomic(out / "label-issues.csv", text.getvalue())
    suggested = {metas[r["key"]]["path"]: r["suggested"] for r in issues if r["key"] in metas}
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label"])
    for meta in sorted(metas.values(), key=lambda m: m["path"]):
        writer.writerow([meta["path"], suggested.get(meta["path"], meta["class_name"])])
    write_atomic(out / "relabelled.csv", text.getvalue())


def issues_page(source: str, rows: list[dict], issues: list[dict], uris: dict[str, str], metas: dict[str, dict],
                max_shown: int) -> str:
    """The flagged images as a page: a summary, the given -> suggested counts, the flagged groups, and the gallery
    (one tile per group, its most suspect image), most flagged first."""
    moves = Counter((r["label"], r["suggested"]) for r in issues)
    groups = by_group(issues, metas)
    all_groups = len({m.get("group", key) for key, m in metas.items()})
    summary = pages.table(["", "value"], [["images with out-of-fold predictions", len(rows)],
                                          ["labels flagged by cleanlab", len(issues)],
                                          ["share flagged", f"{len(issues) / max(len(rows), 1):.2%}"],
                                          ["groups (cells, patients or files) with a flagged image",
                                           f"{len(groups)} of {all_groups}"],
                                          ["packed source", source]], left=2)
    group_table = pages.table(["group", "given", "suggested (most often)", "flagged images", "most suspect"],
                              [[g["group"], g["given"], g["suggested"], f"{g['flagged']} of {g['images']}",
                                f"#{g['first']['rank']}"] for g in groups[:max_shown]], left=3)
    tiles = [Tile(uris.get(g["first"]["key"], ""), [f"#{g['first']['rank']}", f"given {g['given']}",
                                                    f"suggested {g['first']['suggested']}",
                                                    f"p = {g['first']['suggested_probability']:.3f}",
                                                    *([g["group"], f"{g['flagged']} of {g['images']} flagged"]
                                                      if g["images"] > 1 else [])],
                  metas.get(g["first"]["key"], {}).get("path", g["first"]["key"])) for g in groups[:max_shown]]
    shown = f"; the {max_shown} most flagged shown" if len(groups) > max_shown else ""
    return pages.page("label issues", [
        ("summary", "Summary", summary + "<p>relabelled.csv lists every packed image, the flagged ones under the "
         "suggested label: review it, then <code>bloodcells pack --src SRC/relabelled.csv</code>.</p>"),
        ("moves", "Given label -> suggested label", pages.table(["given", "suggested", "images"],
                                                                [[g, s, n] for (g, s), n in moves.most_common()],
                                                                left=2)),
        *([("groups", "Flagged groups, most flagged first", group_table)]
          if any(g["images"] > 1 for g in groups) else []),  # one image a group: the gallery says it all
        ("gallery", "Gallery: each flagged group's most suspect image",
         f"<p>{len(issues)} images flagged in {len(groups)} group(s){shown}; p is the probability the out-of-fold "
         "model gave the suggested label. label-issues.csv lists every flagged image.</p>" + pages.gallery(tiles))])


def main(argv: Sequence[str] | None = None) -> int:
    """Command line."""
    parser = Parser(prog="bloodcells label-issues", description=__doc__.split("\n")[0])
    parser.add_argument("cv_dir", type=Path, metavar="CV_DIR", nargs="?", help="output folder of bloodcells cv")
    parser.add_argument("--predictions", type=Path, help="a predictions CSV of bloodcells evaluate (held-out images) "
                        "instead of CV_DIR's out-of-fold one; needs --shards and --out")
    parser.add_argument("--shards", help="the cross-validated shards (default: the ones cv.json names)")
    parser.add_argument("--out", type=Path, help="folder for the CSVs and the page (default: CV_DIR)")
    parser.add_argument("--max-shown", type=int, default=MAX_SHOWN, help="flagged images shown on the page")
    args = parser.parse_args(argv)
    if (args.cv_dir is None) == (args.predictions is None):
        raise UserError("give CV_DIR (a cross-validation's output folder) or --predictions FILE, one of them")
    if args.predictions is not None and not (args.shards and args.out):
        raise UserError("--predictions needs --shards (the shards it scored) and --out (where to write)")
    oof = args.predictions or args.cv_dir / OOF_NAME
    if not oof.is_file():
        raise UserError(f"no {OOF_NAME} in {args.cv_dir}: run `bloodcells cv` (this version keeps every held-out "
                        "image's probabilities) first" if args.predictions is None else f"{oof}: no such file")
    classes, rows = read_predictions(oof)
    summary = json.loads((args.cv_dir / "cv.json").read_text()) if args.cv_dir and (args.cv_dir / "cv.json").is_file() else {}
    shards = args.shards or summary.get("out_of_fold", {}).get("shards")
    if not shards:
        raise UserError(f"{args.cv_dir}/cv.json names no shards: pass --shards")
    manifest = ShardManifest.load(shards)
    issues = find_issues(classes, rows)
    metas, images = shard_facts(shards, manifest, {r["key"] for r in issues})  # the flagged images' bytes
    groups = by_group(issues, metas)
    uris = {g["first"]["key"]: pages.thumbnail(images[g["first"]["key"]])
            for g in groups[:args.max_shown] if g["first"]["key"] in images}
    out = args.out or args.cv_dir
    out.mkdir(parents=True, exist_ok=True)
    write_csvs(out, issues, metas)
    source = str(manifest.args.get("src", "?"))
    html = issues_page(source, rows, issues, uris, metas, args.max_shown)
    write_atomic(out / "label-issues.html", html)
    say(f"{len(issues)} of {len(rows)} labels look wrong ({len(issues) / max(len(rows), 1):.1%}), in {len(groups)} "
        f"group(s); wrote "
        f"{out / 'label-issues.csv'}, {out / 'relabelled.csv'} and {out / 'label-issues.html'}")
    for g in groups[:10]:
        say(f"  {g['group']}: {g['flagged']} of {g['images']} image(s) flagged, given {g['given']}, suggested "
            f"{g['suggested']} (most suspect: #{g['first']['rank']} "
            f"{metas.get(g['first']['key'], {}).get('path', g['first']['key'])})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
