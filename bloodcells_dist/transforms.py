"""Per-sample transforms for single files (predict, evaluate --images): crop to the cell, resize, normalise.

Training augmentation runs in batches on the device: bloodcells_dist/data/augment.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# Per-channel mean and std of the real TRAIN images (RGB in [0, 1], 498 images sampled).
MEAN = (0.678, 0.641, 0.659)
STD = (0.262, 0.260, 0.259)
FILL = tuple(round(255 * m) for m in MEAN)  # uint8 colour of a cell window's part outside the frame


def nucleus_centre(image: torch.Tensor) -> tuple[float, float]:
    """(row, column) of the white cell's stained nucleus in a uint8 (3, H, W) image: the centroid of
    cells.nucleus_mask; the frame's centre when the image has no stained pixel."""
    from .cells import nucleus_mask  # scipy, only where a crop is asked for

    ys, xs = np.nonzero(nucleus_mask(image.permute(1, 2, 0).numpy().astype(np.int16)))
    if len(ys) == 0:
        return (image.shape[1] - 1) / 2, (image.shape[2] - 1) / 2
    return float(ys.mean()), float(xs.mean())


def cell_window(image: torch.Tensor, side: int) -> torch.Tensor:
    """The side x side window of a uint8 (3, H, W) image centred on its white cell's nucleus, in source
    pixels; what lies outside the frame takes the mean colour (FILL). The cell then sits in the middle of
    every input, whatever the shift of the copy, and at the source resolution."""
    _, height, width = image.shape
    row, col = nucleus_centre(image)
    top, left = round(row - (side - 1) / 2), round(col - (side - 1) / 2)
    out = torch.tensor(FILL, dtype=torch.uint8).view(3, 1, 1).repeat(1, side, side)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, height), min(left + side, width)
    if y0 < y1 and x0 < x1:
        out[:, y0 - top:y1 - top, x0 - left:x1 - left] = image[:, y0:y1, x0:x1]
    return out


def prepare(image: torch.Tensor, image_size: Sequence[int], cell_crop: int = 0) -> torch.Tensor:
    """uint8 (3, H, W) decoded image -> uint8 (3, *image_size): the cell window (if cell_crop), then a
    bilinear, antialiased resize. Every path into the model (cache, stream, predict, evaluate) uses this."""
    if cell_crop:
        image = cell_window(image, cell_crop)
    return TF.resize(image, list(image_size), antialias=True)


def build_transform(image_size: Sequence[int], *, cell_crop: int = 0, mean: Sequence[float] = MEAN,
                    std: Sequence[float] = STD) -> v2.Compose:
    """uint8 (3, H, W) decoded image -> normalised float (3, *image_size), as the data path feeds the model."""
    return v2.Compose([v2.Lambda(partial(prepare, image_size=image_size, cell_crop=cell_crop)),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])


def eval_transform(meta: dict) -> v2.Compose:
    """The transform a saved model was trained for: its cell window, image size and normalisation."""
    return build_transform(meta["image_size"], cell_crop=meta["cell_crop"], mean=meta["mean"], std=meta["std"])
