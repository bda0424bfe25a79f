"""The shard manifest: what a shard folder holds, written last by the packer and read by every reader."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..cli import UserError
from ..files import write_atomic

MANIFEST_NAME = "manifest.json"
AUDIT_NAME = "audit.json"  # the dataset audit `pack` ran, beside the manifest
# 2: samples grouped by recovered source cell; 3: any grouping, dataset name, audit; 4: the packer's `warnings`.
# A new field bumps it: a reader of the previous format then names the format in one line, rather than refusing the
# field as "not a valid shard manifest". Every earlier format is still read (what it lacks, as empty or as it was).
FORMAT = "bloodcells-shards/4"
SHARD_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar")  # a plain file name in the shard folder


def is_url(location: Path | str) -> bool:
    """Whether shards live behind a URL (https://, gs://, pipe:...) that webdataset opens, not in a local folder."""
    return "://" in str(location) or is_pipe(location)


def is_pipe(location: Path | str) -> bool:
    """Whether webdataset's gopen would run `location` as a shell command (a `pipe:` URL)."""
    try:
        return urlparse(str(location)).scheme == "pipe"  # what gopen dispatches on (any case, spaces stripped)
    except ValueError:  # gopen cannot open it either
        return False


def check_location(location: Path | str, allow_pipe: bool = False) -> None:
    """Refuse a `pipe:` location unless allowed: webdataset's gopen runs it as a shell command."""
    if is_pipe(location) and not allow_pipe:
        raise UserError(f"shard location {str(location)[:80]!r} is a pipe: command, which would be run by a shell; "
                        "pass --allow-pipe if you wrote it and trust it")


def check_shard_file(name: str) -> None:
    """A manifest's shard file must be a plain .tar file name inside the shard folder, nothing else."""
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise ValueError(f"shard file {name!r} is an absolute path")
    if ".." in name:
        raise ValueError(f"shard file {name!r} leaves the shard folder (..)")
    if not name.endswith(".tar"):
        raise ValueError(f"shard file {name!r} is not a .tar file")
    if not SHARD_FILE.fullmatch(name):
        raise ValueError(f"shard file {name!r} is not a plain file name (letters, digits, '_', '-', '.')")


def read_text(location: Path | str) -> str:
    """A local file, or a URL through webdataset's gopen (curl for http(s), gsutil for gs, ...)."""
    if not is_url(location):
        return Path(location).read_text()
    import webdataset  # imports torch: only when shards are remote

    try:
        with webdataset.gopen(str(location), "rb") as stream:
            return stream.read().decode()
    except (OSError, UnicodeDecodeError):
        raise
    except Exception as err:  # gopen's pipes (curl, gsutil...) report a failed transfer as a bare Exception
        raise OSError(f"{type(err).__name__}: {err}") from None


@dataclass(frozen=True)
class ShardInfo:
    """One tar file of a split."""

    file: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """One split (train, val, test, test_simple) and its shards."""

    samples: int
    samples_per_class: dict[str, int]
    groups_per_class: dict[str, int]  # groups (cells, patients, files) the split holds per class
    samples_per_fold: dict[str, int]  # fold index (as text, for JSON) -> samples, for cell-grouped k-fold CV
    shards: list[ShardInfo]


@dataclass(frozen=True)
class ShardManifest:
    """Everything `verify`, the trainer and the evaluator need to know about a shard folder."""

    classes: list[str]
    splits: dict[str, SplitInfo]
    dataset: str = "blood-cells"  # the name given at pack time (model cards name it)
    layout: str = "splits"  # how the source was laid out: splits | classes | csv
    groups: dict = field(default_factory=dict)  # method (cells | csv | files), why, what auto measured
    skipped: list[dict[str, str]] = field(default_factory=list)  # unreadable or stray inputs, with the reason
    excluded: list[dict] = field(default_factory=list)  # readable images the audit's policy left out, and why
    clashes: list[dict] = field(default_factory=list)  # names differing only in case/suffix, and what was done
    warnings: list[str] = field(default_factory=list)  # what the packer could not honour or doubts (one class...)
    audit: dict = field(default_factory=dict)  # duplicate counts; the whole report is AUDIT_NAME
    folds: int = 5
    args: dict = field(default_factory=dict)
    tool_version: str = ""
    format: str = FORMAT
    # Not saved: the `pipe:` location load() was allowed to read (by --allow-pipe), which shard_urls then accepts.
    allowed_pipe: str = field(default="", repr=False, compare=False)

    def split(self, name: str) -> SplitInfo:
        """The named split, or a UserError listing the splits there are."""
        if name not in self.splits:
            raise UserError(f"split {name!r} is not in the shards (have: {', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def to_json(self) -> str:
        """Stable JSON text (sorted keys) so two identical packs give identical bytes."""
        fields = asdict(self)
        del fields["allowed_pipe"]
        return json.dumps(fields, indent=1, sort_keys=True) + "\n"

    def save(self, folder: Path) -> None:
        """Write atomically: a reader sees the old manifest, or none, or the complete new one."""
        write_atomic(Path(folder) / MANIFEST_NAME, self.to_json())

    @classmethod
    def load(cls, folder: Path | str, allow_pipe: bool = False) -> ShardManifest:
        """Read `folder/manifest.json`; a missing, unreadable or invalid one (e.g. a shard file outside the
        folder) is a UserError, and so is a `pipe:` folder unless allowed."""
        check_location(folder, allow_pipe)
        path = f"{str(folder).rstrip('/')}/{MANIFEST_NAME}" if is_url(folder) else Path(folder) / MANIFEST_NAME
        try:
            text = read_text(path)
        except FileNotFoundError:
            raise UserError(f"{path} not found: is {folder} a shard folder written by `bloodcells pack`?") from None
        except (OSError, UnicodeDecodeError) as err:  # unreadable file or storage error
            raise UserError(f"cannot read {path}: {type(err).__name__}: {err}") from None
        try:
            raw = json.loads(text)
            if raw.get("format") == "bloodcells-shards/2":  # same shards; the group was called a cell
                raw["format"] = FORMAT
                for split in raw["splits"].values():
                    split["groups_per_class"] = split.pop("cells_per_class")
                raw["groups"] = {"method": "cells" if raw.get("args", {}).get("val_split") != "random" else "none"}
            if raw.get("format") == "bloodcells-shards/3":  # 4 adds `warnings` (packs of 3 wrote it, or none: empty)
                raw["format"] = FORMAT
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, this version reads {FORMAT}")
            splits = {
                name: SplitInfo(**{**s, "shards": [ShardInfo(**sh) for sh in s["shards"]]})
                for name, s in raw.pop("splits").items()
            }
            for split in splits.values():
                for shard in split.shards:
                    check_shard_file(shard.file)
            raw.pop("allowed_pipe", None)
            return cls(splits=splits, **raw, allowed_pipe=str(folder) if allow_pipe and is_pipe(folder) else "")
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise UserError(f"{path} is not a valid shard manifest ({err})") from None

    def shard_urls(self, folder: Path | str, split: str) -> list[str]:
        """The split's shard locations under `folder` (a local path or any URL webdataset can open; `pipe:` only
        the location this manifest was loaded from with allow_pipe)."""
        check_location(folder, bool(self.allowed_pipe) and str(folder) == self.allowed_pipe)
        base = str(folder).rstrip("/")
        return [f"{base}/{s.file}" for s in self.split(split).shards]
