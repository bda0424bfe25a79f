"""Synthetic stand-in for the public "blood-cells" dataset (embedded default for demos and tests).

Draws 320x240 smear-like images (pale background, red-cell discs, one stained white cell)
whose nucleus shape encodes the class, and writes them in the real dataset's folder layout:
``dataset2-master/dataset2-master/images/{TRAIN,TEST}/{CLASS}/_{i}_{r}.jpeg``.
Like the real data, every original cell is saved as several augmented copies, and like the real data the
file name does not say which: `i` is the copy's round (copy k of every original is `_{k}_{r}`), not the
original. The truth, which copies share an original, is written to ``cells_truth.csv`` beside the
``dataset2-master`` folder (columns path, cell), for checking cell recovery (`bloodcells cells`).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import draw, filters, transform

from ..cli import Parser, UserError, run_main
from ..output import say

CLASSES: tuple[str, ...] = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
SPLITS: tuple[str, ...] = ("TRAIN", "TEST")
H, W = 240, 320
_ROOT = Path("dataset2-master", "dataset2-master", "images")
_MAX_TAGS = 10_000  # r in 0..9999 must be unique per class folder
TRUTH_NAME = "cells_truth.csv"  # which original (cell) every written image is a copy of

Colour = np.ndarray


def _jitter(rng: np.random.Generator, rgb: tuple[float, float, float], sd: float) -> Colour:
    """Return an RGB colour randomly perturbed per channel."""
    return np.clip(np.asarray(rgb) + rng.normal(0.0, sd, 3), 0.0, 1.0)


def _ellipse_idx(cy: float, cx: float, ry: float, rx: float, rot: float = 0.0) -> tuple[np.ndarray, ...]:
    """Return (rows, cols) of a (rotated) filled ellipse clipped to the image."""
    return draw.ellipse(cy, cx, max(ry, 1.0), max(rx, 1.0), shape=(H, W), rotation=rot)


def _ellipse(cy: float, cx: float, ry: float, rx: float, rot: float = 0.0) -> np.ndarray:
    """Return a boolean image mask of a (rotated) filled ellipse (for set operations on shapes)."""
    m = np.zeros((H, W), bool)
    m[_ellipse_idx(cy, cx, ry, rx, rot)] = True
    return m


def _bridge(p: np.ndarray, q: np.ndarray, width: float) -> np.ndarray:
    """Return a mask of a thick segment p->q (the chromatin strand joining two lobes)."""
    d = q - p
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9) * width / 2
    corners = np.stack([p + n, q + n, q - n, p - n])
    m = np.zeros((H, W), bool)
    rr, cc = draw.polygon(corners[:, 0], corners[:, 1], shape=(H, W))
    m[rr, cc] = True
    return m


def _paint(img: np.ndarray, mask: np.ndarray | tuple, colour: Colour, alpha: float = 1.0) -> None:
    """Alpha-blend a flat colour into img where mask (bool mask or index tuple) is set, in place."""
    img[mask] = img[mask] * (1.0 - alpha) + colour * alpha


def _red_cell(img: np.ndarray, rng: np.random.Generator, cy: float, cx: float, bg: Colour) -> None:
    """Draw one erythrocyte: a pinkish disc with a paler central pallor (gives the ring look)."""
    r = rng.uniform(22, 34)
    squash, rot = rng.uniform(0.8, 1.0), rng.uniform(0, np.pi)
    colour = _jitter(rng, (0.82, 0.62, 0.63), 0.02)
    _paint(img, _ellipse_idx(cy, cx, r * squash, r, rot), colour)  # index form: cheaper than masks
    pale = colour + rng.uniform(0.2, 0.5) * (bg - colour)
    k = rng.uniform(0.35, 0.6, 2)
    _paint(img, _ellipse_idx(cy, cx, r * squash * k[0], r * k[1], rot), pale)


def _nucleus(cls: str, rng: np.random.Generator, cy: float, cx: float, R: float) -> np.ndarray:
    """Return the nucleus mask; its shape is the class signal (with deliberate overlap)."""
    if cls == "LYMPHOCYTE":  # big round nucleus filling most of a small cell
        oy, ox = rng.normal(0, 0.06 * R, 2)
        ry, rx = R * rng.uniform(0.72, 0.9, 2)
        m = _ellipse(cy + oy, cx + ox, ry, rx, rng.uniform(0, np.pi))
        if rng.random() < 0.25:  # occasional shallow indent blurs the line to monocytes
            a = rng.uniform(0, 2 * np.pi)
            m &= ~_ellipse(cy + np.sin(a) * R * 0.95, cx + np.cos(a) * R * 0.95, R * 0.3, R * 0.3)
        return m
    if cls == "MONOCYTE":  # kidney/bean: an ellipse with a disc bitten out of one long side
        a, b, rot = R * rng.uniform(0.5, 0.68), R * rng.uniform(0.38, 0.52), rng.uniform(0, np.pi)
        oy, ox = rng.normal(0, 0.08 * R, 2)
        m = _ellipse(cy + oy, cx + ox, b, a, rot)
        d, nr = b * rng.uniform(0.75, 1.25), b * rng.uniform(0.45, 0.85)
        # draw.ellipse's rotation turns the x-axis towards -y, so the minor axis direction is:
        ny, nx = np.cos(rot), np.sin(rot)
        return m & ~_ellipse(cy + oy + ny * d, cx + ox + nx * d, nr, nr)
    # Segmented nuclei: lobes along an arc, joined by thin strands.
    k = 2 if cls == "EOSINOPHIL" else int(rng.choice([3, 4, 5], p=[0.4, 0.4, 0.2]))
    # Neutrophil lobes are small and spread apart, so cytoplasm shows between them even at 60x80.
    lobe = R * (rng.uniform(0.3, 0.4) if k == 2 else rng.uniform(0.18, 0.26))
    rho = R * (rng.uniform(0.3, 0.45) if k == 2 else rng.uniform(0.45, 0.58))
    span = np.pi * (rng.uniform(0.6, 1.0) if k == 2 else rng.uniform(0.9, 1.6))
    angs = rng.uniform(0, 2 * np.pi) + np.linspace(-span / 2, span / 2, k) + rng.normal(0, 0.15, k)
    pts = np.stack([cy + rho * np.sin(angs), cx + rho * np.cos(angs)], axis=1)
    m = np.zeros((H, W), bool)
    for j, (py, px) in enumerate(pts):
        s = lobe * rng.uniform(0.8, 1.2)
        m |= _ellipse(py, px, s * rng.uniform(0.75, 1.0), s, rng.uniform(0, np.pi))
        if j:
            m |= _bridge(pts[j - 1], pts[j], lobe * rng.uniform(0.4, 0.8))
    return m


def _granules(img: np.ndarray, rng: np.random.Generator, cy: float, cx: float, R: float,
              n: int, colour: Colour, alpha: float) -> None:
    """Sprinkle n small dots uniformly over the cell disc (eosinophil granules)."""
    rad, ang = R * 0.92 * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
    for gy, gx, gr in zip(cy + rad * np.sin(ang), cx + rad * np.cos(ang), rng.uniform(1.2, 2.4, n)):
        rr, cc = draw.disk((gy, gx), gr, shape=(H, W))
        img[rr, cc] = img[rr, cc] * (1 - alpha) + colour * alpha


def draw_original(cls: str, rng: np.random.Generator) -> np.ndarray:
    """Draw one original smear image of class cls as a float (H, W, 3) array in [0, 1]."""
    bg = _jitter(rng, (0.91, 0.88, 0.88), 0.012)
    # Low-frequency illumination blotches: upsampled coarse noise is far cheaper than a wide blur.
    shade = transform.resize(rng.normal(0, 0.015, (6, 8)), (H, W), order=1, anti_aliasing=False)
    img = np.clip(bg + shade[..., None], 0, 1).astype(np.float32)  # float32: ~2x faster warps
    for _ in range(rng.integers(10, 26)):  # red cells may fall off the edges, as in real crops
        _red_cell(img, rng, rng.uniform(-15, H + 15), rng.uniform(-15, W + 15), bg)

    # Size is a cue that survives the demo's 4x downscaling: small lymphocytes, large monocytes.
    R = {"LYMPHOCYTE": rng.uniform(22, 29), "MONOCYTE": rng.uniform(40, 50)}.get(cls, rng.uniform(32, 39))
    cy, cx = H / 2 + rng.normal(0, 12), W / 2 + rng.normal(0, 16)
    # Cytoplasm tint, as in stained smears: eosinophils orange-pink, neutrophils pale lilac, monocytes
    # grey-blue, lymphocytes sky-blue. Distinct enough that the demo's tiny CNN at 60x80, where the
    # nucleus lobes blur together, still tells every class apart (earlier, overlapping tints left the
    # demo at 57-66% test accuracy with neutrophils taken for monocytes).
    tint = {"EOSINOPHIL": (0.93, 0.66, 0.58), "NEUTROPHIL": (0.90, 0.80, 0.86),
            "MONOCYTE": (0.70, 0.72, 0.84), "LYMPHOCYTE": (0.62, 0.74, 0.95)}[cls]
    cyto = _jitter(rng, tint, 0.04)  # cell to cell: also what tells cells apart (bloodcells_dist.pack.cells)
    cell = _ellipse(cy, cx, R * rng.uniform(0.85, 1.0), R, rng.uniform(0, np.pi))
    _paint(img, cell, cyto, rng.uniform(0.75, 1.0))  # alpha < 1: red cells beneath show through
    if cls == "EOSINOPHIL":  # many reddish-orange granules, density/strength vary a lot
        _granules(img, rng, cy, cx, R, int(rng.integers(40, 100)), _jitter(rng, (0.86, 0.42, 0.36), 0.05),
                  rng.uniform(0.55, 0.9))
    elif cls == "NEUTROPHIL" and rng.random() < 0.2:  # faint granules: a little overlap with eosinophils
        _granules(img, rng, cy, cx, R, int(rng.integers(10, 35)), _jitter(rng, (0.86, 0.55, 0.6), 0.05),
                  rng.uniform(0.15, 0.4))

    nuc = _nucleus(cls, rng, cy, cx, R)
    stain = rng.uniform(0.6, 1.05)  # stain intensity: how far the nucleus is from the cytoplasm
    _paint(img, nuc, cyto + stain * (_jitter(rng, (0.36, 0.22, 0.62), 0.04) - cyto))
    img[nuc] *= 1 + rng.normal(0, 0.06, (int(nuc.sum()), 1))  # chromatin texture

    if rng.random() < 0.35:  # a red cell partly overlapping the white cell's edge
        a = rng.uniform(0, 2 * np.pi)
        _red_cell(img, rng, cy + np.sin(a) * R * 1.45, cx + np.cos(a) * R * 1.45, bg)
    for _ in range(rng.integers(0, 4)):  # platelets: small purple distractor specks
        rr, cc = draw.disk((rng.uniform(0, H), rng.uniform(0, W)), rng.uniform(1.5, 4), shape=(H, W))
        img[rr, cc] = _jitter(rng, (0.55, 0.40, 0.75), 0.05)

    img = filters.gaussian(img, sigma=rng.uniform(0.8, 1.8), channel_axis=-1)  # soft optics
    noise = rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.005, 0.025)
    img = img * (1 + rng.normal(0, 0.015, 3)).astype(np.float32) + noise
    return np.clip(img, 0, 1)


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Return a flipped/rotated/sheared/shifted copy with black fill, like the real dataset."""
    out = img[:, ::-1] if rng.random() < 0.5 else img
    out = out[::-1] if rng.random() < 0.5 else out
    c = np.array([W / 2, H / 2])  # rotate about the image centre; coordinates are (x, y)
    move = transform.AffineTransform(rotation=np.deg2rad(rng.uniform(-25, 25)),
                                     shear=rng.uniform(-0.12, 0.12),
                                     translation=rng.uniform(-18, 18, 2)).params
    to_c, from_c = np.eye(3), np.eye(3)
    to_c[:2, 2], from_c[:2, 2] = -c, c
    fwd = from_c @ move @ to_c
    inverse = transform.ProjectiveTransform(matrix=np.linalg.inv(fwd))  # warp wants output->input
    # Bilinear interpolation of [0, 1] data stays in range, so skimage's clipping pass is skipped.
    return transform.warp(out, inverse, order=1, cval=0.0, clip=False)


