"""The decode and resize of preprocess.py give what torchvision's decode_jpeg, decode_image and v2 transforms gave
(the package no longer imports torchvision), bit for bit: on real images where ../shared has them, and on every
kind of file read_rgb accepts."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcells_dist.data.preprocess import Preprocess, decode_jpeg, read_rgb

from ..helpers import REAL_DATA, jpeg

PREPROCESSING = [Preprocess((120, 160)), Preprocess((96, 96)), Preprocess((61, 83), fit="pad"),
                 Preprocess((64, 64), fit="stretch"), Preprocess((80, 80), cell_crop=0.5),
                 Preprocess((97, 95), cell_crop=151, fit="crop"), Preprocess((300, 400))]


@pytest.fixture(scope="module")
def tv():
    """torchvision (the dev extra), imported here, not at collection: its import costs seconds."""
    return pytest.importorskip("torchvision", reason="torchvision (the dev extra) is the reference")


def reference_resize(p: Preprocess, image: torch.Tensor) -> torch.Tensor:
    """The fit as the package wrote it with torchvision (v0.5 of preprocess.fit_to)."""
    from torchvision.transforms.v2 import functional as TF

    from bloodcells_dist.data.preprocess import FILL, cell_window, window_side

    if p.cell_crop:
        image = cell_window(image, window_side(p.cell_crop, *image.shape[-2:]))
    (height, width), (h, w) = p.image_size, image.shape[-2:]
    if p.fit == "stretch" or h * width == w * height:
        return TF.resize(image, [height, width], antialias=True)
    scale = (max if p.fit == "crop" else min)(height / h, width / w)
    inner = [round(h * scale), round(w * scale)]
    if p.fit == "crop":
        return TF.center_crop(TF.resize(image, [max(height, inner[0]), max(width, inner[1])], antialias=True),
                              [height, width])
    inner = [min(height, inner[0]), min(width, inner[1])]
    out = torch.tensor(FILL, dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)
    top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
    out[:, top:top + inner[0], left:left + inner[1]] = TF.resize(image, inner, antialias=True)
    return out


def real_jpegs(count: int) -> list[bytes]:
    files = sorted((REAL_DATA / "dataset2-master" / "dataset2-master" / "images" / "TRAIN").rglob("*.jpeg"))
    files += sorted((REAL_DATA.parent / "datasets" / "pbc-sample").rglob("*.jp*g"))
    return [f.read_bytes() for f in random.Random(0).sample(files, min(count, len(files)))]


def test_jpeg_decode_resize_and_normalisation_match_torchvision_bit_for_bit(tv):
    from torchvision.transforms import v2

    images = [jpeg(seed, size) for seed, size in enumerate([(320, 240), (360, 363), (17, 5), (641, 479)])]
    images += real_jpegs(40)
    for data in images:
        reference = tv.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        assert torch.equal(decode_jpeg(data), reference)
        for p in PREPROCESSING:
            assert torch.equal(p.resize(decode_jpeg(data)), reference_resize(p, reference)), p
        p = PREPROCESSING[0]
        expected = v2.Compose([v2.Lambda(lambda x, p=p: reference_resize(p, x)), v2.ToDtype(torch.float32, scale=True),
                               v2.Normalize(list(p.mean), list(p.std))])(reference)
        assert torch.equal(p.transform()(decode_jpeg(data)), expected)


@pytest.mark.parametrize("kind", ["jpeg", "grayscale jpeg", "cmyk jpeg", "png", "rgba png", "palette png",
                                  "grayscale png", "16-bit png"])
def test_every_format_read_rgb_accepts_reads_as_torchvision_reads_it(tv, tmp_path, kind):
    from torchvision.transforms.v2 import functional as TF

    rgb = np.random.default_rng(7).integers(0, 256, (30, 41, 3), dtype=np.uint8)
    image = {"jpeg": lambda: Image.fromarray(rgb), "grayscale jpeg": lambda: Image.fromarray(rgb[..., 0]),
             "cmyk jpeg": lambda: Image.fromarray(rgb).convert("CMYK"), "png": lambda: Image.fromarray(rgb),
             "rgba png": lambda: Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
             "palette png": lambda: Image.fromarray(rgb).quantize(17), "grayscale png": lambda: Image.fromarray(rgb[..., 1]),
             "16-bit png": lambda: Image.fromarray(rgb[..., 2].astype(np.uint16) * 257 + 3)}[kind]()
    buf = io.BytesIO()
    image.save(buf, "JPEG" if "jpeg" in kind else "PNG")
    path = tmp_path / f"image.{'jpeg' if 'jpeg' in kind else 'png'}"
    path.write_bytes(buf.getvalue())
    reference = tv.io.decode_image(str(path), mode=tv.io.ImageReadMode.RGB)
    if reference.dtype != torch.uint8:  # torchvision's 16-bit PNG: the package keeps the high byte, as ToDtype
        reference = TF.to_dtype(reference, torch.uint8, scale=True)
    ours = read_rgb(path)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 30, 41)
    assert torch.equal(ours, reference)
