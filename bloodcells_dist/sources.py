"""Find the dataset's JPEG folders on disk and check each file before it goes into a shard."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import simplejpeg
from PIL import Image

from .cli import UserError

# Folder name (any case) -> split name in the shards.
SPLIT_FOLDERS = {"train": "train", "test": "test", "test_simple": "test_simple"}
JPEG_SUFFIXES = {".jpeg", ".jpg"}


@dataclass(frozen=True)
class SourceImage:
    """One JPEG file found under a split/class folder."""

    path: Path  # absolute
    rel_path: str  # relative to the dataset root, '/'-separated
    split: str  # train | test | test_simple (before the train/val split)
    class_name: str
    key: str  # WebDataset key: base_key(), made unique within the split by unique_keys()


@dataclass(frozen=True)
class Skipped:
    """A file or folder left out of the shards, and why."""

    path: str
    reason: str


def base_key(class_name: str, stem: str) -> str:
    """`{CLASS}/{stem}` with dots made `_` (webdataset splits extensions at dots): stable, readable."""
    return f"{class_name}/{stem.replace('.', '_')}"


LINK_OUT = "symbolic link leading outside the source root (not followed)"


@dataclass(frozen=True)
class Clash:
    """Names that differ only in case or suffix: folders read as one, or a file packed under another key."""

    paths: tuple[str, ...]
    conflict: str  # e.g. "are one split 'train'", "both map to key A/_1_2"
    resolution: str  # what the packer did without --strict, e.g. "both read", "the second packed as A/_1_2-2"


@dataclass
class Scan:
    """What a source root holds: candidate images, what was left out and why, the classes, name clashes."""

    images: list[SourceImage]
    skipped: list[Skipped]
    classes: list[str]  # every class folder name (upper case) in any split, sorted: label = index
    clashes: list[Clash] = field(default_factory=list)


def images_folder(root: Path) -> Path:
    """The folder holding the split folders: the dataset root as downloaded, ROOT/images or ROOT itself."""
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist or is not a folder")
    for images in (root / "dataset2-master" / "dataset2-master" / "images", root / "images", root):
        if images.is_dir() and any(p.is_dir() and p.name.lower() in SPLIT_FOLDERS for p in images.iterdir()):
            return images
    raise UserError(
        f"no TRAIN, TEST or TEST_SIMPLE folder under {root} "
        "(expected ROOT/dataset2-master/dataset2-master/images/TRAIN/... or ROOT/TRAIN/...)"
    )


def find_split_folders(root: Path) -> dict[str, list[Path]]:
    """Map split name -> its folders, sorted: several when names differ only in case (TRAIN and train)."""
    found: dict[str, list[Path]] = {}
    for p in sorted(images_folder(root).iterdir()):
        if p.is_dir() and p.name.lower() in SPLIT_FOLDERS:
            found.setdefault(SPLIT_FOLDERS[p.name.lower()], []).append(p)
    return found


def leaves_root(path: Path, root: Path) -> bool:
    """Whether `path` is a symbolic link whose target lies outside `root` (an absolute, resolved path)."""
    return path.is_symlink() and not path.resolve().is_relative_to(root)


def scan_images(root: Path) -> Scan:
    """Every candidate image under the split/class folders, sorted; everything else is listed as skipped.

    Folder names are matched in any case: TRAIN and train are one split, A and a one class (both read, a
    clash noted). Symbolic links that leave the root are not followed."""
    root = root.resolve()
    scan = Scan(images=[], skipped=[], classes=[])

    def rel(p: Path) -> str:
        return p.relative_to(root).as_posix()

    def entries(folder: Path) -> Iterator[Path]:  # a folder's entries, links out of the root skipped
        for p in sorted(folder.iterdir()):
            if leaves_root(p, root):
                scan.skipped.append(Skipped(rel(p), LINK_OUT))
            else:
                yield p

    top = images_folder(root)
    split_dirs: dict[str, list[Path]] = {}
    classes: set[str] = set()
    for p in entries(top):
        if p.is_dir() and p.name.lower() in SPLIT_FOLDERS:
            split_dirs.setdefault(SPLIT_FOLDERS[p.name.lower()], []).append(p)
        else:
            what = "folder" if p.is_dir() else "file"
            scan.skipped.append(Skipped(rel(p), f"stray {what} beside the split folders (TRAIN, TEST, TEST_SIMPLE)"))
    for split, folders in split_dirs.items():
        if len(folders) > 1:
            scan.clashes.append(Clash(tuple(map(rel, folders)), f"are one split {split!r}", "all read"))
        class_dirs: dict[str, list[Path]] = {}
        for split_dir in folders:
            for class_dir in entries(split_dir):
                if not class_dir.is_dir():
                    scan.skipped.append(Skipped(rel(class_dir), "stray file beside the class folders"))
                    continue
                class_dirs.setdefault(class_dir.name.upper(), []).append(class_dir)
        for class_name, dirs in sorted(class_dirs.items()):
            classes.add(class_name)  # even with no images: a class never drops out of the label list
            if len({d.name for d in dirs}) > 1:
                scan.clashes.append(Clash(tuple(map(rel, dirs)), f"are one class {class_name!r}", "all read"))
            for class_dir in dirs:
                candidates = 0
                for path in entries(class_dir):
                    if path.is_dir():
                        scan.skipped.append(Skipped(rel(path), "unexpected folder inside a class folder"))
                    elif path.suffix.lower() not in JPEG_SUFFIXES:
                        scan.skipped.append(Skipped(rel(path), f"not a .jpeg/.jpg file name ({path.suffix or 'no suffix'})"))
                    else:
                        candidates += 1
                        scan.images.append(SourceImage(path, rel(path), split, class_name,
                                                       base_key(class_name, path.stem)))
                if not candidates:
                    scan.skipped.append(Skipped(rel(class_dir), "class folder without .jpeg/.jpg files "
                                                                "(the class is kept, with no images from here)"))
    if not scan.images:
        raise UserError(f"no .jpeg/.jpg images found under {root}")
    scan.classes = sorted(classes)
    return scan


def unique_keys(images: list[SourceImage]) -> tuple[list[SourceImage], list[Clash]]:
    """Make keys unique within each split without losing a file: of the files sharing a key (`_1_2.jpeg`,
    `_1_2.JPEG`, `_1_2.jpg`; `a.b.jpeg` and `a_b.jpeg`; A/x and a/x), the first by path keeps it and each
    other one gets the first free `{key}-{n}`, n = 2, 3, ... Returns the images (same order) and the clashes."""
    taken = {(img.split, img.key) for img in images}
    first: dict[tuple[str, str], SourceImage] = {}
    renamed: dict[str, SourceImage] = {}
    clashes = []
    for img in sorted(images, key=lambda i: i.rel_path):
        owner = first.setdefault((img.split, img.key), img)
        if owner is img:
            continue
        n = 2
        while (img.split, f"{img.key}-{n}") in taken:
            n += 1
        new = replace(img, key=f"{img.key}-{n}")
        taken.add((img.split, new.key))
        renamed[img.rel_path] = new
        clashes.append(Clash((owner.rel_path, img.rel_path), f"both map to key {img.key}",
                             f"the second packed as {new.key}"))
    return [renamed.get(img.rel_path, img) for img in images], clashes


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
            warnings.simplefilter("error")  # PIL warns (not raises) on some corrupt headers
            image = Image.open(io.BytesIO(data))  # reads the header only
            size, mode = image.size, image.mode
    except Exception as err:  # PIL raises OSError, SyntaxError, Image.DecompressionBombError...
        raise ValueError(f"corrupt JPEG ({err})") from None
    if mode != "RGB":
        raise ValueError(f"{mode} image, expected RGB (3 channels)")
    # A full decode with libjpeg-turbo that treats its warnings as errors (strict): a stream cut short with an
    # end marker appended, or garbled entropy-coded data, decodes with grey or smeared blocks and only a
    # warning, which PIL and torchvision swallow. (A flip that still forms valid codes cannot be seen.)
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except Exception as err:  # simplejpeg raises ValueError for errors and, strict, for warnings
        if "Premature end of JPEG file" in str(err):
            raise ValueError("truncated JPEG (premature end of file)") from None
        raise ValueError(f"corrupt JPEG ({err})") from None
    return size
