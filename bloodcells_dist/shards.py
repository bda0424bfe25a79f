"""Pack the blood-cell JPEG folders into verified WebDataset tar shards, and verify a shard folder.

    python -m bloodcells_dist.shards pack --src ROOT --out DIR [--seed S] [--val-fraction F] ...
    python -m bloodcells_dist.shards verify DIR
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from . import __version__
from .cli import UserError, run_main, writable_folder
from .interop import check_descriptions, stale_description_names, write_descriptions
from .manifest import MANIFEST_NAME, ShardInfo, ShardManifest, SplitInfo
from .cells import file_sha256, read_mapping, recover_cells
from .progress import progress
from .sources import LINK_OUT, Skipped, SourceImage, check_jpeg, scan_images, unique_keys

MIN_SHARDS = 16  # 8 ranks x 2 workers each get a shard of their own...
MIN_SHARD_SAMPLES = 16  # ...unless that would make shards smaller than this
MAX_SHARD_SAMPLES = 2000  # big splits get more shards rather than bigger ones
FOLDS = 5  # every cell gets a fold index for grouped k-fold cross-validation
SPLITS = ("train", "val", "test", "test_simple")


@dataclass(frozen=True)
class Sample:
    """A checked image with its final split, label, source cell and fold."""

    image: SourceImage
    split: str
    label: int
    cell: str  # TRAIN: the recovered source cell ("CLASS/cellNNN"); TEST: the image's own key
    fold: int
    width: int
    height: int


def default_shard_count(n: int) -> int:
    """Shards for a split of n samples: at least 16 where each keeps >= 16 samples, more past 2,000 per shard."""
    return max(1, math.ceil(n / MAX_SHARD_SAMPLES), min(MIN_SHARDS, n // MIN_SHARD_SAMPLES))


def die_with_parent() -> None:
    """Pool initializer: on Linux, a worker gets SIGKILL when the packer dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def check_image(img: SourceImage) -> tuple[SourceImage, int, int] | Skipped:
    """Read and decode-check one image: (image, width, height), or why it is skipped."""
    try:
        width, height = check_jpeg(img.path.read_bytes())
    except (ValueError, OSError) as err:
        return Skipped(img.rel_path, str(err))
    return img, width, height


def assign_splits(
    checked: list[tuple[SourceImage, int, int]], classes: list[str], cells: dict[str, str], *, seed: int,
    val_fraction: float, val_split: str
) -> list[Sample]:
    """Split TRAIN into train/val by whole cells (or by image with val_split='random'); give each cell a fold."""
    by_class: dict[str, list[tuple[SourceImage, int, int]]] = {}
    for item in checked:
        by_class.setdefault(item[0].class_name, []).append(item)
    cell_of = {img.path: cells.get(img.rel_path, img.key) for img, _, _ in checked}
    samples = []
    for class_name, items in sorted(by_class.items()):
        groups = sorted({cell_of[img.path] for img, _, _ in items})
        random.Random(f"{seed}:folds:{class_name}").shuffle(groups)
        fold = {g: i % FOLDS for i, g in enumerate(groups)}
        train_groups = sorted({cell_of[img.path] for img, _, _ in items if img.split == "train"})
        random.Random(f"{seed}:val:{class_name}").shuffle(train_groups)
        val_groups = set(train_groups[: round(val_fraction * len(train_groups))])
        train_items = [it for it in items if it[0].split == "train"]
        val_images = set()
        if val_split == "random":  # image-level split: leaks copies of one cell into both sides
            order = list(range(len(train_items)))
            random.Random(f"{seed}:val:{class_name}").shuffle(order)
            val_images = {train_items[i][0].path for i in order[: round(val_fraction * len(train_items))]}
        for img, w, h in items:
            split = img.split
            if split == "train" and (cell_of[img.path] in val_groups if val_split == "cell" else img.path in val_images):
                split = "val"
            cell = cell_of[img.path]
            samples.append(Sample(img, split, classes.index(class_name), cell, fold[cell], w, h))
    return samples


