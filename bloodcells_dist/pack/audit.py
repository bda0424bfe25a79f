"""Audit a dataset before it is packed: unreadable files, exact and near duplicates, label conflicts, sizes, balance.

    bloodcells audit --src ROOT_OR_LISTING [--out audit.json] [--html audit.html] [--layout auto] [--workers 2]

`pack` runs the same audit and applies its policy (`apply_policy`); the standalone command only reports:
- exact duplicates (same sha256) within a class: one copy is kept (the first by path), the others are listed;
- a label conflict (the same bytes under two classes): every copy on the training side is excluded;
- a file and its exact duplicate never sit in two splits: a copy in a test split the data gives wins, and
  the training-side copies are excluded. Test splits the data gives are never edited, only reported;
- near duplicates (perceptual hash within NEAR_BITS of 64 bits under one of the 8 rotations by 90 degrees and
  flips, e.g. a re-encoded, resized, rotated or mirrored copy) are reported; with `--groups files` those within a
  class share a group, so no split separates them. Across classes a near pair must also look alike pixel by
  pixel (NEAR_PIXELS), and is then a label conflict like an exact one: every training-side copy is excluded.
"""

from __future__ import annotations

import hashlib
import io
import random
import statistics
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn

from ..cli import Parser, UserError, output_file_in_folder, run_main
from ..files import write_atomic, write_json
from ..output import say
from ..progress import progress
from .sources import EVAL_SPLITS, Scan, Skipped, SourceImage, check_jpeg, scan_images

NEAR_BITS = 4  # near duplicates: re-saved copies in PBC were 2-4 bits apart; distinct cells 6 or more (most 14-18)
NEAR_PIXELS = 4.0  # mean |grey difference| (0-255) of two aligned 32x32 thumbnails confirming a pair across classes:
#                   re-encoded (q40), halved, rotated or mirrored Kaggle frames 0.2-0.6; the 405 Kaggle TRAIN pairs
#                   across classes within NEAR_BITS, distinct frames all, 14 or more
MAX_LISTED = 1000  # near-duplicate pairs listed in the JSON report (all are counted)
AUDIT_PAGE = "audit.html"  # the audit as a page, beside pack's audit.json
PAGE_LISTED = 100  # duplicate sets, near pairs and label conflicts shown with their images on the page
SAMPLES_PER_CLASS = 12  # random images per class on the page (a fixed seed: the same page for the same data)


@dataclass(frozen=True)
class ImageFacts:
    """What the audit knows of one readable image."""

    image: SourceImage
    width: int
    height: int
    sha256: str
    phash: int  # 64-bit DCT perceptual hash of the grey image
    phashes: tuple[int, ...] = ()  # the hashes of its 8 rotations and flips (DIHEDRAL order; the first is phash)
    thumb: bytes = b""  # the 32x32 grey image the hashes are of, to confirm a near pair pixel by pixel


