"""Recover which TRAIN images are augmented copies of one source cell, from the pixels alone.

    bloodcells cells --src ROOT --out cells.csv [--sheet cells.png] [--workers 2]

The dataset's TRAIN folder holds rotated, flipped and shifted copies of a few hundred source cells, and
the file names (`_{i}_{r}.jpeg`) do not say which: `i` is not the cell (each `i` holds copies of many
cells). Copies of one cell share what those augmentations leave unchanged, so each image is described by:

- its nucleus colour (mean R, G, B of the stained nucleus pixels): within one cell it varies by about 0.2
  grey levels (JPEG noise), across cells of a class by 8-15;
- its surroundings as seen from the nucleus centre: the image sampled on rings around the centroid (a
  polar image). Rotation about the cell turns into a circular shift of the angle axis, a flip reverses
  it, and a shift moves the centre with the cell, so two copies match at the best circular shift, with
  or without reversal (found for all pairs at once with FFTs).

Images whose nucleus touches the frame or the black fill (their centroid and colour move) do not seed
cells: cells are grown by average-linkage clustering of the other images on the combined distance; clusters under
half the typical size are fragments; then every image outside a cell joins the cell it is closest to on
average. Merging two true cells is harmless for
honest validation (a coarser group), splitting one leaks, so the threshold leans towards merging.
Deterministic: no randomness, and cell ids are numbered by the sorted paths of their members.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from ..cli import Parser, UserError, output_file_in_folder, run_main
from ..files import read_user_text, write_atomic
from ..nucleus import nucleus_mask
from ..output import say, warn
from .parallel import Workers

RADII = np.arange(6.0, 106.0, 3.0)  # ring radii around the nucleus centre, in pixels of a 320x240 image
ANGLES = 128  # samples per ring
HARMONICS = 33  # angular frequencies kept: the rings' fine detail is JPEG noise
SIMILARITY_SCALE = 0.05  # 1 - correlation of two copies of one cell is about this (one unit of distance)
COLOUR_SCALE = 1.0  # grey levels of mean nucleus colour that count as one unit of distance
CUT = 5.0  # average-linkage distance at which cells are cut (copies of a cell lie within 1-3 units)
SMALL_CELL = 0.4  # a cluster under 0.4 x the typical cell's size is a fragment (of a cell cut by the frame)
MAPPING_FIELDS = ("path", "class", "cell", "sha256")


@dataclass(frozen=True)
class CellFeatures:
    """What one image contributes to the matching."""

    rings: np.ndarray  # float32 (3, len(RADII), ANGLES): standardised colour contrasts on rings
    colour: np.ndarray  # float64 (3,): mean R, G, B of the nucleus
    area: int  # nucleus pixels
    touches_edge: bool  # the nucleus touches the frame or the black fill: centre and colour unreliable


def image_features(data: bytes) -> CellFeatures:
    """Decode one JPEG and describe it by its nucleus colour and the rings around its nucleus."""
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    height, width = rgb.shape[:2]
    nucleus = nucleus_mask(rgb)
    if not nucleus.any():  # no stained nucleus: describe the image around its centre; it seeds no cell
        nucleus = np.zeros_like(nucleus)
        nucleus[height // 2, width // 2] = True
    cy, cx = ndimage.center_of_mass(nucleus)
    ys, xs = np.nonzero(nucleus)
    fill = rgb.sum(-1) < 60  # the augmentation's black corners
    touches = bool(nucleus.sum() < 20 or ys.min() <= 2 or xs.min() <= 2 or ys.max() >= height - 3
                   or xs.max() >= width - 3 or fill[ndimage.binary_dilation(nucleus, iterations=3)].any())
    theta = np.arange(ANGLES) * 2 * math.pi / ANGLES
    yy = cy + RADII[:, None] * np.sin(theta)[None]
    xx = cx + RADII[:, None] * np.cos(theta)[None]
    ring = np.stack([ndimage.map_coordinates(rgb[..., c], [yy.ravel(), xx.ravel()], order=1, cval=0.0)
                     .reshape(yy.shape) for c in range(3)])
    valid = (ring.sum(0) > 90) & (yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1)
    # Pinkness (red cells), brightness, blueness (stain): contrasts that do not depend on exposure much.
    rings = np.stack([ring[0] - ring[1], ring[1], ring[2] - ring[1]])
    for channel in rings:  # outside the frame or in the fill: the channel's mean, so it adds nothing
        channel[~valid] = channel[valid].mean() if valid.any() else 0.0
    rings = (rings - rings.mean(axis=(1, 2), keepdims=True)) / (rings.std(axis=(1, 2), keepdims=True) + 1e-6)
    core = ndimage.binary_erosion(nucleus, iterations=2)  # boundary pixels move with interpolation and blur
    core = core if core.sum() >= 20 else nucleus
    colour = np.array([rgb[..., c][core].mean() for c in range(3)])
    return CellFeatures(rings.astype(np.float32), colour, int(nucleus.sum()), touches)


def ring_similarity(rings: np.ndarray, *, block: int = 256) -> np.ndarray:
    """Pairwise best normalised circular correlation of the ring images, over rotations and reflections.

    For every angular frequency k the correlation spectrum of all pairs is one matrix product (summing
    over channels and rings); an inverse FFT then gives the correlation at every rotation."""
    import torch  # only here: the rest of the module is numpy

    n = len(rings)
    x = torch.from_numpy(rings.reshape(n, -1, ANGLES))
    spectra = torch.fft.rfft(x, dim=-1)[..., :HARMONICS].permute(2, 0, 1).contiguous()  # (K, n, C*R)
    # Each image's correlation with itself, through the same kept harmonics: the normaliser.
    energy = torch.fft.irfft((spectra.abs() ** 2).sum(-1).T, n=ANGLES, dim=-1)[:, 0]
    energy = energy.clamp(min=1e-12)  # a featureless ring image (one flat colour) matches nothing, never NaN
    out = np.empty((n, n), dtype=np.float32)
    for start in range(0, n, block):
        a = spectra[:, start:start + block]
        same = torch.fft.irfft((a @ spectra.conj().transpose(1, 2)).permute(1, 2, 0), n=ANGLES, dim=-1)
        mirrored = torch.fft.irfft((a @ spectra.transpose(1, 2)).permute(1, 2, 0), n=ANGLES, dim=-1)
        best = torch.maximum(same.amax(-1), mirrored.amax(-1))
        out[start:start + block] = (best / torch.sqrt(energy[start:start + block, None] * energy[None])).numpy()
    return np.minimum(out, out.T)


def describable(features: CellFeatures) -> bool:
    """Whether an image's features can be matched: finite, and with some structure around the centre (an evenly
    coloured image has none). The others are set apart, each its own group."""
    return bool(np.isfinite(features.rings).all() and np.isfinite(features.colour).all() and features.rings.std() > 0)


def cluster_cells(features: Sequence[CellFeatures], *, cut: float = CUT, small: float = SMALL_CELL) -> np.ndarray:
    """Cell index (0..k-1) of each image of one class; every image must be `describable`."""
    n = len(features)
    if n == 1:
        return np.zeros(1, dtype=int)
    colour = np.stack([f.colour for f in features])
    similarity = ring_similarity(np.stack([f.rings for f in features]))
    colour_distance = np.sqrt(((colour[:, None] - colour[None]) ** 2).sum(-1)) / COLOUR_SCALE
    distance = np.hypot(np.clip(1 - similarity, 0, None) / SIMILARITY_SCALE, colour_distance)
    np.fill_diagonal(distance, 0.0)
    seeds = np.flatnonzero([not f.touches_edge for f in features])
    if len(seeds) < 2:  # nothing reliable to grow cells from: all images are one group (cannot leak)
        return np.zeros(n, dtype=int)
    tree = linkage(squareform(distance[np.ix_(seeds, seeds)], checks=False), "average")
    label = np.full(n, -1)
    label[seeds] = fcluster(tree, cut, "distance") - 1
    sizes = np.bincount(label[seeds])
    typical = float(np.median(sizes[label[seeds]]))  # the size of the cluster a typical image is in
    # The dataset made about as many copies of every cell of a class, so a much smaller cluster is a piece
    # of a cell whose copies look unalike (nucleus cut by the frame): it joins the nearest cell.
    cells = [c for c in np.unique(label[seeds]) if sizes[c] >= small * typical]
    if not cells:
        return np.zeros(n, dtype=int)
    # Every image outside a seeded cell joins the cell with the smallest mean distance to it.
    mean_distance = np.stack([distance[:, label == c].mean(1) for c in cells], 1)
    label = np.where(np.isin(label, cells), label, np.asarray(cells)[np.argmin(mean_distance, 1)])
    return np.unique(label, return_inverse=True)[1]


def _features_of_file(path: Path) -> CellFeatures | str:
    """Worker: features of one file, or why it could not be read."""
    try:
        return image_features(path.read_bytes())
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"


def describe_images(images: Sequence[tuple[str, str, Path]], *, pool: Executor | None = None) -> list[CellFeatures]:
    """Features of every (relative path, class, file), read by `pool` (two processes by default, parallel.py);
    an unreadable one is a UserError."""
    if pool is None:
        with Workers(2) as own:
            return describe_images(images, pool=own)
    features = list(pool.map(_features_of_file, [p for _, _, p in images], chunksize=32))
    bad = [(rel, f) for (rel, _, _), f in zip(images, features) if isinstance(f, str)]
    if bad:
        raise UserError(f"cannot describe {len(bad)} image(s) for cell recovery; first: {bad[0][0]}: {bad[0][1]}")
    return [f for f in features if not isinstance(f, str)]


def recover_cells(images: Sequence[tuple[str, str, Path]], *, pool: Executor | None = None,
                  progress: Callable[[str], None] = lambda _: None,
                  features: Sequence[CellFeatures] | None = None) -> tuple[dict[str, str], list[str]]:
    """(relative path, class, file) of the images to group -> (relative path -> cell id `CLASS/cellNNN`, the
    images set apart). An image whose features cannot be matched (`describable`) is set apart as a cell of its
    own, `CLASS/apartNNN`, and listed."""
    if features is None:
        features = describe_images(images, pool=pool)
    mapping: dict[str, str] = {}
    apart: list[str] = []
    for class_name in sorted({c for _, c, _ in images}):
        described = sorted((rel, f) for (rel, c, _), f in zip(images, features) if c == class_name)
        members = [(rel, f) for rel, f in described if describable(f)]
        for k, (rel, _) in enumerate(r for r in described if not describable(r[1])):
            mapping[rel] = f"{class_name}/apart{k:03d}"
            apart.append(rel)
        if not members:
            continue
        labels = cluster_cells([f for _, f in members])
        # Number cells by their first member's path: stable whatever order the files were listed in.
        first: dict[int, str] = {}
        for (rel, _), label in zip(members, labels):
            first.setdefault(int(label), rel)
        number = {label: k for k, (_, label) in enumerate(sorted((rel, lab) for lab, rel in first.items()))}
        for (rel, _), label in zip(members, labels):
            mapping[rel] = f"{class_name}/cell{number[int(label)]:03d}"
        progress(f"{class_name}: {len(members)} images -> {len(number)} cells")
    return mapping, apart


def tightness(images: Sequence[tuple[str, str, Path]], features: Sequence[CellFeatures],
              mapping: dict[str, str]) -> list[str]:
    """Lines a person can check: per class, the cells and their sizes, and how much the nucleus colour and
    area (unchanged by the augmentation) vary within a cell, and within an `i` of `_{i}_{r}` names, as a
    share of their spread over the class (1.0: no better than a random group; 0: identical copies)."""
    lines = [f"{'class':<11} {'cells':>5} {'size min/median/max':>19}   within/class sd: {'colour':>6} {'area':>6}"
             f"   (same, by `i`: {'colour':>6} {'area':>6})"]
    for class_name in sorted({c for _, c, _ in images}):
        rows = [(rel, f) for (rel, c, _), f in zip(images, features) if c == class_name and not f.touches_edge]
        if len(rows) < 3:
            continue
        blue = np.array([f.colour[2] for _, f in rows])
        area = np.array([f.area for _, f in rows], dtype=float)

        def ratio(keys: list[str], values: np.ndarray) -> float:
            groups = [values[[k == key for k in keys]] for key in set(keys)]
            within = np.sqrt(np.mean([g.var() for g in groups if len(g) >= 2] or [0.0]))
            return float(within / (values.std() + 1e-9))

        cells = [mapping[rel] for rel, _ in rows]
        rounds = [Path(rel).stem.split("_")[1] if Path(rel).stem.count("_") == 2 else rel for rel, _ in rows]
        sizes = np.bincount(np.unique([mapping[rel] for rel, c, _ in images if c == class_name],
                                      return_inverse=True)[1])
        lines.append(f"{class_name:<11} {len(sizes):>5} {f'{sizes.min()}/{int(np.median(sizes))}/{sizes.max()}':>19}"
                     f"   {'':>16} {ratio(cells, blue):>6.3f} {ratio(cells, area):>6.3f}"
                     f"   {'':>15} {ratio(rounds, blue):>6.3f} {ratio(rounds, area):>6.3f}")
    return lines


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_mapping(path: Path, mapping: dict[str, str], files: dict[str, Path]) -> None:
    """Write the mapping as CSV (path, class, cell, sha256), atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MAPPING_FIELDS)
    for rel in sorted(mapping):
        writer.writerow([rel, mapping[rel].split("/")[0], mapping[rel], file_sha256(files[rel])])
    write_atomic(path, text.getvalue())