def train_cells(checked: list[tuple[SourceImage, int, int]], mapping_file: Path | None, *, workers: int) -> dict[str, str]:
    """Relative path -> source cell of every TRAIN image: read from a `cells` mapping, or recovered now."""
    train = [img for img, _, _ in checked if img.split == "train"]
    if mapping_file is None:
        print(f"recovering the source cells of {len(train)} TRAIN images from their pixels "
              "(python -m bloodcells_dist.cells writes them once for reuse with --cells)", file=sys.stderr)
        return recover_cells([(i.rel_path, i.class_name, i.path) for i in train], workers=workers,
                             progress=lambda line: print(line, file=sys.stderr))
    known = read_mapping(mapping_file)
    missing = [i.rel_path for i in train if i.rel_path not in known]
    if missing:
        raise UserError(f"{mapping_file} has no cell for {len(missing)} TRAIN image(s), first: {missing[0]} "
                        "(rerun python -m bloodcells_dist.cells on this dataset)")
    stale = [i.rel_path for i in train if file_sha256(i.path) != known[i.rel_path][1]]
    if stale:
        raise UserError(f"{mapping_file} was made from other bytes for {len(stale)} TRAIN image(s), first: "
                        f"{stale[0]} (rerun python -m bloodcells_dist.cells on this dataset)")
    wrong = [i.rel_path for i in train if not known[i.rel_path][0].startswith(f"{i.class_name}/")]
    if wrong:
        raise UserError(f"{mapping_file} puts {wrong[0]} in a cell of another class")
    return {i.rel_path: known[i.rel_path][0] for i in train}


def write_shard(path: Path, samples: list[Sample], classes: list[str]) -> ShardInfo:
    """Write one tar under a temporary name, fsync it and rename it into place; return its manifest entry."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as stream:
        # Fixed owner, mode and mtime: same input -> byte-identical tar.
        with wds.TarWriter(stream, user="", group="", mode=0o444, mtime=0, encoder=False) as tar:
            for s in samples:
                meta = {
                    "class_name": classes[s.label],
                    "split": s.split,
                    "cell": s.cell,
                    "fold": s.fold,
                    "path": s.image.rel_path,
                    "width": s.width,
                    "height": s.height,
                }
                tar.write({
                    "__key__": s.image.key,
                    "jpg": s.image.path.read_bytes(),  # the original bytes, never re-encoded
                    "cls": str(s.label).encode(),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                })
        stream.flush()
        os.fsync(stream.fileno())
    with open(tmp, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    os.replace(tmp, path)
    return ShardInfo(file=path.name, samples=len(samples), bytes=path.stat().st_size, sha256=digest)


def clear_old_pack(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier pack unless asked; with --overwrite drop its manifest first, then its shards."""
    old = sorted(out.glob("*.tar")) + ([out / MANIFEST_NAME] if (out / MANIFEST_NAME).exists() else [])
    old += stale_description_names(out)  # timm/datasets/wids descriptions of the earlier pack
    if old and not overwrite:
        raise UserError(f"{out} already holds shards, a manifest or their descriptions (README.md, _info.json); "
                        "pass --overwrite to replace them")
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # from here on, verify rejects the folder until we finish
    for path in old + sorted(out.glob(".*.tmp-*")):  # and leftovers of an interrupted pack
        path.unlink(missing_ok=True)


