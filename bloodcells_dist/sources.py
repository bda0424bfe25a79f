"""Find the dataset's JPEG folders on disk and check each file before it goes into a shard."""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .cli import UserError

# Folder name (any case) -> split name in the shards.
SPLIT_FOLDERS = {"train": "train", "test": "test", "test_simple": "test_simple"}
JPEG_SUFFIXES = {".jpeg", ".jpg"}
# `_{i}_{r}`: augmented copy of original cell `i` of its class; `r` is a random tag.
COPY_NAME = re.compile(r"^_(\d+)_(\d+)$")


@dataclass(frozen=True)
class SourceImage:
    """One JPEG file found under a split/class folder."""

    path: Path  # absolute
    rel_path: str  # relative to the dataset root, '/'-separated
    split: str  # train | test | test_simple (before the train/val split)
    class_name: str
    group: str  # images of one original cell share a group: "{class}/{i}"

    @property
    def key(self) -> str:
        """WebDataset key: unique within a split, stable, no dots (webdataset splits extensions at dots)."""
        return f"{self.class_name}/{self.path.stem.replace('.', '_')}"


@dataclass(frozen=True)
class Skipped:
    """A file or folder left out of the shards, and why."""

    path: str
    reason: str


def group_of(class_name: str, stem: str) -> str:
    """Group id of an image: all copies `_{i}_*` of one original cell share it; other names are their own group."""
    match = COPY_NAME.match(stem)
    return f"{class_name}/{match.group(1)}" if match else f"{class_name}/{stem}"


def find_split_folders(root: Path) -> dict[str, Path]:
    """Map split name -> folder, for the dataset root as downloaded or any folder holding split folders."""
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist or is not a folder")
    for images in (root / "dataset2-master" / "dataset2-master" / "images", root / "images", root):
        if images.is_dir():
            found = {
                SPLIT_FOLDERS[p.name.lower()]: p
                for p in sorted(images.iterdir())
                if p.is_dir() and p.name.lower() in SPLIT_FOLDERS
            }
            if found:
                return found
    raise UserError(
        f"no TRAIN, TEST or TEST_SIMPLE folder under {root} "
        "(expected ROOT/dataset2-master/dataset2-master/images/TRAIN/... or ROOT/TRAIN/...)"
    )


def scan_images(root: Path) -> tuple[list[SourceImage], list[Skipped]]:
    """List every candidate image under the split/class folders, sorted; stray files and folders are skipped."""
    root = root.resolve()
    images: list[SourceImage] = []
    skipped: list[Skipped] = []

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    for split, split_dir in find_split_folders(root).items():
        for class_dir in sorted(split_dir.iterdir()):
            if not class_dir.is_dir():
                skipped.append(Skipped(rel(class_dir), "stray file beside the class folders"))
                continue
            class_name = class_dir.name.upper()
            for path in sorted(class_dir.iterdir()):
                if path.is_dir():
                    skipped.append(Skipped(rel(path), "unexpected folder inside a class folder"))
                elif path.suffix.lower() not in JPEG_SUFFIXES:
                    skipped.append(Skipped(rel(path), f"not a .jpeg/.jpg file name ({path.suffix or 'no suffix'})"))
                else:
                    group = group_of(class_name, path.stem)
                    images.append(SourceImage(path, rel(path), split, class_name, group))
    if not images:
        raise UserError(f"no .jpeg/.jpg images found under {root}")
    return images, skipped


def check_jpeg(data: bytes) -> tuple[int, int]:
    """Return (width, height) of a complete RGB baseline JPEG, or raise ValueError saying what is wrong."""
    if not data:
        raise ValueError("zero-byte file")
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        raise ValueError("PNG data under a JPEG name")
    if data[:3] != b"\xff\xd8\xff":
        raise ValueError("not JPEG data (no JPEG start marker)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PIL warns (not raises) on some corrupt data
            image = Image.open(io.BytesIO(data))
            size, mode = image.size, image.mode
            if mode != "RGB":
                raise ValueError(f"{mode} image, expected RGB (3 channels)")
            # Decoding at 1/8 scale still parses every entropy-coded byte, so truncation and
            # corruption are caught at about a third of the cost of a full decode.
            image.draft("RGB", (size[0] // 8, size[1] // 8))
            image.load()
    except ValueError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, Image.DecompressionBombError...
        raise ValueError(f"corrupt JPEG ({err})") from None
    return size