def dihedral(square: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations by 90 degrees and flips of a square array, the array itself first."""
    return [np.rot90(a, k) for a in (square, square.T) for k in range(4)]


def grey_thumb(data: bytes) -> np.ndarray:
    """The 32x32 grey image (uint8) the perceptual hashes are of."""
    with Image.open(io.BytesIO(data)) as image:
        image.draft("L", (64, 64))  # JPEG: decode at 1/2..1/8 scale, much faster than a full decode
        return np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BILINEAR))


def hash_bits(low: np.ndarray) -> int:
    """64 bits: which of the 8x8 lowest DCT frequencies lie above their median."""
    low = low.ravel()
    return int(np.packbits(low > np.median(low[1:])).view(">u8")[0])  # the DC term only says how bright it is


def phash_of(grey: np.ndarray) -> int:
    """64-bit pHash: the signs of the 8x8 lowest DCT frequencies of a 32x32 grey image against their median."""
    return hash_bits(dctn(grey.astype(np.float64), norm="ortho")[:8, :8])


def dihedral_hashes(grey: np.ndarray) -> tuple[int, ...]:
    """phash_of each of dihedral(grey), from one DCT: turning the image by 90 degrees transposes its DCT and
    flips the sign of the odd frequencies along one axis (exactly, for the orthonormal DCT-II)."""
    low = dctn(grey.astype(np.float64), norm="ortho")[:8, :8]
    odd = (-1.0) ** np.arange(8)
    def rot90(c: np.ndarray) -> np.ndarray:  # np.rot90 is a transpose, then rows reversed
        return c.T * odd[:, None]
    turned = []
    for c in (low, low.T):
        for _ in range(4):
            turned.append(hash_bits(c))
            c = rot90(c)
    return tuple(turned)


def perceptual_hash(data: bytes) -> int:
    """64-bit pHash of an image's bytes (see phash_of)."""
    return phash_of(grey_thumb(data))


def image_facts(image: SourceImage) -> ImageFacts | Skipped:
    """Read and decode-check one image: its facts, or why it is skipped (a non-image, a corrupt JPEG...)."""
    try:
        data = image.path.read_bytes()
        width, height = check_jpeg(data)
        grey = grey_thumb(data)
        hashes = dihedral_hashes(grey)
        return ImageFacts(image, width, height, hashlib.sha256(data).hexdigest(), hashes[0], hashes, grey.tobytes())
    except (ValueError, OSError) as err:
        return Skipped(image.rel_path, str(err))


def side(image: SourceImage) -> str:
    """'eval' for a test split the data gives (never edited), else 'train' (what the packer splits)."""
    return "eval" if image.split in EVAL_SPLITS else "train"


def duplicate_sets(facts: Sequence[ImageFacts]) -> list[list[ImageFacts]]:
    """Files with identical bytes, each set sorted by path; sets in order of their first path."""
    by_hash: dict[str, list[ImageFacts]] = defaultdict(list)
    for f in facts:
        by_hash[f.sha256].append(f)
    sets = [sorted(group, key=lambda f: f.image.rel_path) for group in by_hash.values() if len(group) > 1]
    return sorted(sets, key=lambda s: s[0].image.rel_path)


def look_alike(a: ImageFacts, b: ImageFacts, turn: int) -> bool:
    """Whether a's thumbnail and b's, turned the `turn`-th dihedral way, differ by under NEAR_PIXELS on average
    (true where a thumbnail is unknown)."""
    if not a.thumb or not b.thumb:
        return True
    grey_a, grey_b = (np.frombuffer(f.thumb, np.uint8).reshape(32, 32).astype(np.int16) for f in (a, b))
    return float(np.abs(grey_a - dihedral(grey_b)[turn]).mean()) < NEAR_PIXELS


def near_pairs(facts: Sequence[ImageFacts], bits: int = NEAR_BITS, block: int = 256) -> list[tuple[int, int, int]]:
    """(i, j, Hamming distance) of every pair i < j whose perceptual hashes are within `bits`, j's turned any of
    the 8 dihedral ways (rotated by 90 degrees, flipped); identical bytes are excluded (exact duplicates), and a
    pair across classes must look alike pixel by pixel too (look_alike)."""
    hashes = np.array([f.phashes or (f.phash,) * 8 for f in facts], dtype=np.uint64).reshape(len(facts), 8)
    turns = [np.ascontiguousarray(hashes[:, t]) for t in range(8)]
    pairs = []
    for start in range(0, len(hashes), block):
        rows = hashes[start:start + block, :1]
        best = np.bitwise_count(rows ^ turns[0][None, start:])  # only columns j >= start: the upper triangle
        for t in range(1, 8):  # one numpy pass per turn, hashed once per image
            np.minimum(best, np.bitwise_count(rows ^ turns[t][None, start:]), out=best)
        for i, j in zip(*np.nonzero(best <= bits)):
            a, b = int(i) + start, int(j) + start
            if b <= a or facts[a].sha256 == facts[b].sha256:
                continue
            turn = min(range(8), key=lambda t: int(np.bitwise_count(hashes[a, 0] ^ hashes[b, t])))
            if facts[a].image.class_name != facts[b].image.class_name and not look_alike(facts[a], facts[b], turn):
                continue
            pairs.append((a, b, int(best[i, j])))
    return pairs


def apply_policy(facts: Sequence[ImageFacts],
                 pairs: Sequence[tuple[int, int, int]] = ()) -> tuple[list[ImageFacts], list[dict]]:
    """(kept, excluded): the default policy for exact duplicates and near duplicates across classes (`pairs`, from
    near_pairs; module docstring). Excluded entries hold path, reason and the path of the copy that stays (or the
    copies in conflict)."""
    drop: dict[str, dict] = {}
    for group in duplicate_sets(facts):
        classes = sorted({f.image.class_name for f in group})
        evals = [f for f in group if side(f.image) == "eval"]
        training = [f for f in group if side(f.image) == "train"]
        if len(classes) > 1:
            where = ", ".join(f"{f.image.rel_path} ({f.image.class_name})" for f in group)
            for f in training:
                drop[f.image.rel_path] = {"path": f.image.rel_path, "reason": "label conflict: the same bytes are "
                                          f"labelled {' and '.join(classes)}", "copies": [g.image.rel_path for g in group],
                                          "detail": where}
        elif evals:
            for f in training:
                drop[f.image.rel_path] = {"path": f.image.rel_path, "reason": f"exact duplicate of {evals[0].image.rel_path}"
                                          f" in split {evals[0].image.split} (kept out of training)",
                                          "kept": evals[0].image.rel_path}
        else:
            for f in training[1:]:
                drop[f.image.rel_path] = {"path": f.image.rel_path,
                                          "reason": f"exact duplicate of {training[0].image.rel_path} (one copy kept)",
                                          "kept": training[0].image.rel_path}
    for i, j, bits in pairs:
        a, b = facts[i], facts[j]
        if a.image.class_name == b.image.class_name:
            continue
        for f, other in ((a, b), (b, a)):
            if side(f.image) == "train" and f.image.rel_path not in drop:
                drop[f.image.rel_path] = {"path": f.image.rel_path, "reason": "label conflict: a near duplicate "
                                          f"({bits} bits apart, up to a rotation or flip) is labelled "
                                          f"{' and '.join(sorted((a.image.class_name, b.image.class_name)))}",
                                          "copies": [a.image.rel_path, b.image.rel_path],
                                          "detail": f"{other.image.rel_path} ({other.image.class_name})"}
    kept = [f for f in facts if f.image.rel_path not in drop]
    return kept, sorted(drop.values(), key=lambda d: d["path"])


def describe_pair(a: ImageFacts, b: ImageFacts) -> str:
    """'within_class', 'across_classes' or 'across_splits' (different splits the data gives, same class)."""
    if a.image.class_name != b.image.class_name:
        return "across_classes"
    return "across_splits" if (a.image.split or "pool") != (b.image.split or "pool") else "within_class"


def size_summary(facts: Iterable[ImageFacts]) -> dict:
    """Per class: image count, the most common sizes (WxH) and the aspect ratio (width / height) range."""
    by_class: dict[str, list[ImageFacts]] = defaultdict(list)
    for f in facts:
        by_class[f.image.class_name].append(f)
    summary = {}
    for name, members in sorted(by_class.items()):
        aspects = [f.width / f.height for f in members]
        sizes = Counter(f"{f.width}x{f.height}" for f in members)
        summary[name] = {"images": len(members), "sizes": dict(sizes.most_common(3)), "distinct_sizes": len(sizes),
                         "aspect": {"min": round(min(aspects), 3), "median": round(statistics.median(aspects), 3),
                                    "max": round(max(aspects), 3)}}
    return summary


def build_report(scan: Scan, facts: Sequence[ImageFacts], skipped: Sequence[Skipped], excluded: Sequence[dict],
                 pairs: Sequence[tuple[int, int, int]]) -> dict:
    """The audit as JSON-ready data: what was found, and (excluded) what the packing policy leaves out."""
    sets = duplicate_sets(facts)
    kinds = Counter(describe_set(group) for group in sets)
    pair_kinds = Counter(describe_pair(facts[i], facts[j]) for i, j, _ in pairs)
    kept_counts = Counter(f.image.class_name for f in facts if f.image.rel_path not in {e["path"] for e in excluded})
    counts = [kept_counts.get(c, 0) for c in scan.classes]
    return {
        "source": str(scan.root), "layout": scan.layout, "classes": scan.classes,
        "files": len(facts) + len(skipped), "readable_images": len(facts),
        "unreadable": [{"path": s.path, "reason": s.reason} for s in skipped],
        "exact_duplicates": {"sets": len(sets), **{k: kinds.get(k, 0) for k in ("within_class", "across_classes",
                                                                                   "across_splits")},
                             "list": [{"sha256": g[0].sha256, "kind": describe_set(g),
                                       "files": [{"path": f.image.rel_path, "class": f.image.class_name,
                                                  "split": f.image.split} for f in g]} for g in sets]},
        "near_duplicates": {"max_bits": NEAR_BITS, "pairs": len(pairs),
                            **{k: pair_kinds.get(k, 0) for k in ("within_class", "across_classes", "across_splits")},
                            "list": [{"a": facts[i].image.rel_path, "b": facts[j].image.rel_path, "bits": d,
                                      "kind": describe_pair(facts[i], facts[j])} for i, j, d in pairs[:MAX_LISTED]]},
        "excluded": list(excluded),
        "sizes": size_summary(facts),
        "balance": {"images_per_class": dict(zip(scan.classes, counts)),
                    "largest_to_smallest": round(max(counts) / min(counts), 2) if min(counts, default=0) else None},
    }


def describe_set(group: Sequence[ImageFacts]) -> str:
    """The kind of an exact-duplicate set: a label conflict first, then a split crossing, else within a class."""
    if len({f.image.class_name for f in group}) > 1:
        return "across_classes"
    return "across_splits" if len({f.image.split or "pool" for f in group}) > 1 else "within_class"


def report_lines(report: dict) -> list[str]:
    """The short table the audit prints."""
    width = max([len(c) for c in report["classes"]] + [5])
    lines = [f"audit of {report['source']} (layout {report['layout']}): {report['files']:,} files, "
             f"{report['readable_images']:,} readable images, {len(report['unreadable'])} unreadable or not an image",
             "readable images per class, before exclusions (the class balance below counts what pack keeps):",
             f"{'class':<{width}} {'images':>7}  {'most common size':<18} {'sizes':>5}  aspect w/h (min-max)"]
    for name, s in report["sizes"].items():
        common, n = next(iter(s["sizes"].items()))
        share = f"{common} ({n / s['images']:.0%})"
        lines.append(f"{name:<{width}} {s['images']:>7,}  {share:<18} "
                     f"{s['distinct_sizes']:>5}  {s['aspect']['min']:.2f}-{s['aspect']['max']:.2f}")
    exact, near = report["exact_duplicates"], report["near_duplicates"]
    lines.append(f"exact duplicates: {exact['sets']} set(s) of identical files: {exact['within_class']} within a class, "
                 f"{exact['across_classes']} across classes (label conflicts), {exact['across_splits']} across splits")
    lines.append(f"near duplicates (perceptual hash within {near['max_bits']} of 64 bits): {near['pairs']} pair(s): "
                 f"{near['within_class']} within a class, {near['across_classes']} across classes, "
                 f"{near['across_splits']} across splits")
    balance = report["balance"]
    ratio = balance["largest_to_smallest"]
    lines.append("class balance: " + ", ".join(f"{c} {n:,}" for c, n in balance["images_per_class"].items())
                 + f" (after the {len(report['excluded'])} exclusion(s): the images pack keeps; "
                 + (f"largest / smallest {ratio})" if ratio else "a class has no usable image)"))
    for entry in report["unreadable"][:5]:
        lines.append(f"  unreadable: {entry['path']}: {entry['reason']}")
    for group in report["exact_duplicates"]["list"]:
        if group["kind"] != "within_class":
            lines.append(f"  {group['kind'].replace('_', ' ')}: " + ", ".join(f"{f['path']} ({f['class']})"
                                                                             for f in group["files"]))
    for pair in report["near_duplicates"]["list"]:
        if pair["kind"] == "across_classes":
            lines.append(f"  near duplicates across classes: {pair['a']} and {pair['b']} ({pair['bits']} bits)")
    return lines


def write_report(report: dict, path: Path, facts: Sequence[ImageFacts] | None = None) -> None:
    """The JSON report, atomically; with the images' facts also the page (AUDIT_PAGE) beside it."""
    write_json(path, report)
    if facts is not None:
        write_atomic(path.with_name(AUDIT_PAGE), audit_page(report, facts))


def audit_page(report: dict, facts: Sequence[ImageFacts]) -> str:
    """The audit as a self-contained HTML page: what it found, with the images (thumbnails) side by side."""
    from .. import pages
    from ..pages import Tile

    by_path = {f.image.rel_path: f for f in facts}
    def tile(path: str, *caption: str) -> Tile:
        fact = by_path.get(path)
        return Tile(pages.file_thumbnail(fact.image.path) if fact else "", [path, *caption], path)
    def pair_rows(groups: list[list[Tile]], note: str) -> str:
        return "".join('<div class="pair">' + "".join(map(pages.tile_html, g)) + "</div>" for g in groups) or \
            f'<p class="note">{note}</p>'

    exact, near = report["exact_duplicates"], report["near_duplicates"]
    before = {c: s["images"] for c, s in report["sizes"].items()}
    after = report["balance"]["images_per_class"]
    excluded = Counter(by_path[e["path"]].image.class_name for e in report["excluded"] if e["path"] in by_path)
    balance = (pages.table(["class", "readable images (before exclusions)", "excluded", "packed (after exclusions)"],
                           [[c, before.get(c, 0), excluded.get(c, 0), after.get(c, 0)] for c in report["classes"]])
               + pages.bar_svg(report["classes"], [after.get(c, 0) for c in report["classes"]])
               + f"<p>largest / smallest class (after exclusions): {report['balance']['largest_to_smallest']}</p>")
    sizes = Counter(f"{f.width}x{f.height}" for f in facts).most_common(15)
    aspects = Counter(round(f.width / f.height, 1) for f in facts)
    shapes = ("<h3>image sizes (width x height; the 15 most common)</h3>"
              + pages.bar_svg([s for s, _ in sizes], [n for _, n in sizes])
              + "<h3>aspect ratio (width / height, to 0.1)</h3>"
              + pages.bar_svg([f"{a:.1f}" for a in sorted(aspects)], [aspects[a] for a in sorted(aspects)]))
    sets = [[tile(f["path"], f"class {f['class']}", f"split {f['split'] or '-'}") for f in g["files"]]
            for g in exact["list"][:PAGE_LISTED]]
    pairs = [[tile(p["a"], f"{p['bits']} bits apart"), tile(p["b"], p["kind"].replace("_", " "))]
             for p in near["list"][:PAGE_LISTED]]
    conflicts = [e for e in report["excluded"] if e["reason"].startswith("label conflict")]
    conflict_rows = [[tile(path, f"class {by_path[path].image.class_name}" if path in by_path else "")
                      for path in e["copies"]] for e in conflicts[:PAGE_LISTED]]
    rng = random.Random(0)
    samples = "".join(
        f"<h3>{pages.esc(c)}</h3>" + pages.gallery(tile(f.image.rel_path) for f in
                                                   rng.sample(members, min(SAMPLES_PER_CLASS, len(members))))
        for c in report["classes"] if (members := [f for f in facts if f.image.class_name == c]))
    summary = pages.table(["", "count"], [
        ["files", report["files"]], ["readable images", report["readable_images"]],
        ["unreadable or not an image", len(report["unreadable"])],
        ["exact-duplicate sets", exact["sets"]], ["near-duplicate pairs", near["pairs"]],
        ["label conflicts (excluded from training)", len(conflicts)], ["excluded in all", len(report["excluded"])]])
    shown = lambda n, total: f"<p>{total} in all{f'; the first {n} shown' if total > n else ''}.</p>"
    return pages.page(f"audit: {report['source']}", [
        ("summary", "Summary", f"<p>layout {pages.esc(report['layout'])}</p>" + summary),
        ("balance", "Class balance", balance),
        ("shapes", "Sizes and aspect ratios (readable images, before exclusions)", shapes),
        ("duplicates", "Exact duplicates (identical bytes), side by side",
         shown(len(sets), exact["sets"]) + pair_rows(sets, "none")),
        ("near", f"Near duplicates (perceptual hash within {near['max_bits']} of 64 bits)",
         shown(len(pairs), near["pairs"]) + pair_rows(pairs, "none")),
        ("conflicts", "Label conflicts (the same image under two classes)",
         shown(len(conflict_rows), len(conflicts)) + pair_rows(conflict_rows, "none")),
        ("unreadable", "Unreadable files", pages.table(["path", "why"], [[u["path"], u["reason"]] for u in
                                                                        report["unreadable"]], left=2)),
        ("samples", f"Random samples per class (up to {SAMPLES_PER_CLASS}, fixed seed)", samples)])


def collect_facts(images: Sequence[SourceImage], pool) -> tuple[list[ImageFacts], list[Skipped]]:
    """Facts of every image (in the given order), read by `pool` (an executor), and the unreadable ones."""
    results = list(progress(pool.map(image_facts, images, chunksize=64), total=len(images), desc="checking",
                            unit="img"))
    return ([r for r in results if isinstance(r, ImageFacts)], [r for r in results if isinstance(r, Skipped)])


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: audit a source and print (and with --out, write) the report."""
    from .parallel import Workers

    parser = Parser(prog="bloodcells audit", description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="dataset root, folder of class folders, or CSV listing")
    parser.add_argument("--layout", choices=["auto", "splits", "classes", "csv"], default="auto")
    parser.add_argument("--out", type=Path, help="JSON report to write")
    parser.add_argument("--html", type=Path, help="the audit as a self-contained HTML page (thumbnails side by side)")
    parser.add_argument("--workers", type=int, default=2, help="processes reading the images")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    for flag, path in (("--out", args.out), ("--html", args.html)):  # before minutes of work, not after
        if path:
            output_file_in_folder(path, flag)
    scan = scan_images(args.src, args.layout)
    with Workers(args.workers) as pool:
        facts, unreadable = collect_facts(scan.images, pool)
    pairs = near_pairs(facts)
    _, excluded = apply_policy(facts, pairs)
    report = build_report(scan, facts, sorted(scan.skipped + unreadable, key=lambda s: s.path), excluded, pairs)
    say("\n".join(report_lines(report)))
    if args.out:
        write_report(report, args.out)
        say(f"wrote {args.out}")
    if args.html:
        write_atomic(args.html, audit_page(report, facts))
        say(f"wrote {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