@dataclass(frozen=True)
class MappingRow:
    """One line of a cell mapping file."""

    line: int
    class_name: str
    cell: str
    sha256: str


def read_mapping(path: Path) -> dict[str, MappingRow]:
    """A mapping file -> relative path -> its row. A file that is not such a CSV, a path listed twice, or a
    cell of another class than the row's is a UserError naming the line(s)."""
    text = read_user_text(path, "a cell mapping")
    try:
        reader = csv.DictReader(io.StringIO(text))
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as err:
        raise UserError(f"{path} is not a cell mapping ({err})") from None
    if not rows or set(MAPPING_FIELDS) - set(reader.fieldnames or []):
        raise UserError(f"{path} is not a cell mapping (expected a CSV with columns {', '.join(MAPPING_FIELDS)})")
    mapping: dict[str, MappingRow] = {}
    for line, row in rows:
        if any(row.get(k) is None for k in MAPPING_FIELDS):
            raise UserError(f"{path}: line {line} has fewer fields than the header")
        if row["path"] in mapping:
            raise UserError(f"{path}: {row['path']} is listed twice (lines {mapping[row['path']].line} and {line})")
        if not row["cell"].startswith(f"{row['class']}/"):
            raise UserError(f"{path}: line {line}: cell {row['cell']!r} is not a cell of class {row['class']!r}")
        mapping[row["path"]] = MappingRow(line, row["class"], row["cell"], row["sha256"])
    return mapping


