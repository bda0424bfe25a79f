"""Descriptions of a shard folder for other readers, derived from its manifest: timm's `_info.json`, a
Hugging Face dataset card (`README.md`, read by `datasets.load_dataset(DIR)`) and one `wids` index per split.

Written by `pack` before the manifest; `verify` checks that they still agree with it. None of these
readers is needed to write them.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import yaml

from ..cli import UserError
from ..files import parse_user_yaml, write_atomic
from .manifest import MANIFEST_NAME, ShardManifest

TIMM_INFO = "_info.json"  # timm's ReaderWds looks for this name (or info.json) in --data-dir
CARD = "README.md"  # datasets.load_dataset(DIR) reads its YAML header; the Hub shows it as the dataset card
READER_SPLIT_NAMES = {"val": "validation"}  # what timm (--val-split validation) and HF scripts (dataset["validation"]) read
JSON_DTYPES = {bool: "bool", int: "int64", float: "float64", str: "string"}


def split_names(manifest: ShardManifest) -> list[str]:
    """The manifest's splits in reading order (train, val, test, test_simple, then any other), whatever
    order its JSON holds them in: the descriptions written at pack time and checked later must agree."""
    order = ["train", "val", "test", "test_simple"]
    return sorted(manifest.splits, key=lambda s: (order.index(s) if s in order else len(order), s))


def wids_index_name(split: str) -> str:
    """File name of a split's wids index, e.g. train.wids.json."""
    return f"{split}.wids.json"


def timm_info(manifest: ShardManifest) -> dict:
    """timm's `_info.json`: per split its sample count, shard files and shard lengths; val is `validation`."""
    splits = {}
    for name in split_names(manifest):
        split, timm_name = manifest.splits[name], READER_SPLIT_NAMES.get(name, name)
        splits[timm_name] = {"name": timm_name, "num_samples": split.samples,
                             "filenames": [s.file for s in split.shards],
                             "shard_lengths": [s.samples for s in split.shards]}
    return {"name": "bloodcells", "num_classes": len(manifest.classes), "classes": manifest.classes,
            "splits": splits}


def wids_index(manifest: ShardManifest, split: str) -> dict:
    """A wids shard index (`wids.ShardListDataset(DIR/train.wids.json)`); URLs are relative to the index."""
    return {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"bloodcells-{split}",
            "shardlist": [{"url": s.file, "nsamples": s.samples, "filesize": s.bytes}
                          for s in manifest.split(split).shards]}


def sample_metadata(folder: Path, manifest: ShardManifest) -> dict:
    """The `.json` metadata of the first sample of the first shard: its fields become the card's json struct."""
    first = manifest.splits[split_names(manifest)[0]].shards[0].file
    with tarfile.open(Path(folder) / first) as tar:
        for member in tar:
            data = tar.extractfile(member) if member.name.endswith(".json") else None
            if data is not None:
                return json.loads(data.read())
    raise ValueError(f"{first} holds no .json metadata")


def card_header(manifest: ShardManifest, metadata: dict, license: str = "unknown") -> dict:
    """The dataset card's YAML header: the images' licence, one data_files entry per split (so test_simple stays
    apart from test; val is `validation`, the name HF's scripts read) and the features, with `cls` a ClassLabel
    naming the classes. `datasets` names the columns after the tar members' extensions (jpg, cls, json): no card
    key renames them, and renaming the members would break the readers that look for jpg and cls."""
    features = [
        {"name": "jpg", "dtype": "image"},
        {"name": "cls", "dtype": {"class_label": {"names": {str(i): c for i, c in enumerate(manifest.classes)}}}},
        {"name": "json", "struct": [{"name": k, "dtype": JSON_DTYPES.get(type(v), "string")}
                                    for k, v in sorted(metadata.items())]},
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
    ]
    return {
        "license": license,
        "pretty_name": f"{manifest.dataset} (WebDataset shards)",
        "task_categories": ["image-classification"],
        "size_categories": [size_category(sum(s.samples for s in manifest.splits.values()))],
        "configs": [{"config_name": "default", "default": True,
                     "data_files": [{"split": READER_SPLIT_NAMES.get(name, name),
                                     "path": [s.file for s in manifest.splits[name].shards]}
                                    for name in split_names(manifest)]}],
        # No `splits` here: datasets wants their Arrow byte sizes, which only it can know.
        "dataset_info": {"config_name": "default", "features": features},
    }


def size_category(n: int) -> str:
    """The Hub's size bucket for n samples."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "n>1M"


def dataset_card(manifest: ShardManifest, metadata: dict, license: str = "unknown") -> str:
    """README.md: the YAML header that `datasets` reads, then what a reader of the Hub page needs."""
    rows = "\n".join(
        f"| {name} | {' | '.join(f'{split.samples_per_class.get(c, 0):,}' for c in manifest.classes)} "
        f"| {split.samples:,} | {len(split.shards)} |"
        for name, split in ((n, manifest.splits[n]) for n in split_names(manifest)))
    header = yaml.safe_dump(card_header(manifest, metadata, license), sort_keys=False, allow_unicode=True)
    hf_splits = ", ".join(READER_SPLIT_NAMES.get(n, n) for n in split_names(manifest))
    first = split_names(manifest)[0]
    return f"""---
{header}---

