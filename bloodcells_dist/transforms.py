"""Per-sample transforms for single files (predict, evaluate --images): resize and normalise.

Training augmentation runs in batches on the device: bloodcells_dist/data/augment.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

# Per-channel mean and std of the real TRAIN images (RGB in [0, 1], 498 images sampled).
MEAN = (0.678, 0.641, 0.659)
STD = (0.262, 0.260, 0.259)


def build_transform(image_size: Sequence[int], *, mean: Sequence[float] = MEAN,
                    std: Sequence[float] = STD) -> v2.Compose:
    """uint8 (3, H, W) decoded image -> normalised float (3, *image_size), as the data path feeds the model."""
    return v2.Compose([v2.Resize(list(image_size), antialias=True), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(mean), list(std))])
