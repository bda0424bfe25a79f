"""Pack a folder of white-cell images (or a CSV listing) into verified WebDataset tar shards; verify a shard folder.

    bloodcells pack --src ROOT_OR_LISTING --out DIR [--test-fraction F] [--groups auto] ...
    bloodcells verify DIR

`pack` reads the layouts of sources.py, audits the images (audit.py: unreadable files, duplicates, label
conflicts), groups them (groups.py), splits them by whole groups (splits.py) and writes shards, the manifest,
the audit report and the descriptions other readers look for (interop.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from pathlib import Path

from .. import __version__, output
from ..cli import Parser, UserError, run_main, writable_folder
from ..files import atomic_path
from ..progress import progress
from .audit import AUDIT_PAGE, ImageFacts, apply_policy, build_report, collect_facts, near_pairs, report_lines, write_report
from .groups import METHODS, Grouping, group_images
from .interop import check_descriptions, stale_description_names, write_descriptions
from .manifest import AUDIT_NAME, MANIFEST_NAME, ShardInfo, ShardManifest, SplitInfo
from .parallel import MIN_PARALLEL, Workers
from .sources import (
    EVAL_SPLITS,
    HIDDEN,
    LAYOUTS,
    LINK_OUT,
    NOT_REGULAR,
    Clash,
    Scan,
    Skipped,
    check_jpeg,
    scan_images,
    split_folder_root,
    unique_keys,
)
from .splits import FOLDS, Sample, assign_splits, in_pool, unmet_fractions

MIN_SHARDS = 16  # 8 ranks x 2 workers each get a shard of their own...
MIN_SHARD_SAMPLES = 16  # ...unless that would make shards smaller than this
MAX_SHARD_SAMPLES = 2000  # big splits get more shards rather than bigger ones
SPLITS = ("train", "val", "test", "test_simple")
VAL_SPLITS = ("group", "random", "cell")  # cell: the former name of group, still accepted
DEFAULT_VAL_FRACTION = 0.2
DATASET_INFO = "dataset.json"  # {"name": ...} at a source root names the dataset (the synthetic generator writes one)


def default_shard_count(n: int) -> int:
    """Shards for a split of n samples: at least 16 where each keeps >= 16 samples, more past 2,000 per shard."""
    return max(1, math.ceil(n / MAX_SHARD_SAMPLES), min(MIN_SHARDS, n // MIN_SHARD_SAMPLES))


Say = Callable[[str], None]


def say(line: str) -> None:
    """The packer's lines through the package's one channel (output.say): what it found and decided to stdout; its
    warnings and notes (lines starting `warning:` or `note:`) to stderr, so that `pack > log` keeps the findings
    and shows the doubts."""
    output.say(line, stderr=line.startswith(("warning:", "note:")))


AT_SHARD_ENV = "BLOODCELLS_AT_SHARD"  # test hook: "N:pause" once N shards are written


def at_shard(written: int) -> None:
    """The interrupted-pack test's deterministic hook (BLOODCELLS_AT_SHARD="N:pause"): once N shards are written,
    print `paused after N shards` and wait for a line on stdin, so that the test kills the packer mid-write at a
    point it names instead of one it polls for."""
    planned, _, action = os.environ.get(AT_SHARD_ENV, "").partition(":")
    if planned == str(written) and action == "pause":
        print(f"paused after {written} shards", flush=True)
        sys.stdin.readline()


def source_info(src: Path, key: str) -> str | None:
    """A string the source states about itself in SRC/dataset.json ({"name": ..., "license": ...}), or None."""
    info = src / DATASET_INFO
    if not (src.is_dir() and info.is_file()):
        return None
    try:
        found = json.loads(info.read_text()).get(key)
    except (ValueError, OSError, AttributeError):
        return None
    return found.strip()[:100] if isinstance(found, str) and found.strip() else None


def dataset_name(src: Path, layout: str, name: str | None) -> str:
    """--name, else the name in SRC/dataset.json, else "blood-cells" for the Kaggle download, else the folder's
    (or listing's) name."""
    found = name or source_info(src, "name")
    if found:
        return found
    if layout == "splits" and split_folder_root(src) == src / "dataset2-master" / "dataset2-master" / "images":
        return "blood-cells"
    return (src.stem if src.is_file() else src.resolve().name) or "dataset"


def check_samples(samples: Sequence[Sample], classes: list[str], *, val_fraction: float,
                  test_fraction: float) -> list[str]:
    """Refuse splits a model cannot be trained on (no training image; a class with images but none to train on);
    return the warnings: held-out splits a fraction could not fill per class, a single class to learn."""
    training = Counter(s.facts.image.class_name for s in samples if s.split == "train")
    if not training:
        raise UserError(f"no training image: --test-fraction {test_fraction} and --val-fraction {val_fraction} leave "
                        "no group for train (lower them, or give rows split=train)")
    for name in classes:
        where = Counter(s.split for s in samples if s.facts.image.class_name == name)
        if where and not training[name]:
            raise UserError(f"class {name} has no training image (its {sum(where.values())} image(s) are all in "
                            f"{', '.join(sorted(where))}): a model cannot learn it; add training images or drop it")
    held = {k: v for k, v in (("test", test_fraction), ("val", val_fraction)) if v > 0}
    warned = unmet_fractions(samples, classes, held)
    if len(training) == 1:
        warned.append(f"only one class ({next(iter(training))}) has training images: a model of it learns nothing, "
                      "and its accuracy and macro F1 are 1.0 by construction")
    return warned


def check_out_folder(src: Path, out: Path) -> None:
    """Refuse an output folder that would be read back as input, or that is a system root."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    resolved, source = out.resolve(), (src.parent if src.is_file() else src).resolve()
    if resolved.is_relative_to(source):
        raise UserError(f"--out {out} is inside the source {source}: the next pack would read the shards as "
                        "stray input; write them elsewhere")
    if resolved == Path(resolved.anchor) or resolved.parent == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise UserError(f"--out {out} is a system or home folder ({resolved}); give a folder of its own, e.g. {resolved}/shards")


def resolve_fractions(images, val_fraction: float | None, test_fraction: float) -> tuple[float, float]:
    """(val, test) fractions of the pool to hold out: none where the data gives that split itself, or gives
    every image a split (a listing's rows, `train` included, keep theirs)."""
    given = {img.split for img in images}
    if test_fraction and "test" in given:
        raise UserError("--test-fraction: the data already gives a test split (a TEST folder or split=test rows); "
                        "the packer never edits a test split the data gives")
    if val_fraction and "val" in given:
        raise UserError("--val-fraction: the data already gives a val split (a VAL folder or split=val rows)")
    if not any(in_pool(img) for img in images):
        for flag, value in (("--test-fraction", test_fraction), ("--val-fraction", val_fraction)):
            if value:
                raise UserError(f"{flag} {value}: the data gives every image its split (a listing's rows given train "
                                "stay in train): nothing is left to cut; leave the split empty on rows it may deal")
        val_fraction = 0.0
    if val_fraction is None:
        val_fraction = 0.0 if "val" in given else DEFAULT_VAL_FRACTION
    for flag, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise UserError(f"{flag} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise UserError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} leave nothing to train on")
    return val_fraction, test_fraction


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (hashlib.file_digest is Python 3.11+)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: Path, samples: list[Sample], classes: list[str]) -> ShardInfo:
    """Write one tar under a temporary name, fsync it and rename it into place; return its manifest entry."""
    with atomic_path(path, keep_suffix=False) as tmp, open(tmp, "wb") as stream:
        # Fixed owner, mode and mtime: same input -> byte-identical tar (the layout webdataset's TarWriter writes).
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            for s in samples:
                image = s.facts.image
                meta = {
                    "class_name": classes[s.label],
                    "split": s.split,
                    "group": s.group,
                    "fold": s.fold,
                    "path": image.rel_path,
                    "width": s.facts.width,
                    "height": s.facts.height,
                }
                data = image.path.read_bytes()  # the original bytes, never re-encoded
                if hashlib.sha256(data).hexdigest() != s.facts.sha256:
                    raise UserError(f"{image.rel_path} changed while it was being packed; pack again")
                members = {"cls": str(s.label).encode(), "jpg": data, "json": json.dumps(meta, sort_keys=True).encode()}
                for ext, payload in sorted(members.items()):  # KEY.cls, KEY.jpg, KEY.json: one sample
                    info = tarfile.TarInfo(f"{image.key}.{ext}")
                    info.size, info.mtime, info.mode, info.uname, info.gname = len(payload), 0, 0o444, "", ""
                    tar.addfile(info, io.BytesIO(payload))
        stream.flush()
        os.fsync(stream.fileno())
    return ShardInfo(file=path.name, samples=len(samples), bytes=path.stat().st_size, sha256=file_sha256(path))


def clear_old_pack(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an earlier pack unless asked; with --overwrite drop its manifest first, then its shards."""
    old = sorted(out.glob("*.tar")) + [out / n for n in (MANIFEST_NAME, AUDIT_NAME, AUDIT_PAGE) if (out / n).exists()]
    old += stale_description_names(out)  # timm/datasets/wids descriptions of the earlier pack
    if old and not overwrite:
        raise UserError(f"{out} already holds shards, a manifest or their descriptions (README.md, _info.json); "
                        "pass --overwrite to replace them")
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # from here on, verify rejects the folder until we finish
    for path in old + sorted(out.glob(".*.tmp-*")):  # and leftovers of an interrupted pack
        path.unlink(missing_ok=True)


def remove_partial(out: Path, plan: dict[str, list[tuple[Path, list[Sample]]]]) -> None:
    """After a failed pack: remove its shards (whole or temporary), audit report and descriptions, which no
    manifest lists."""
    for jobs in plan.values():
        for path, _ in jobs:
            path.unlink(missing_ok=True)
    for path in sorted(out.glob(".*.tmp-*")) + [out / AUDIT_NAME, out / AUDIT_PAGE] + stale_description_names(out):
        path.unlink(missing_ok=True)


def plan_shards(samples: list[Sample], out: Path, *, seed: int,
                shard_size: int | None) -> dict[str, list[tuple[Path, list[Sample]]]]:
    """Split name -> [(shard path, its samples)]: seeded order so every shard mixes classes, sizes within one."""
    plan = {}
    for split in SPLITS:
        members = sorted((s for s in samples if s.split == split), key=lambda s: s.facts.image.key)
        if not members:
            continue
        random.Random(f"{seed}:order:{split}").shuffle(members)
        n = math.ceil(len(members) / shard_size) if shard_size else default_shard_count(len(members))
        plan[split] = [
            (out / f"{split}-{i:05d}.tar", members[i * len(members) // n : (i + 1) * len(members) // n]) for i in range(n)
        ]
    return plan


@dataclass(frozen=True)
class PackOptions:
    """How `pack` reads, groups, splits and writes a source: the `bloodcells pack` flags (README, Your own data)."""

    seed: int = 0  # seed of the splits, folds and shard order
    val_fraction: float | None = None  # share of each class's groups held out as val; None: 0.2, or 0 where the data gives val
    test_fraction: float = 0.0  # share of each class's groups held out as test, where the data gives no test split
    val_split: str = "group"  # group: whole groups go to val (honest); random: images (leaks copies); cell: former name of group
    layout: str = "auto"  # how the source is laid out (sources.LAYOUTS); auto: detected
    groups: str = "auto"  # the unit a split never cuts (groups.METHODS); auto measures the data
    cells: Path | None = None  # a cell mapping from `bloodcells cells` (with groups cells); None: recover while packing
    name: str | None = None  # None: SRC/dataset.json's name, blood-cells for the Kaggle download, else the folder's
    shard_size: int | None = None  # samples per shard; None: at least 16 shards per big split (default_shard_count)
    strict: bool = False  # any bad input, name clash, duplicate or label conflict is an error and nothing is written
    overwrite: bool = False  # replace an earlier pack in the output folder
    workers: int = 2  # processes for checking and writing
    license: str | None = None  # the images' licence for the card (cc-by-4.0, other...); None: SRC/dataset.json's or unknown

    def check(self) -> None:
        """UserError naming the first flag with a value pack cannot use."""
        if self.val_split not in VAL_SPLITS:
            raise UserError(f"--val-split {self.val_split}: expected group or random (cell is group's former name)")
        if self.groups not in METHODS:
            raise UserError(f"--groups {self.groups}: expected one of {', '.join(METHODS)}")
        if self.shard_size is not None and self.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        if self.license is not None and (not self.license.strip() or any(c.isspace() for c in self.license)):
            raise UserError(f"--license {self.license!r}: one identifier, e.g. cc-by-4.0, other or unknown")


@dataclass
class PackPlan:
    """What pack decided before writing a byte: the images kept and left out, their groups, splits and shards."""

    src: Path
    out: Path
    options: PackOptions  # with val_fraction and test_fraction resolved for this source
    scan: Scan
    facts: list[ImageFacts]  # every readable image (the audit report describes them all)
    skipped: list[Skipped]
    clashes: list[Clash]
    excluded: list[dict]  # exact duplicates and label conflicts, left out
    report: dict  # the audit (audit.json)
    classes: list[str]
    grouping: Grouping | None  # None with val_split random
    warned: list[str]  # what the packer could not honour or doubts (the manifest keeps them)
    shards: dict[str, list[tuple[Path, list[Sample]]]]  # split -> [(shard path, its samples)]


def pack_shards(src: Path, out: Path, options: PackOptions | None = None, *, say: Say = say) -> ShardManifest:
    """Pack the images of `src` (a folder in any layout of sources.py, or a CSV listing) into shards, a manifest
    and an audit report in `out`: plan, write, describe; return the manifest. Every line for the user goes
    through `say`."""
    src, out, options = Path(src), Path(out), options or PackOptions()
    options.check()
    with Workers(options.workers) as pool:  # checking (decoding, hashing) and tar writing are Python-bound:
        # processes, not threads, use both cores (parallel.py: from a few hundred images on)
        plan = plan_pack(src, out, options, pool, say)
        written = write_pack(plan, pool)
    return describe_pack(plan, written)


def plan_pack(src: Path, out: Path, options: PackOptions, pool: Executor, say: Say) -> PackPlan:
    """Scan and audit the source, group and split what is kept, and cut the splits into shards; writes nothing
    but raises UserError for a source or options pack cannot honour."""
    scan = scan_images(src, options.layout)
    check_out_folder(src, out)
    val_fraction, test_fraction = resolve_fractions(scan.images, options.val_fraction, options.test_fraction)
    options = replace(options, val_fraction=val_fraction, test_fraction=test_fraction)
    writable_folder(out, "--out")  # before the slow checking
    for note in scan.notes:
        say(f"note: {note}")
    facts, unreadable = collect_facts(scan.images, pool)
    skipped = sorted(scan.skipped + unreadable, key=lambda s: s.path)
    keyed, key_clashes = unique_keys([f.image for f in facts])  # only readable files claim keys
    facts = [replace(f, image=img) for img, f in zip(keyed, facts)]
    clashes = scan.clashes + key_clashes
    pairs = near_pairs(facts)
    kept, excluded = apply_policy(facts, pairs)
    if options.strict and (skipped or clashes or excluded):
        first = (f"{skipped[0].path}: {skipped[0].reason}" if skipped else
                 f"{' and '.join(clashes[0].paths)} {clashes[0].conflict}" if clashes else
                 f"{excluded[0]['path']}: {excluded[0]['reason']}")
        raise UserError(f"--strict: {len(skipped)} bad input(s), {len(clashes)} name clash(es), {len(excluded)} "
                        f"duplicate(s) or label conflict(s); nothing written; first: {first}")
    if not kept:
        raise UserError(f"no readable JPEG images in {src} ({len(skipped)} skipped, {len(excluded)} excluded)")
    for s in skipped:
        say(f"warning: skipped {s.path}: {s.reason}")
    for c in clashes:
        say(f"warning: {' and '.join(c.paths)} {c.conflict}: {c.resolution}")
    for e in excluded:
        say(f"warning: excluded {e['path']}: {e['reason']}")
    report = build_report(scan, facts, skipped, excluded, pairs)
    say("\n".join(report_lines(report)))

    classes = scan.classes  # every class the data names, usable images or not: labels never shift
    for empty in sorted(set(classes) - {f.image.class_name for f in kept}):
        say(f"warning: class {empty} has no usable images (kept in the class list, label {classes.index(empty)})")
    if options.val_split == "random":
        grouping = None
        say("groups: none (--val-split random splits val by image, to show the leak)")
    else:
        grouping = group_images(kept, requested=options.groups, has_groups=scan.has_groups, cells_file=options.cells,
                                seed=options.seed, pool=pool, say=say)
        say(f"groups: {grouping.method} ({grouping.why})")
        for rel in grouping.set_apart:
            say(f"warning: {rel} has no cell features to match (an evenly coloured image?): set apart as a "
                "group of its own")
    samples = assign_splits(kept, grouping.groups if grouping else {}, classes, seed=options.seed,
                            val_fraction=val_fraction, test_fraction=test_fraction, val_split=options.val_split)
    warned = check_samples(samples, classes, val_fraction=0.0 if options.val_split == "random" else val_fraction,
                           test_fraction=test_fraction)
    for line in warned:
        say(f"warning: {line}")
    if not test_fraction and not any(s.split in EVAL_SPLITS for s in samples):
        say("note: no test split: the data gives none and --test-fraction is 0 (pass e.g. --test-fraction 0.15)")
    if not any(s.split == "val" for s in samples) and not any(in_pool(f.image) for f in kept):
        say("note: no val split: the data gives none and every image its split (a listing's rows given train stay "
            "in train); leave the split empty on rows the packer may deal into val")
    shards = plan_shards(samples, out, seed=options.seed, shard_size=options.shard_size)
    return PackPlan(src, out, options, scan, facts, skipped, clashes, excluded, report, classes, grouping, warned,
                    shards)


def write_pack(plan: PackPlan, pool: Executor) -> dict[str, list[ShardInfo]]:
    """Clear an earlier pack (with --overwrite) and write the planned tars; on failure remove what was written."""
    out = plan.out
    try:
        clear_old_pack(out, plan.options.overwrite)
    except OSError as err:
        raise UserError(f"cannot clear {out} for the new shards: {err.strerror or err}") from None
    try:
        with progress(total=sum(len(c) for jobs in plan.shards.values() for _, c in jobs), desc="packing",
                      unit="img") as bar:
            futures = {split: [pool.submit(write_shard, path, chunk, plan.classes) for path, chunk in jobs]
                       for split, jobs in plan.shards.items()}
            written = 0
            for split, jobs in plan.shards.items():
                for future, (_, chunk) in zip(futures[split], jobs):
                    future.result()
                    bar.update(len(chunk))
                    written += 1
                    at_shard(written)  # the interruption test's hook: a no-op unless it is set
    except (OSError, UserError) as err:  # a full disk, a folder we may not write in, a file changed meanwhile...
        pool.shutdown(wait=True, cancel_futures=True)  # no worker may rename a shard into place after the cleanup
        remove_partial(out, plan.shards)
        if isinstance(err, UserError):
            raise
        raise UserError(f"cannot write shards to {out}: {err.strerror or err} (the partial shards were removed)") \
            from None
    return {split: [f.result() for f in fs] for split, fs in futures.items()}


def describe_pack(plan: PackPlan, written: dict[str, list[ShardInfo]]) -> ShardManifest:
    """The manifest of the written shards, then the audit report, the descriptions other readers look for and,
    last, the manifest itself (its presence means everything above is complete)."""
    options, classes = plan.options, plan.classes
    splits = {}
    for split, jobs in plan.shards.items():
        members = [s for _, chunk in jobs for s in chunk]
        splits[split] = SplitInfo(
            samples=len(members),
            samples_per_class={c: sum(1 for s in members if s.label == k) for k, c in enumerate(classes)},
            groups_per_class={c: len({s.group for s in members if s.label == k}) for k, c in enumerate(classes)},
            samples_per_fold={str(f): sum(1 for s in members if s.fold == f) for f in range(FOLDS)},
            shards=written[split],
        )
    manifest = ShardManifest(
        classes=classes,
        splits=splits,
        dataset=dataset_name(plan.src, plan.scan.layout, options.name),
        layout=plan.scan.layout,
        groups=plan.grouping.record() if plan.grouping else {"method": "none", "why": "--val-split random"},
        skipped=[{"path": s.path, "reason": s.reason} for s in plan.skipped],
        excluded=plan.excluded,
        clashes=[{"paths": list(c.paths), "conflict": c.conflict, "resolution": c.resolution} for c in plan.clashes],
        warnings=plan.warned,
        audit={k: plan.report[k] for k in ("exact_duplicates", "near_duplicates")} | {"report": AUDIT_NAME},
        folds=FOLDS,
        args={"src": str(plan.src.resolve()), "seed": options.seed, "val_fraction": options.val_fraction,
              "test_fraction": options.test_fraction, "val_split": options.val_split, "layout": options.layout,
              "groups": options.groups, "cells": str(options.cells) if options.cells else None,
              "shard_size": options.shard_size, "strict": options.strict},
        tool_version=__version__,
    )
    for key in ("exact_duplicates", "near_duplicates"):  # the manifest keeps the counts; the lists are in audit.json
        manifest.audit[key] = {k: v for k, v in manifest.audit[key].items() if k != "list"}
    try:
        write_report(plan.report, plan.out / AUDIT_NAME, plan.facts)  # and the page, AUDIT_PAGE
        licence = options.license or source_info(plan.src, "license") or "unknown"
        write_descriptions(plan.out, manifest, license=licence)  # _info.json, README.md (datasets), *.wids.json
        manifest.save(plan.out)  # last: its presence means every shard and description above is complete
    except OSError as err:
        remove_partial(plan.out, plan.shards)
        raise UserError(f"cannot write the manifest to {plan.out}: {err.strerror or err} (the shards were removed: "
                        "nothing reads shards without their manifest)") from None
    return manifest


def check_shard(path: Path, shard: ShardInfo, classes: list[str]) -> list[dict]:
    """The metadata (plus `key`) of every sample of one shard, after checking size, checksum, JPEGs and labels;
    ValueError if bad."""
    if not path.is_file():
        raise ValueError("missing")
    if path.stat().st_size != shard.bytes:
        raise ValueError(f"{path.stat().st_size} bytes, manifest says {shard.bytes} (truncated or replaced?)")
    if file_sha256(path) != shard.sha256:
        raise ValueError("sha256 does not match the manifest (corrupted)")
    import webdataset as wds  # verify reads with the reader training uses (it loads torch: pack does not)

    metas = []
    try:
        for sample in wds.tarfile_samples([{"url": str(path)}]):
            if {k for k in sample if not k.startswith("__")} != {"jpg", "cls", "json"}:
                raise ValueError(f"sample {sample['__key__']} holds {sorted(sample)}, expected jpg/cls/json once")
            meta, label = json.loads(sample["json"]), int(sample["cls"])
            if not 0 <= label < len(classes) or classes[label] != meta["class_name"]:
                raise ValueError(f"sample {sample['__key__']}: label {label} does not match class {meta['class_name']}")
            check_jpeg(sample["jpg"])
            metas.append({**meta, "key": sample["__key__"], "sha256": hashlib.sha256(sample["jpg"]).hexdigest()})
    except ValueError:
        raise
    except (tarfile.TarError, OSError, KeyError, TypeError, UnicodeDecodeError) as err:  # a bad tar or bad metadata
        raise ValueError(f"{type(err).__name__}: {err}") from None
    if len(metas) != shard.samples:
        raise ValueError(f"{len(metas)} samples, manifest says {shard.samples}")
    return metas


def recount(metas: list[dict], classes: list[str], folds: int) -> dict:
    """What the manifest says of a split, counted from its samples' own metadata."""
    return {
        "samples": len(metas),
        "samples_per_class": {c: sum(1 for m in metas if m["class_name"] == c) for c in classes},
        "groups_per_class": {c: len({m["group"] for m in metas if m["class_name"] == c}) for c in classes},
        "samples_per_fold": {str(f): sum(1 for m in metas if m["fold"] == f) for f in range(folds)},
    }


def check_crossings(metas: dict[str, list[dict]], carved: set[str]) -> None:
    """UserError if an image's bytes sit in two splits (test splits the data gives may share them: the packer
    never edits those), or if a group sits in two splits or two folds. An image of a split the data gave (not
    `carved` by the packer) whose group is its own key is a group of its own (keys are unique within a split)."""
    first_split: dict[str, tuple[str, str]] = {}
    for split, items in metas.items():
        for m in items:
            other = first_split.setdefault(m["sha256"], (split, m["key"]))
            if other[0] != split and not (other[0] in EVAL_SPLITS and split in EVAL_SPLITS):
                raise UserError(f"image {m['key']} of split {split} has the same bytes as {other[1]} of split "
                                f"{other[0]}: a leak between splits")
    owner: dict[str, tuple[str, int]] = {}
    for split, items in metas.items():
        for m in items:
            if m["group"] == m["key"] and split not in carved:
                continue
            first, fold = owner.setdefault(m["group"], (split, m["fold"]))
            if first != split:
                raise UserError(f"group {m['group']} is in split {first} and in split {split}: a leak")
            if fold != m["fold"]:
                raise UserError(f"group {m['group']} is in folds {fold} and {m['fold']}: grouped cross-validation "
                                "would cut it")


def verify_shards(folder: Path) -> ShardManifest:
    """Re-read every shard and recount from the samples everything readers rely on (split totals, samples per
    class, group and fold, the folds, the splits there are); check that no image or group crosses splits;
    raise UserError at the first difference."""
    folder = Path(folder)
    manifest = ShardManifest.load(folder)
    if manifest.folds != FOLDS:
        raise UserError(f"{folder}: manifest says {manifest.folds} folds, shards of this format have {FOLDS}")
    listed = {shard.file for split in manifest.splits.values() for shard in split.shards}
    unlisted = sorted(p.name for p in folder.glob("*.tar") if p.name not in listed)
    if unlisted:
        raise UserError(f"{folder}: shard(s) not in the manifest: {', '.join(unlisted[:3])} (edited manifest?)")
    every: dict[str, list[dict]] = {}
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
        for m in metas:
            m.setdefault("group", m.get("cell"))  # format 2 named the group "cell"
        counted = recount(metas, manifest.classes, manifest.folds)
        for field_name, value in counted.items():
            if getattr(split, field_name) != value:
                raise UserError(f"split {split_name}: {field_name} in the manifest is {getattr(split, field_name)}, "
                                f"the shards hold {value}")
        every[split_name] = metas
    carved = {"train"} | {s for s in ("val", "test") if manifest.args.get(f"{s}_fraction")}
    check_crossings(every, carved)
    try:
        check_descriptions(folder, manifest)
    except ValueError as err:
        raise UserError(f"{folder}: {err}") from None
    return manifest


def print_summary(manifest: ShardManifest, seconds: float, say: Say = say) -> None:
    """Images per split and class, groups, what was left out, and throughput."""
    total = sum(s.samples for s in manifest.splits.values())
    width = max(len(c) for c in manifest.classes)
    say(f"{'split':<12} {'class':<{width}} {'images':>7} {'groups':>7}")
    for name, split in manifest.splits.items():
        for c in manifest.classes:
            say(f"{name:<12} {c:<{width}} {split.samples_per_class[c]:>7} {split.groups_per_class[c]:>7}")
        say(f"{name:<12} {'(all)':<{width}} {split.samples:>7} {sum(split.groups_per_class.values()):>7}  "
              f"in {len(split.shards)} shards")
    kinds = Counter(s["reason"] for s in manifest.skipped)
    notes = [f"{kinds[reason]} {what}" for reason, what in ((LINK_OUT, "symbolic link(s) leading out of the source "
                                                             "root, not followed"), (HIDDEN, "hidden folder(s)"),
                                                            (NOT_REGULAR, "not a regular file, not read")) if kinds[reason]]
    link_note = f" ({', '.join(notes)})" if notes else ""
    clash_note = f", {len(manifest.clashes)} name clash(es) resolved (manifest: clashes)" if manifest.clashes else ""
    excluded = f", excluded {len(manifest.excluded)} duplicate(s) or label conflict(s)" if manifest.excluded else ""
    say(f"packed {total} images of {manifest.dataset!r}, skipped {len(manifest.skipped)}{link_note}{excluded}"
          f"{clash_note}, in {seconds:.1f} s ({total / seconds:,.0f} images/s); groups: {manifest.groups['method']}; "
          f"audit report: {AUDIT_NAME}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: `pack` or `verify`."""
    parser = Parser(prog="bloodcells", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", help="pack image folders or a CSV listing into shards")
    pack.add_argument("--src", type=Path, required=True,
                      help="dataset root (split folders or class folders) or a CSV listing path,label[,group][,split]")
    pack.add_argument("--out", type=Path, required=True, help="output folder for shards and manifest.json")
    pack.add_argument("--layout", choices=LAYOUTS, default="auto", help="how --src is laid out (default: detected)")
    pack.add_argument("--name", help="the dataset's name, recorded in the manifest and model cards "
                                     "(default: SRC/dataset.json's name, blood-cells for the Kaggle download, "
                                     "else the folder name)")
    pack.add_argument("--seed", type=int, default=0, help="seed of the splits, folds and shard order (default: 0)")
    pack.add_argument("--val-fraction", type=float, default=None,
                      help=f"share of the groups of each class held out as val (default {DEFAULT_VAL_FRACTION}; "
                           "0 where the data gives a val split)")
    pack.add_argument("--test-fraction", type=float, default=0.0,
                      help="share of the groups of each class held out as test, where the data gives no test split "
                           "(default: 0)")
    pack.add_argument("--groups", choices=METHODS, default="auto",
                      help="the unit a split never cuts: recovered cells of augmented copies, the listing's group "
                           "column, or single files; auto measures the data (see README, Your own data)")
    pack.add_argument("--val-split", choices=VAL_SPLITS, default="group", metavar="{group,random}",
                      help="group (default): whole groups go to val (honest); random: single images (leaks copies of "
                           "a cell into both sides, to show the leak); cell, group's former name, still means group")
    pack.add_argument("--cells", type=Path, help="cell mapping from `bloodcells cells` "
                      "(with --groups cells; default: recover the cells while packing)")
    pack.add_argument("--shard-size", type=int, help="samples per shard (default: at least 16 shards per big split)")
    pack.add_argument("--strict", action="store_true",
                      help="any bad input, name clash, duplicate or label conflict is an error and nothing is written")
    pack.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    workers = min(2, os.cpu_count() or 1)
    pack.add_argument("--workers", type=int, default=workers,
                      help=f"processes for checking and writing (default: {workers}, at most 2 or the CPU count; "
                           f"under {MIN_PARALLEL} images the packer works alone, as a pool would cost more)")
    pack.add_argument("--license", help="the images' licence, written to the dataset card (README.md), e.g. "
                                        "cc-by-4.0 or other (default: SRC/dataset.json's license, else unknown)")
    verify = sub.add_parser("verify", help="re-read and check every shard of a folder")
    verify.add_argument("dir", type=Path, metavar="DIR",
                        help="a shard folder written by `bloodcells pack` (holding manifest.json)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.command == "pack":
        options = PackOptions(seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                              val_split=args.val_split, layout=args.layout, groups=args.groups, cells=args.cells,
                              name=args.name, shard_size=args.shard_size, strict=args.strict,
                              overwrite=args.overwrite, workers=args.workers, license=args.license)
        manifest = pack_shards(args.src, args.out, options)
        print_summary(manifest, time.perf_counter() - start)
    else:
        manifest = verify_shards(args.dir)
        n = sum(s.samples for s in manifest.splits.values())
        shards = sum(len(s.shards) for s in manifest.splits.values())
        say(f"ok: {shards} shards, {n} samples verified in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