def _save_jpeg(img: np.ndarray, path: Path) -> None:
    """Save a float image as a baseline (non-progressive) quality-90 JPEG."""
    pixels = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=90, progressive=False)


def generate_dataset(out: Path, *, per_class: int = 200, seed: int = 0, copies: int = 8,
                     test_per_class: int | None = None) -> dict[str, dict[str, int]]:
    """Write the synthetic dataset under out and return image counts {split: {class: n}}."""
    out = Path(out)
    test_n = per_class // 4 if test_per_class is None else test_per_class
    if per_class < 1 or copies < 1 or test_n < 0 or seed < 0:
        raise ValueError("per-class and copies must be >= 1; test-per-class and seed >= 0")
    if max(per_class, test_n) > _MAX_TAGS:
        raise ValueError(f"at most {_MAX_TAGS} images per class (tags r are unique in 0..9999)")
    top = out / _ROOT.parts[0]
    if top.is_dir() and any(top.iterdir()):
        raise FileExistsError(f"{top} already exists and is not empty")
    counts: dict[str, dict[str, int]] = {}
    truth: list[tuple[str, str]] = []
    for si, (split, n) in enumerate(zip(SPLITS, (per_class, test_n))):
        counts[split] = {}
        for ci, cls in enumerate(CLASSES):
            folder = out / _ROOT / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            # Independent, order-free streams: (seed, split, class) for tags, + original index for
            # drawing, so TEST originals differ from TRAIN ones and output is byte-reproducible.
            # The index is offset by 1 because SeedSequence treats a trailing 0 like no entry.
            tags = np.random.default_rng([seed, si, ci]).choice(_MAX_TAGS, size=n, replace=False)
            done = 0
            for i in range(-(-n // copies)):
                rng = np.random.default_rng([seed, si, ci, i + 1])
                original = draw_original(cls, rng)
                for k in range(min(copies, n - done)):
                    name = f"_{k}_{tags[done]}.jpeg"  # the round k, not the original i (as in the real data)
                    _save_jpeg(augment(original, rng), folder / name)
                    truth.append(((_ROOT / split / cls / name).as_posix(), f"{split}/{cls}/{i}"))
                    done += 1
            counts[split][cls] = done
    with open(out / TRUTH_NAME, "w", newline="") as f:
        csv.writer(f).writerows([("path", "cell"), *sorted(truth)])
    # Names the dataset for `pack` (and so for model cards): not the real "blood-cells".
    (out / "dataset.json").write_text(json.dumps({"name": "synthetic", "generator": "bloodcells_dist.synthetic",
                                                  "seed": seed}) + "\n")
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the dataset and say what was written."""
    p = Parser(prog="bloodcells synthetic", description="Write the synthetic blood-cells dataset.")
    p.add_argument("--out", type=Path, required=True, help="output root directory")
    p.add_argument("--per-class", type=int, default=200, help="TRAIN images per class")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--copies", type=int, default=8, help="augmented copies per original cell")
    p.add_argument("--test-per-class", type=int, default=None, help="TEST images per class (default N//4)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        counts = generate_dataset(a.out, per_class=a.per_class, seed=a.seed, copies=a.copies,
                                  test_per_class=a.test_per_class)
    except (ValueError, FileExistsError) as e:
        raise UserError(str(e)) from None
    summary = ", ".join(f"{s} {sum(c.values())}" for s, c in counts.items())
    say(f"wrote {summary} images to {a.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
