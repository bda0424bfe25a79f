"""Find a dataset's images on disk, in any layout `pack` reads, and check each file before it goes into a shard.

Layouts (`--layout auto` tells them apart, in this order):
- csv: a CSV listing (`--src listing.csv`) with columns path,label[,group][,split]; paths are relative to the
  listing's folder and never leave it.
- splits: split folders (TRAIN, VAL, TEST, TEST_SIMPLE, any case) holding class folders, at the root, under
  ROOT/images, or under ROOT/dataset2-master/dataset2-master/images (the Kaggle "blood-cells" download).
- classes: class folders at the root (torchvision's ImageFolder); `pack` makes every split.

Class names are kept as the data spells them; folder names or labels that differ only in case, in invisible
characters (a zero-width space, a byte-order mark) or in spaces at either end are one class, named by the first
visible spelling in sorted order (a clash is noted). Hidden folders (`.ipynb_checkpoints`) are no class, and only
regular files are read: a named pipe or a device named `.jpg` is listed as skipped, never opened.
"""

from __future__ import annotations

import csv
import io
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import simplejpeg
from PIL import Image

from ..cli import UserError
from ..files import read_user_text

# Folder name or CSV split value (any case) -> split name in the shards.
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
               "test_simple": "test_simple"}
EVAL_SPLITS = ("test", "test_simple")  # held out for evaluation; the packer never edits one the data gives
JPEG_SUFFIXES = {".jpeg", ".jpg"}
LAYOUTS = ("auto", "splits", "classes", "csv")
LISTING_COLUMNS = ("path", "label", "group", "split")
LINK_OUT = "symbolic link leading outside the source root (not followed)"
HIDDEN = "hidden folder (a name starting with '.'), not a class"
NOT_REGULAR = "not a regular file (a named pipe, socket, device or broken link): not read"


@dataclass(frozen=True)
class SourceImage:
    """One JPEG file found in the source, with what the data says of it."""

    path: Path  # absolute
    rel_path: str  # relative to the source root (the listing's folder for csv), '/'-separated
    split: str  # the split the data gives (train | val | test | test_simple), or "" where it gives none
    class_name: str
    key: str  # WebDataset key: made unique within the split by unique_keys()
    group: str = ""  # the listing's group column (patient, slide...), "" where none is given
    line: int = 0  # the listing's line naming it (0: not from a listing)