def contact_sheet(path: Path, mapping: dict[str, str], files: dict[str, Path], *, cells_per_class: int = 3,
                  copies: int = 8, tile: tuple[int, int] = (120, 90)) -> None:
    """A PNG a person can check: per class, a few cells (one per row), several of their copies side by side."""
    rows = []
    for class_name in sorted({cell.split("/")[0] for cell in mapping.values()}):
        cells = sorted({cell for cell in mapping.values() if cell.startswith(f"{class_name}/")})
        step = max(1, len(cells) // cells_per_class)
        for cell in cells[::step][:cells_per_class]:
            rows.append(sorted(rel for rel, c in mapping.items() if c == cell)[:copies])
    width, height = tile
    sheet = Image.new("RGB", (width * copies, height * len(rows)), "white")
    for r, members in enumerate(rows):
        for k, rel in enumerate(members):
            with Image.open(files[rel]) as image:
                sheet.paste(image.convert("RGB").resize(tile), (k * width, r * height))
    sheet.save(path)


SHEET_SUFFIXES = (".png", ".jpg", ".jpeg")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: recover the cells of a dataset's training images and write the mapping."""
    from .sources import scan_images  # the same file discovery as the packer
    from .splits import GROUPED  # the images the packer groups

    parser = Parser(prog="bloodcells cells", description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="dataset root or listing (as for `shards pack`)")
    parser.add_argument("--out", type=Path, required=True, help="CSV mapping to write (path, class, cell, sha256)")
    parser.add_argument("--sheet", type=Path, help="also write a contact sheet (.png or .jpg) of a few cells' copies")
    parser.add_argument("--workers", type=int, default=2, help="processes for reading images")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    for flag, path in (("--out", args.out), ("--sheet", args.sheet)):  # before minutes of work, not after
        if path is not None:
            output_file_in_folder(path, flag)
    if args.sheet and args.sheet.suffix.lower() not in SHEET_SUFFIXES:
        raise UserError(f"--sheet {args.sheet}: expected a {', '.join(SHEET_SUFFIXES)} file name")
    start = time.perf_counter()
    # The images a packer groups by cell: a TRAIN folder (or a listing's train rows), and all where no split is given.
    train = [img for img in scan_images(args.src).images if img.split in GROUPED]
    if not train:
        raise UserError(f"no training images under {args.src} (the TRAIN folder, or images with no split)")
    listed = [(i.rel_path, i.class_name, i.path) for i in train]
    with Workers(args.workers) as pool:
        described = list(pool.map(_features_of_file, [p for _, _, p in listed], chunksize=32))
    for (rel, _, _), f in zip(listed, described):
        if isinstance(f, str):
            warn(f"skipped {rel}: {f}")
    kept = [(item, f) for item, f in zip(listed, described) if not isinstance(f, str)]
    listed, features = [item for item, _ in kept], [f for _, f in kept]
    mapping, apart = recover_cells(listed, progress=print, features=features)
    for rel in apart:
        warn(f"{rel} has no cell features to match (an evenly coloured image?): set apart as a cell "
             "of its own")
    usable = [(item, f) for item, f in zip(listed, features) if describable(f)]
    say("\n".join(tightness([i for i, _ in usable], [f for _, f in usable], mapping)))
    files = {i.rel_path: i.path for i in train}
    write_mapping(args.out, mapping, files)
    if args.sheet:
        contact_sheet(args.sheet, mapping, files)
    skipped = len(described) - len(features)
    say(f"{len(mapping)} images -> {len(set(mapping.values()))} cells ({len(apart)} set apart, {skipped} unreadable "
          f"skipped) in {time.perf_counter() - start:.1f} s; wrote {args.out}" + (f" and {args.sheet}" if args.sheet else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
