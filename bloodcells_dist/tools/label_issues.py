"""Rank the training images whose given label the out-of-fold predictions of a cross-validation contradict.

    bloodcells label-issues CV_DIR [--out DIR] [--shards DIR] [--max-shown 300]

Reads CV_DIR/oof-predictions.csv (written by `bloodcells cv`: every image's class probabilities from the fold
model that never saw it) and asks cleanlab (`cleanlab.filter.find_label_issues`, ranked by label quality, the
self-confidence) which labels look wrong. Writes, into CV_DIR (or --out):
- label-issues.csv: the flagged images, most suspect first: rank, path (in the packed source), key, given label,
  suggested label (the predicted class), its probability, and the label quality (the probability of the given one);
- relabelled.csv: a listing (path,label) of every packed image, the flagged ones under their suggested label.
  Review it (edit any label back), put it in the source folder, and `bloodcells pack --src SRC/relabelled.csv`;
- label-issues.html: the flagged images as a gallery (given label, suggested label, confidence).
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


def shard_facts(shards: str, manifest: ShardManifest, wanted: set[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """Every packed image's metadata (source path, class, split) by key, and the thumbnails of the `wanted` keys."""
    metas, uris = {}, {}
    urls = [u for s in manifest.splits for u in manifest.shard_urls(shards, s)]
    for _, _, sample in numbered(urls):
        key = sample["__key__"]
        metas[key] = json.loads(sample["json"])
        if key in wanted:
            uris[key] = pages.thumbnail(sample["jpg"])
    return metas, uris


def write_csvs(out: Path, issues: list[dict], metas: dict[str, dict]) -> None:
    """label-issues.csv (the flagged images) and relabelled.csv (every packed image, the flagged ones relabelled)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["rank", "path", "key", "given_label", "suggested_label", "suggested_probability", "label_quality"])
    for r in issues:
        writer.writerow([r["rank"], metas.get(r["key"], {}).get("path", ""), r["key"], r["label"], r["suggested"],
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
    """The flagged images as a page: a summary, the given -> suggested counts, the gallery most suspect first."""
    moves = Counter((r["label"], r["suggested"]) for r in issues)
    summary = pages.table(["", "value"], [["images with out-of-fold predictions", len(rows)],
                                          ["labels flagged by cleanlab", len(issues)],
                                          ["share flagged", f"{len(issues) / max(len(rows), 1):.2%}"],
                                          ["packed source", source]], left=2)
    tiles = [Tile(uris.get(r["key"], ""), [f"#{r['rank']}", f"given {r['label']}", f"suggested {r['suggested']}",
                                           f"p = {r['suggested_probability']:.3f}"],
                  metas.get(r["key"], {}).get("path", r["key"])) for r in issues[:max_shown]]
    shown = f"; the {max_shown} most suspect shown" if len(issues) > max_shown else ""
    return pages.page("label issues", [
        ("summary", "Summary", summary + "<p>relabelled.csv lists every packed image, the flagged ones under the "
         "suggested label: review it, then <code>bloodcells pack --src SRC/relabelled.csv</code>.</p>"),
        ("moves", "Given label -> suggested label", pages.table(["given", "suggested", "images"],
                                                                [[g, s, n] for (g, s), n in moves.most_common()],
                                                                left=2)),
        ("gallery", "Flagged images, most suspect first",
         f"<p>{len(issues)} flagged{shown}; p is the probability the out-of-fold model gave the suggested label.</p>"
         + pages.gallery(tiles))])


def main(argv: Sequence[str] | None = None) -> int:
    """Command line."""
    parser = Parser(prog="bloodcells label-issues", description=__doc__.split("\n")[0])
    parser.add_argument("cv_dir", type=Path, metavar="CV_DIR", help="output folder of bloodcells cv")
    parser.add_argument("--shards", help="the cross-validated shards (default: the ones cv.json names)")
    parser.add_argument("--out", type=Path, help="folder for the CSVs and the page (default: CV_DIR)")
    parser.add_argument("--max-shown", type=int, default=MAX_SHOWN, help="flagged images shown on the page")
    args = parser.parse_args(argv)
    oof = args.cv_dir / OOF_NAME
    if not oof.is_file():
        raise UserError(f"no {OOF_NAME} in {args.cv_dir}: run `bloodcells cv` (this version keeps every held-out "
                        "image's probabilities) first")
    classes, rows = read_predictions(oof)
    summary = json.loads((args.cv_dir / "cv.json").read_text()) if (args.cv_dir / "cv.json").is_file() else {}
    shards = args.shards or summary.get("out_of_fold", {}).get("shards")
    if not shards:
        raise UserError(f"{args.cv_dir}/cv.json names no shards: pass --shards")
    manifest = ShardManifest.load(shards)
    issues = find_issues(classes, rows)
    metas, uris = shard_facts(shards, manifest, {r["key"] for r in issues[:args.max_shown]})
    out = args.out or args.cv_dir
    out.mkdir(parents=True, exist_ok=True)
    write_csvs(out, issues, metas)
    source = str(manifest.args.get("src", "?"))
    html = issues_page(source, rows, issues, uris, metas, args.max_shown)
    write_atomic(out / "label-issues.html", html)
    print(f"{len(issues)} of {len(rows)} labels look wrong ({len(issues) / max(len(rows), 1):.1%}); wrote "
          f"{out / 'label-issues.csv'}, {out / 'relabelled.csv'} and {out / 'label-issues.html'}")
    for r in issues[:10]:
        print(f"  #{r['rank']} {metas.get(r['key'], {}).get('path', r['key'])}: given {r['label']}, suggested "
              f"{r['suggested']} (p = {r['suggested_probability']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