@dataclass(frozen=True)
class Skipped:
    """A file or folder left out of the shards, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class Clash:
    """Names that differ only in case or suffix: folders read as one, or a file packed under another key."""

    paths: tuple[str, ...]
    conflict: str  # e.g. "are one split 'train'", "both map to key A/_1_2"
    resolution: str  # what the packer did without --strict, e.g. "both read", "the second packed as A/_1_2-2"


@dataclass
class Scan:
    """What a source holds: candidate images, what was left out and why, the classes, name clashes."""

    layout: str  # splits | classes | csv
    root: Path  # what rel_path is relative to (resolved)
    images: list[SourceImage]
    skipped: list[Skipped]
    classes: list[str]  # every class in any split, sorted: label = index
    clashes: list[Clash] = field(default_factory=list)
    has_groups: bool = False  # the listing has a group column
    notes: list[str] = field(default_factory=list)  # what the reader should know (ignored CSV columns...)


def base_key(class_name: str, stem: str) -> str:
    """`{class}/{stem}` with dots made `_` (webdataset splits extensions at dots): stable, readable."""
    return f"{class_name}/{stem.replace('.', '_')}"


def visible(name: str) -> str:
    """A name without invisible (Unicode format) characters or spaces at either end, in NFC form."""
    return "".join(c for c in unicodedata.normalize("NFC", name) if unicodedata.category(c) != "Cf").strip()


def class_key(name: str) -> str:
    """What class names are told apart by: visible characters, in any case."""
    return visible(name).lower()


def check_class_name(name: str, where: str) -> str:
    """A class name usable in keys, metric names and file names, or a UserError saying where it came from."""
    if not name or name in (".", "..") or any(c in name for c in "/\\") or any(ord(c) < 32 for c in name):
        raise UserError(f"{where}: class name {name!r} is empty or holds '/', '\\' or a control character")
    return name


def split_folder_root(root: Path) -> Path | None:
    """The folder holding split folders: ROOT/dataset2-master/dataset2-master/images, ROOT/images or ROOT."""
    for images in (root / "dataset2-master" / "dataset2-master" / "images", root / "images", root):
        if images.is_dir() and any(p.is_dir() and p.name.lower() in SPLIT_NAMES for p in images.iterdir()):
            return images
    return None


def split_folders_of_images(top: Path) -> list[str]:
    """The split-named folders under `top` that hold JPEG files and no folder: class folders named like a split."""
    named = [p for p in sorted(top.iterdir()) if p.is_dir() and p.name.lower() in SPLIT_NAMES]
    return [p.name for p in named if not any(c.is_dir() for c in p.iterdir())
            and any(c.suffix.lower() in JPEG_SUFFIXES for c in p.iterdir())]


def detect_layout(src: Path, layout: str = "auto") -> str:
    """The layout of `src` (see the module docstring), or a UserError when it has none or not the one asked."""
    if not src.exists():
        raise UserError(f"dataset root {src} does not exist")
    if not src.is_dir() and not src.is_file():
        raise UserError(f"--src {src} is neither a folder nor a regular file (a named pipe or a device?)")
    if src.is_file() or layout == "csv":
        if src.suffix.lower() != ".csv" or not src.is_file():
            raise UserError(f"--src {src}: a file must be a CSV listing (path,label[,group][,split]) ending in .csv")
        return "csv"
    has_splits = split_folder_root(src) is not None
    if layout == "splits" and not has_splits:
        raise UserError(f"no TRAIN, VAL, TEST or TEST_SIMPLE folder under {src} "
                        "(expected ROOT/dataset2-master/dataset2-master/images/TRAIN/... or ROOT/TRAIN/...)")
    if layout in ("splits", "classes"):
        return layout
    top = split_folder_root(src)
    ambiguous = split_folders_of_images(top) if top is not None else []
    if ambiguous:
        raise UserError(f"{top}: folder(s) {', '.join(ambiguous)} are named like split folders but hold images, not "
                        "class folders: if they are classes, pass --layout classes (or --layout splits to read "
                        "split folders)")
    return "splits" if has_splits else "classes"


def leaves_root(path: Path, root: Path) -> bool:
    """Whether `path` is a symbolic link whose target lies outside `root` (an absolute, resolved path)."""
    return path.is_symlink() and not path.resolve().is_relative_to(root)


class Scanner:
    """Walks folders under one root: links out of it are never followed, every left-out entry is listed."""

    def __init__(self, root: Path, layout: str) -> None:
        self.root = root.resolve()
        self.scan = Scan(layout=layout, root=self.root, images=[], skipped=[], classes=[])
        self.classes: set[str] = set()

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def skip(self, path: Path | str, reason: str) -> None:
        self.scan.skipped.append(Skipped(path if isinstance(path, str) else self.rel(path), reason))

    def entries(self, folder: Path) -> Iterator[Path]:
        """A folder's entries, sorted; links out of the root are skipped."""
        for path in sorted(folder.iterdir()):
            if leaves_root(path, self.root):
                self.skip(path, LINK_OUT)
            else:
                yield path

    def class_folders(self, parents: list[Path]) -> None:
        """Read the class folders inside `parents` (one split's folders, or the root) as one split's classes."""
        split = SPLIT_NAMES.get(parents[0].name.lower(), "") if parents[0] != self.root else ""
        found: dict[str, list[Path]] = {}
        for parent in parents:
            for folder in self.entries(parent):
                if folder.is_dir() and folder.name.startswith("."):
                    self.skip(folder, HIDDEN)
                    continue
                if not folder.is_dir():
                    beside = "class folders" if split or self.scan.layout == "splits" else "class folders (at the root)"
                    self.skip(folder, f"stray file beside the {beside}")
                    continue
                found.setdefault(class_key(folder.name), []).append(folder)
        for _, folders in sorted(found.items()):
            name = check_class_name(sorted(visible(f.name) for f in folders)[0], self.rel(folders[0]))
            self.classes.add(name)  # even with no images: a class never drops out of the label list
            if {f.name for f in folders} != {name}:
                shown = [self.rel(f) if f.name.isprintable() and f.name == f.name.strip() else repr(self.rel(f))
                         for f in folders]
                self.scan.clashes.append(Clash(tuple(shown), f"{'are' if len(folders) > 1 else 'is'} one class "
                                               f"{name!r}", "all read"))
            for folder in folders:
                candidates = 0
                for path in self.entries(folder):
                    if path.is_dir():
                        self.skip(path, "unexpected folder inside a class folder")
                    elif not path.is_file():  # never opened: reading a named pipe would block for ever
                        self.skip(path, NOT_REGULAR)
                    elif path.suffix.lower() not in JPEG_SUFFIXES:
                        self.skip(path, f"not a .jpeg/.jpg file name ({path.suffix or 'no suffix'})")
                    else:
                        candidates += 1
                        self.scan.images.append(SourceImage(path, self.rel(path), split, name, base_key(name, path.stem)))
                if not candidates:
                    self.skip(folder, "class folder without .jpeg/.jpg files (the class is kept, with no images from here)")

    def split_folders(self, top: Path) -> None:
        """Read split folders (any case: TRAIN and train are one split) and the class folders in each."""
        split_dirs: dict[str, list[Path]] = {}
        for path in self.entries(top):
            if path.is_dir() and path.name.lower() in SPLIT_NAMES:
                split_dirs.setdefault(SPLIT_NAMES[path.name.lower()], []).append(path)
            else:
                what = "folder" if path.is_dir() else "file"
                self.skip(path, f"stray {what} beside the split folders (TRAIN, VAL, TEST, TEST_SIMPLE)")
        for split, folders in split_dirs.items():
            if len(folders) > 1:
                self.scan.clashes.append(Clash(tuple(map(self.rel, folders)), f"are one split {split!r}", "all read"))
            self.class_folders(folders)