# {manifest.dataset}, as WebDataset shards

White blood cell images (JPEG, the original bytes) of {len(manifest.classes)} classes, packed by
`bloodcells pack` (tool version {manifest.tool_version}) from a source laid out as
`{manifest.layout}`. Each sample holds `jpg` (the image), `cls` (the class index) and `json` (class name,
split, group, cross-validation fold, source path, width, height). `manifest.json` lists every shard with its
sha256; `bloodcells verify DIR` re-checks them; `audit.json` lists the duplicates, label
conflicts and unreadable files the packer found and what it did with them.

| split | {' | '.join(manifest.classes)} | all | shards |
|---|{'---|' * len(manifest.classes)}---|---|
{rows}

Splits the source gives (a TEST folder, a listing's split column) are kept whole; the packer cuts the rest by
group ({manifest.groups.get('method', 'none')}: {manifest.groups.get('why', '')}), so that no group
(an augmented cell's copies, a patient, a file and its re-saved copies) is on two sides.

## Reading it

```python
import datasets
ds = datasets.load_dataset("DIR")                     # DatasetDict: {hf_splits}
ds["train"].features["cls"].names                     # {manifest.classes}; the image is ds["train"][0]["jpg"]
import webdataset as wds
wds.WebDataset("DIR/{first}-{{00000..{len(manifest.splits[first].shards) - 1:05d}}}.tar").decode("pil")
import wids
wids.ShardListDataset("DIR/{wids_index_name(first)}")  # random access; one index per split
```

Hugging Face's `run_image_classification.py` (transformers examples) reads it with `--dataset_name DIR
--image_column_name jpg --label_column_name cls` (it validates on `validation`). Licence of the images:
{license} (`bloodcells pack --license`).

timm: `python train.py --data-dir DIR --dataset wds/bloodcells --num-classes {len(manifest.classes)}` reads `_info.json`
(splits `train`, `validation`{''.join(f', `{READER_SPLIT_NAMES.get(n, n)}`' for n in split_names(manifest)
                                     if n not in ('train', 'val'))}).

Not for diagnosis: a research and teaching dataset, not a medical device.
"""


def expected_files(manifest: ShardManifest, metadata: dict, license: str = "unknown") -> dict[str, str]:
    """File name -> text of every description of the folder."""
    files = {TIMM_INFO: json.dumps(timm_info(manifest), indent=1) + "\n",
             CARD: dataset_card(manifest, metadata, license)}
    for split in split_names(manifest):
        files[wids_index_name(split)] = json.dumps(wids_index(manifest, split), indent=1) + "\n"
    return files


def write_descriptions(folder: Path, manifest: ShardManifest, license: str = "unknown") -> list[str]:
    """Write timm's _info.json, the dataset card (with the images' licence) and the wids indexes (atomically
    each); return their names."""
    files = expected_files(manifest, sample_metadata(folder, manifest), license)
    for name, text in files.items():
        write_atomic(Path(folder) / name, text)
    return list(files)


def stale_description_names(folder: Path) -> list[Path]:
    """Descriptions an earlier pack may have left (removed before a new pack writes its own)."""
    folder = Path(folder)
    return [p for p in [folder / TIMM_INFO, folder / CARD, *folder.glob("*.wids.json")] if p.is_file()]


def front_matter(text: str) -> dict:
    """The YAML header of a dataset card (between the leading `---` lines), read strictly (a key given twice or
    an alias bomb is refused, files.parse_user_yaml); ValueError saying what is wrong with it."""
    if not text.startswith("---\n") or "\n---" not in text[4:]:
        raise ValueError("has no YAML header")
    try:
        header = parse_user_yaml(text[4:text.index("\n---", 4)], "its YAML header") or {}
    except UserError as err:
        raise ValueError(str(err)) from None
    if not isinstance(header, dict):
        raise ValueError(f"its YAML header is a {type(header).__name__}, not a mapping")
    return header


def check_descriptions(folder: Path, manifest: ShardManifest) -> None:
    """ValueError naming the first description that is missing or disagrees with the manifest. The card's
    prose may be edited; its `configs` and `dataset_info` (what `datasets` reads) may not."""
    expected = expected_files(manifest, sample_metadata(folder, manifest))
    for name, text in expected.items():
        path = Path(folder) / name
        if not path.is_file():
            raise ValueError(f"{name} is missing (pack writes it)")
        try:
            if name == CARD:
                have, want = front_matter(path.read_text()), front_matter(text)
                keys = ("configs", "dataset_info")
                agree = all(have.get(k) in (want[k], older_card(want)[k]) for k in keys)
            else:
                agree = json.loads(path.read_text()) == json.loads(text)
        except ValueError as err:  # front_matter's, json's, a non-UTF-8 file's
            raise ValueError(f"{name} is unreadable ({err})") from None
        if not agree:
            raise ValueError(f"{name} disagrees with {MANIFEST_NAME} (re-run pack, or restore it)")


def older_card(header: dict) -> dict:
    """A card header as earlier packs wrote it, `val` where `validation` is now: their folders still verify."""
    old = json.loads(json.dumps(header))
    for config in old["configs"]:
        for entry in config["data_files"]:
            entry["split"] = {v: k for k, v in READER_SPLIT_NAMES.items()}.get(entry["split"], entry["split"])
    return old
