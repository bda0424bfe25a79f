"""Per-sample image transforms (torchvision transforms v2): resize, augmentation switches, normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

# Per-channel mean and std of the real TRAIN images (RGB in [0, 1], 498 images sampled).
MEAN = (0.678, 0.641, 0.659)
STD = (0.262, 0.260, 0.259)


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees; odd turns of a non-square frame are centre-cropped and
    reflect-padded back to it (the cell sits in the middle, so it stays whole)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """(C, H, W) float image -> same shape, rotated."""
        k = int(torch.randint(4, ()).item())
        if k == 0:
            return image
        height, width = image.shape[-2:]
        image = torch.rot90(image, k, dims=(-2, -1))
        if k % 2 and height != width:
            image = v2.functional.center_crop(image, [min(height, width)] * 2)
            pad_h, pad_w = height - image.shape[-2], width - image.shape[-1]
            pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            image = torch.nn.functional.pad(image[None], pads, mode="reflect")[0]
        return image


def build_transform(
    image_size: Sequence[int],
    *,
    flip: bool = False,
    rot90: bool = False,
    affine: bool = False,
    color: bool = False,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> v2.Compose:
    """uint8 (3, H, W) decoded JPEG -> normalised float (3, *image_size); the switches add augmentation."""
    steps: list = [v2.Resize(list(image_size), antialias=True), v2.ToDtype(torch.float32, scale=True)]
    if flip:
        steps += [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    if rot90:
        steps.append(RandomRot90())
    if affine:
        steps.append(v2.RandomAffine(degrees=15, translate=(0.05, 0.05), scale=(0.9, 1.1), fill=list(mean)))
    if color:
        # No hue jitter: stain hue carries class information, and RGB<->HSV costs 10x the rest together.
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)