def read_listing(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """The rows of a CSV listing as (line number, {column: value}) with lower-case column names, and the
    columns it has; a file that is not such a CSV is a UserError naming the problem."""
    text = read_user_text(path, "a CSV listing")
    try:
        reader = csv.reader(io.StringIO(text))
        header = [h.strip().lower() for h in next(reader, [])]
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as err:
        raise UserError(f"{path} is not a valid CSV listing ({err})") from None
    missing = [c for c in ("path", "label") if c not in header]
    if missing:
        raise UserError(f"{path}: the listing needs a header with columns path,label[,group][,split]; "
                        f"missing {', '.join(missing)} (header: {','.join(header) or 'empty'})")
    if len(set(header)) != len(header):
        raise UserError(f"{path}: a column name appears twice in the header ({','.join(header)})")
    bad = [line for line, row in rows if len(row) != len(header)]
    if bad:
        raise UserError(f"{path}: line {bad[0]} has another number of fields than the header"
                        + (f" ({len(bad)} such lines)" if len(bad) > 1 else ""))
    return [(line, {h: cell.strip() for h, cell in zip(header, row)}) for line, row in rows], header


def scan_listing(listing: Path) -> Scan:
    """The images of a CSV listing. Paths must name files inside the listing's folder: one outside it, or a
    missing one, is listed as skipped; a malformed row is a UserError naming its line."""
    scanner = Scanner(listing.parent, "csv")
    scan = scanner.scan
    rows, header = read_listing(listing)
    ignored = [h for h in header if h not in LISTING_COLUMNS]
    if ignored:
        scan.notes.append(f"listing columns ignored: {', '.join(ignored)}")
    scan.has_groups = "group" in header
    seen: dict[str, int] = {}
    spellings: dict[str, set[str]] = {}  # class_key -> the labels spelling it
    for line, row in rows:
        if not row["path"] or not visible(row["label"]):
            raise UserError(f"{listing}: line {line} has an empty path or label")
        spellings.setdefault(class_key(row["label"]), set()).add(row["label"])
    names = {k: min(map(visible, labels)) for k, labels in spellings.items()}  # the spelling kept
    for k, labels in sorted(spellings.items()):
        if labels != {names[k]}:
            scan.clashes.append(Clash(tuple(f"label {label!r}" for label in sorted(labels)),
                                      f"{'are' if len(labels) > 1 else 'is'} one class {names[k]!r}", "all read"))
    for line, row in rows:
        rel, label = row["path"].replace("\\", "/"), row["label"]
        split_value = row.get("split", "").lower()
        if split_value and split_value not in SPLIT_NAMES:
            raise UserError(f"{listing}: line {line}: split {row['split']!r} is not one of "
                            f"{', '.join(sorted(set(SPLIT_NAMES)))} (or empty: the packer decides)")
        file = (scanner.root / rel)
        name = check_class_name(names[class_key(label)], f"{listing}: line {line}")
        scanner.classes.add(name)
        try:
            resolved = file.resolve()
        except (OSError, RuntimeError):  # a link loop
            scanner.skip(rel, "unreadable path (link loop?)")
            continue
        if rel.startswith("/") or not resolved.is_relative_to(scanner.root):
            scanner.skip(rel, "outside the listing's folder (not read)")
            continue
        canonical = resolved.relative_to(scanner.root).as_posix()
        if canonical in seen:
            raise UserError(f"{listing}: {rel} is listed twice (lines {seen[canonical]} and {line})")
        seen[canonical] = line
        if not resolved.is_file():
            scanner.skip(rel, f"listed in {listing.name} (line {line}) but not a file")
        elif resolved.suffix.lower() not in JPEG_SUFFIXES:
            scanner.skip(rel, f"not a .jpeg/.jpg file name ({resolved.suffix or 'no suffix'})")
        else:
            stem = canonical.rsplit(".", 1)[0]
            scan.images.append(SourceImage(resolved, canonical, SPLIT_NAMES.get(split_value, ""), name,
                                           base_key(name, stem), row.get("group", ""), line))
    scan.images.sort(key=lambda i: i.rel_path)
    scan.classes = sorted(scanner.classes)  # every label named, also where each of its files was skipped
    return scan


def scan_images(src: Path, layout: str = "auto") -> Scan:
    """Every candidate image of the source, sorted; everything else is listed as skipped.

    Folder names are matched in any case: TRAIN and train are one split, A and a one class (both read, a
    clash noted). Symbolic links that leave the root are not followed."""
    layout = detect_layout(Path(src), layout)
    if layout == "csv":
        scan = scan_listing(Path(src))
        classes = set(scan.classes)
    else:
        scanner = Scanner(Path(src), layout)
        scan = scanner.scan
        top = split_folder_root(scanner.root)
        if layout == "splits" and top is not None:  # detect_layout made sure there is one
            scanner.split_folders(top)
        else:
            scanner.class_folders([scanner.root])
        classes = scanner.classes
    if not scan.images:
        raise UserError(f"no .jpeg/.jpg images found in {src}")
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
    except (ValueError, RuntimeError) as err:  # simplejpeg: ValueError for errors and, strict, for warnings
        if "Premature end of JPEG file" in str(err):
            raise ValueError("truncated JPEG (premature end of file)") from None
        raise ValueError(f"corrupt JPEG ({err})") from None
    return size