def plan_shards(samples: list[Sample], out: Path, *, seed: int, shard_size: int | None) -> dict[str, list[tuple[Path, list[Sample]]]]:
    """Split name -> [(shard path, its samples)]: seeded order so every shard mixes classes, sizes within one."""
    plan = {}
    for split in SPLITS:
        members = sorted((s for s in samples if s.split == split), key=lambda s: s.image.key)
        if not members:
            continue
        random.Random(f"{seed}:order:{split}").shuffle(members)
        n = math.ceil(len(members) / shard_size) if shard_size else default_shard_count(len(members))
        plan[split] = [
            (out / f"{split}-{i:05d}.tar", members[i * len(members) // n : (i + 1) * len(members) // n]) for i in range(n)
        ]
    return plan


def pack_shards(
    src: Path,
    out: Path,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    val_split: str = "cell",
    cells: Path | None = None,
    shard_size: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    workers: int = 2,
) -> ShardManifest:
    """Pack the JPEG folders under `src` into shards and a manifest in `out`; return the manifest."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {shard_size}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    scan = scan_images(src)
    writable_folder(out, "--out")  # before the slow checking
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=die_with_parent)
    with pool:
        # Checking (PIL) and tar writing are Python-bound: processes, not threads, use both cores.
        results = list(progress(pool.map(check_image, scan.images, chunksize=64), total=len(scan.images),
                                desc="checking", unit="img"))
        skipped = sorted(scan.skipped + [r for r in results if isinstance(r, Skipped)], key=lambda s: s.path)
        checked = [r for r in results if not isinstance(r, Skipped)]
        keyed, key_clashes = unique_keys([img for img, _, _ in checked])  # only readable files claim keys
        checked = [(img, w, h) for img, (_, w, h) in zip(keyed, checked)]
        clashes = scan.clashes + key_clashes
        if strict and skipped:
            raise UserError(f"--strict: {len(skipped)} bad input(s), nothing written; "
                            f"first: {skipped[0].path}: {skipped[0].reason}")
        if strict and clashes:
            raise UserError(f"--strict: {len(clashes)} name clash(es), nothing written; "
                            f"first: {' and '.join(clashes[0].paths)} {clashes[0].conflict}")
        if not checked:
            raise UserError(f"no readable JPEG images under {src} ({len(skipped)} skipped)")
        for s in skipped:
            print(f"warning: skipped {s.path}: {s.reason}", file=sys.stderr)
        for c in clashes:
            print(f"warning: {' and '.join(c.paths)} {c.conflict}: {c.resolution}", file=sys.stderr)

        classes = scan.classes  # every class folder, readable images or not: labels never shift
        for c in sorted(set(classes) - {img.class_name for img, _, _ in checked}):
            print(f"warning: class {c} has no readable images (kept in the class list, label {classes.index(c)})",
                  file=sys.stderr)
        cell_map = train_cells(checked, cells, workers=workers) if val_split == "cell" else {}
        samples = assign_splits(checked, classes, cell_map, seed=seed, val_fraction=val_fraction,
                                val_split=val_split)
        plan = plan_shards(samples, out, seed=seed, shard_size=shard_size)
        try:
            clear_old_pack(out, overwrite)
            with progress(total=len(samples), desc="packing", unit="img") as bar:
                futures = {split: [pool.submit(write_shard, path, chunk, classes) for path, chunk in jobs]
                           for split, jobs in plan.items()}
                for split, jobs in plan.items():
                    for future, (_, chunk) in zip(futures[split], jobs):
                        future.result()
                        bar.update(len(chunk))
        except OSError as err:  # full disk, a folder we may not write in...
            raise UserError(f"cannot write shards to {out}: {err.strerror or err}") from None

    splits = {}
    for split, jobs in plan.items():
        members = [s for _, chunk in jobs for s in chunk]
        splits[split] = SplitInfo(
            samples=len(members),
            samples_per_class={c: sum(1 for s in members if s.label == k) for k, c in enumerate(classes)},
            cells_per_class={c: len({s.cell for s in members if s.label == k}) for k, c in enumerate(classes)},
            samples_per_fold={str(f): sum(1 for s in members if s.fold == f) for f in range(FOLDS)},
            shards=[f.result() for f in futures[split]],
        )
    manifest = ShardManifest(
        classes=classes,
        splits=splits,
        skipped=[{"path": s.path, "reason": s.reason} for s in skipped],
        clashes=[{"paths": list(c.paths), "conflict": c.conflict, "resolution": c.resolution} for c in clashes],
        folds=FOLDS,
        args={"src": str(src.resolve()), "seed": seed, "val_fraction": val_fraction, "val_split": val_split,
              "cells": str(cells) if cells else "recovered", "shard_size": shard_size, "strict": strict},
        tool_version=__version__,
    )
    try:
        write_descriptions(out, manifest)  # _info.json (timm), README.md (datasets, Hub), *.wids.json
        manifest.save(out)  # last: its presence means every shard and description above is complete
    except OSError as err:
        raise UserError(f"cannot write the manifest to {out}: {err.strerror or err}") from None
    return manifest


def check_shard(path: Path, shard: ShardInfo, classes: list[str]) -> list[dict]:
    """The metadata (plus `key`) of every sample of one shard, after checking size, checksum, JPEGs and labels;
    ValueError if bad."""
    if not path.is_file():
        raise ValueError("missing")
    if path.stat().st_size != shard.bytes:
        raise ValueError(f"{path.stat().st_size} bytes, manifest says {shard.bytes} (truncated or replaced?)")
    with open(path, "rb") as f:
        if hashlib.file_digest(f, "sha256").hexdigest() != shard.sha256:
            raise ValueError("sha256 does not match the manifest (corrupted)")
    metas = []
    try:
        for sample in wds.tarfile_samples([{"url": str(path)}]):
            if {k for k in sample if not k.startswith("__")} != {"jpg", "cls", "json"}:
                raise ValueError(f"sample {sample['__key__']} holds {sorted(sample)}, expected jpg/cls/json once")
            meta, label = json.loads(sample["json"]), int(sample["cls"])
            if not 0 <= label < len(classes) or classes[label] != meta["class_name"]:
                raise ValueError(f"sample {sample['__key__']}: label {label} does not match class {meta['class_name']}")
            check_jpeg(sample["jpg"])
            metas.append({**meta, "key": sample["__key__"]})
    except ValueError:
        raise
    except Exception as err:  # tarfile and JSON errors alike mean a bad shard
        raise ValueError(f"{type(err).__name__}: {err}") from None
    if len(metas) != shard.samples:
        raise ValueError(f"{len(metas)} samples, manifest says {shard.samples}")
    return metas


def recount(metas: list[dict], classes: list[str], folds: int) -> dict:
    """What the manifest says of a split, counted from its samples' own metadata."""
    return {
        "samples": len(metas),
        "samples_per_class": {c: sum(1 for m in metas if m["class_name"] == c) for c in classes},
        "cells_per_class": {c: len({m["cell"] for m in metas if m["class_name"] == c}) for c in classes},
        "samples_per_fold": {str(f): sum(1 for m in metas if m["fold"] == f) for f in range(folds)},
    }


def verify_shards(folder: Path) -> ShardManifest:
    """Re-read every shard and recount from the samples everything readers rely on (split totals, samples per
    class, cell and fold, the folds, the splits there are); raise UserError at the first difference."""
    folder = Path(folder)
    manifest = ShardManifest.load(folder)
    if manifest.folds != FOLDS:
        raise UserError(f"{folder}: manifest says {manifest.folds} folds, shards of this format have {FOLDS}")
    listed = {shard.file for split in manifest.splits.values() for shard in split.shards}
    unlisted = sorted(p.name for p in folder.glob("*.tar") if p.name not in listed)
    if unlisted:
        raise UserError(f"{folder}: shard(s) not in the manifest: {', '.join(unlisted[:3])} (edited manifest?)")
    for split_name, split in manifest.splits.items():
        if split_name not in SPLITS:
            raise UserError(f"{folder}: unknown split {split_name!r} in the manifest (expected {', '.join(SPLITS)})")
        metas: list[dict] = []
        for shard in split.shards:
            path = folder / shard.file
            try:
                metas += check_shard(path, shard, manifest.classes)
            except ValueError as err:
                raise UserError(f"bad shard {path}: {err}") from None
        keys = Counter(m["key"] for m in metas)
        if max(keys.values(), default=1) > 1:
            raise UserError(f"split {split_name}: key {keys.most_common(1)[0][0]} appears more than once")
        strays = {m["split"] for m in metas} - {split_name}
        if strays or any(not 0 <= m["fold"] < FOLDS for m in metas):
            raise UserError(f"split {split_name}: holds samples of split {sorted(strays)} or a fold outside 0..{FOLDS - 1}")
        counted = recount(metas, manifest.classes, manifest.folds)
        for field_name, value in counted.items():
            if getattr(split, field_name) != value:
                raise UserError(f"split {split_name}: {field_name} in the manifest is {getattr(split, field_name)}, "
                                f"the shards hold {value}")
    try:
        check_descriptions(folder, manifest)
    except ValueError as err:
        raise UserError(f"{folder}: {err}") from None
    return manifest


def print_summary(manifest: ShardManifest, seconds: float) -> None:
    """Images per split and class, source cells, skipped count and throughput."""
    total = sum(s.samples for s in manifest.splits.values())
    width = max(len(c) for c in manifest.classes)
    print(f"{'split':<12} {'class':<{width}} {'images':>7} {'cells':>7}")
    for name, split in manifest.splits.items():
        for c in manifest.classes:
            print(f"{name:<12} {c:<{width}} {split.samples_per_class[c]:>7} {split.cells_per_class[c]:>7}")
        print(f"{name:<12} {'(all)':<{width}} {split.samples:>7} {sum(split.cells_per_class.values()):>7}  in {len(split.shards)} shards")
    links = sum(1 for s in manifest.skipped if s["reason"] == LINK_OUT)
    link_note = f" ({links} symbolic link(s) leading out of the source root, not followed)" if links else ""
    clash_note = f", {len(manifest.clashes)} name clash(es) resolved (manifest: clashes)" if manifest.clashes else ""
    print(f"packed {total} images, skipped {len(manifest.skipped)}{link_note}{clash_note}, in {seconds:.1f} s "
          f"({total / seconds:,.0f} images/s)")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `pack` or `verify`."""
    parser = argparse.ArgumentParser(prog="python -m bloodcells_dist.shards", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", help="pack JPEG folders into shards")
    pack.add_argument("--src", type=Path, required=True, help="dataset root, or a folder holding TRAIN/TEST folders")
    pack.add_argument("--out", type=Path, required=True, help="output folder for shards and manifest.json")
    pack.add_argument("--seed", type=int, default=0, help="seed of the val split, folds and shard order")
    pack.add_argument("--val-fraction", type=float, default=0.2, help="fraction of TRAIN cells (per class) for val")
    pack.add_argument("--val-split", choices=["cell", "random"], default="cell",
                      help="cell: whole source cells go to val and to folds (honest); "
                           "random: images (leaks copies of a cell into both sides)")
    pack.add_argument("--cells", type=Path, help="cell mapping from `python -m bloodcells_dist.cells` "
                      "(default: recover the cells while packing)")
    pack.add_argument("--shard-size", type=int, help="samples per shard (default: at least 16 shards per big split)")
    pack.add_argument("--strict", action="store_true", help="any bad input is an error and nothing is written")
    pack.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    pack.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes for checking and writing")
    verify = sub.add_parser("verify", help="re-read and check every shard of a folder")
    verify.add_argument("dir", type=Path)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.command == "pack":
        manifest = pack_shards(args.src, args.out, seed=args.seed, val_fraction=args.val_fraction,
                               val_split=args.val_split, cells=args.cells, shard_size=args.shard_size, strict=args.strict,
                               overwrite=args.overwrite, workers=args.workers)
        print_summary(manifest, time.perf_counter() - start)
    else:
        manifest = verify_shards(args.dir)
        n = sum(s.samples for s in manifest.splits.values())
        shards = sum(len(s.shards) for s in manifest.splits.values())
        print(f"ok: {shards} shards, {n} samples verified in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
