"""What every image goes through before the model: the optional cell window, the resize to the model's size
(keeping the aspect), and the normalisation; one `Preprocess` object that the model records and every path
(cache, stream, evaluate, predict, exports) replays.

Decoding and resizing use libjpeg-turbo (simplejpeg) and torch's own antialiased bilinear resize, the two
calls torchvision's decode_jpeg and v2 resize make on CPU, with the same output bit for bit
(tests/data/test_decode.py compares them on real images): importing torchvision doubled the start of evaluate,
predict and export, mostly for torch._dynamo, which torchvision.ops pulls in (benchmarks/bench_startup.py).

Training augmentation runs in batches on the device: bloodcells_dist/data/augment.py.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import TrainConfig, geometry_problem
from ..nucleus import nucleus_mask

# Per-channel mean and std of the real TRAIN images (RGB in [0, 1], 498 images sampled).
MEAN = (0.678, 0.641, 0.659)
STD = (0.262, 0.260, 0.259)
FILL = tuple(round(255 * m) for m in MEAN)  # uint8 colour of what lies outside the frame (window, padding)
JPEG_MAGIC = b"\xff\xd8\xff"
MIN_STD = 1e-3  # a smaller std turns one grey level into hundreds of units: the model file is broken


class UnreadableImage(ValueError):
    """An image file no decoder can read (corrupt, truncated, not an image)."""


def read_rgb(path: Path) -> torch.Tensor:
    """Any image file -> uint8 (3, H, W) RGB (grayscale, CMYK, alpha, 16-bit, PNG under a .jpeg name included),
    the one reader of evaluate --images and predict, held to the packer's bar (check_image_data);
    UnreadableImage saying why when the file fails it or nothing can decode it."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:  # a folder, no permission, a vanished file
        raise UnreadableImage(err.strerror or str(err)) from None
    if not data:
        raise UnreadableImage("zero-byte file")
    decoded = check_image_data(data)
    if decoded is not None:  # a JPEG, decoded once, by the decoder the shards are decoded with
        return torch.from_numpy(decoded).permute(2, 0, 1)
    return read_with_pil(data)  # PNG, BMP, TIFF, CMYK JPEG...


def decode_jpeg(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W) RGB (grayscale expanded), decoded by libjpeg-turbo (accurate DCT, smooth
    chroma upsampling: torchvision's decode_jpeg, bit for bit), as a view of the decoded (H, W, 3) array: the resize
    reads it as fast as a contiguous one, and a copy would cost half the decode. ValueError for a file libjpeg-turbo
    cannot decode."""
    return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)


def resize(image: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """uint8 (3, h, w) on the CPU (where every path decodes) -> uint8 (3, *size), bilinear and antialiased: torch's
    uint8 kernel, as torchvision's v2 resize calls it there."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image.contiguous()
    out = F.interpolate(image.unsqueeze(0), size=[int(v) for v in size], mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0].contiguous()  # (3, h, w) in the usual layout, whatever the input's


def check_image_data(data: bytes) -> np.ndarray | None:
    """UnreadableImage unless `data` passes what pack checks: a header PIL reads within its pixel limit (the
    decompression-bomb bound, its warning taken as an error, as the packer takes it: a 691-byte file may claim
    20000 x 20000), and for a JPEG a strict libjpeg-turbo decode (a stream cut short with an end marker appended
    decodes to grey blocks with only a warning). Grayscale and CMYK JPEGs pass, unlike in shards.
    Returns that decode, (H, W, 3) RGB, for a colour or grayscale JPEG (the reader's pixels, decoded once); None
    for anything else, CMYK included (libjpeg-turbo's CMYK conversion differs from PIL's, and torchvision's, by a
    level)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                mode = image.mode
    except Exception as err:  # PIL raises OSError, SyntaxError, DecompressionBombError, the warning...
        raise UnreadableImage(f"{type(err).__name__}: {' '.join(str(err).split())[:200] or 'empty file'}") from None
    if data[:3] == JPEG_MAGIC:
        try:
            rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
        except (ValueError, RuntimeError) as err:  # simplejpeg: ValueError for errors and, strict, for warnings
            truncated = "Premature end of JPEG file" in str(err)
            raise UnreadableImage("truncated JPEG (premature end of file)" if truncated
                                  else f"corrupt JPEG ({' '.join(str(err).split())[:200]})") from None
        return rgb if mode in ("RGB", "L") else None
    return None


def read_with_pil(data: bytes) -> torch.Tensor:
    """PIL's decode of what libjpeg-turbo cannot read, as uint8 (3, H, W) RGB; 16-bit grayscale scaled to 8 bits
    (the high byte), not clipped."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode.startswith("I"):  # I;16 and kin: 16-bit values, which convert("RGB") would clip
                gray = torch.from_numpy(np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8).to(torch.uint8)
                return gray.expand(3, *gray.shape[-2:]).contiguous()
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL's errors for bad files
        raise UnreadableImage(f"{type(err).__name__}: {' '.join(str(err).split()) or 'empty file'}") from None


def nucleus_centre(image: torch.Tensor) -> tuple[float, float]:
    """(row, column) of the white cell's stained nucleus in a uint8 (3, H, W) image: the centroid of
    nucleus_mask; the frame's centre when the image has no stained pixel."""
    ys, xs = np.nonzero(nucleus_mask(image.permute(1, 2, 0).numpy().astype(np.int16)))
    if len(ys) == 0:
        return (image.shape[1] - 1) / 2, (image.shape[2] - 1) / 2
    return float(ys.mean()), float(xs.mean())


def window_side(cell_crop: float, height: int, width: int) -> int:
    """The window's side in source pixels: cell_crop pixels (> 1), or that fraction of the shorter side (<= 1)."""
    return int(cell_crop) if cell_crop > 1 else max(1, round(cell_crop * min(height, width)))


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


def fit_to(image: torch.Tensor, size: Sequence[int], fit: str) -> torch.Tensor:
    """uint8 (3, h, w) -> uint8 (3, *size) by a bilinear, antialiased resize. crop: scaled until it covers the
    size, then centre-cropped; pad: scaled until it fits, then padded with FILL; stretch: scaled per axis
    (the aspect changes). An image of the size's aspect is plainly resized by all three."""
    height, width = size
    h, w = image.shape[-2:]
    if fit == "stretch" or h * width == w * height:
        return resize(image, size)
    scale = (max if fit == "crop" else min)(height / h, width / w)
    inner = [round(h * scale), round(w * scale)]
    if fit == "crop":
        scaled = resize(image, [max(height, inner[0]), max(width, inner[1])])
        top, left = round((scaled.shape[1] - height) / 2), round((scaled.shape[2] - width) / 2)  # torchvision's
        return scaled[:, top:top + height, left:left + width]
    inner = [min(height, inner[0]), min(width, inner[1])]
    out = torch.tensor(FILL, dtype=torch.uint8).view(3, 1, 1).repeat(1, height, width)
    top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
    out[:, top:top + inner[0], left:left + inner[1]] = resize(image, inner)
    return out


@dataclass(frozen=True)
class Preprocess:
    """From a decoded image to the model's input: window, resize and normalisation, as the model was trained."""

    image_size: tuple[int, int]  # (height, width) fed to the model
    cell_crop: float = 0.0  # 0: the whole frame; > 1: window side in pixels; <= 1: fraction of the shorter side
    fit: str = "crop"  # how the window or frame meets image_size when their aspects differ (FITS)
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD

    def __post_init__(self) -> None:
        for name, kind in (("image_size", int), ("mean", float), ("std", float), ("cell_crop", float)):
            value = getattr(self, name)
            try:
                if isinstance(value, str) or any(isinstance(v, (str, bool)) for v in np.atleast_1d(value).tolist()):
                    raise TypeError
                value = float(value) if name == "cell_crop" else tuple(kind(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}={value!r}: expected {'a number' if name == 'cell_crop' else 'numbers'}") from None
            object.__setattr__(self, name, value)
        problem = preprocess_problem(self)
        if problem:
            raise ValueError(problem)

    @classmethod
    def of(cls, config: TrainConfig) -> Preprocess:
        """Window, resize and normalisation of a run's images (what its models record)."""
        return cls(image_size=config.image_size, cell_crop=config.cell_crop, fit=config.fit)

    def resize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, H, W) decoded image -> uint8 (3, *image_size): the cell window (if any), then the fit."""
        if self.cell_crop:
            image = cell_window(image, window_side(self.cell_crop, *image.shape[-2:]))
        return fit_to(image, self.image_size, self.fit)

    def transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """uint8 (3, H, W) -> normalised float (3, *image_size), as the data path feeds the model."""
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)

        def transform(image: torch.Tensor) -> torch.Tensor:  # torchvision's ToDtype(scale=True), Normalize
            return self.resize(image).to(torch.float32).mul_(1 / 255).sub_(mean).div_(std)
        return transform

    def to_dict(self) -> dict:
        """JSON-ready: lists for tuples."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def tag(self) -> str:
        """A short name for file names, e.g. 120x160, 128x128-cell160, 96x96-pad."""
        crop = f"-cell{self.cell_crop:g}" if self.cell_crop else ""
        fit = f"-{self.fit}" if self.fit != "crop" else ""
        return f"{self.image_size[0]}x{self.image_size[1]}{crop}{fit}"


def preprocess_problem(p: Preprocess) -> str:
    """What is wrong with a preprocessing (e.g. read from a model file someone edited), or ''."""
    problem = geometry_problem(p.image_size, p.cell_crop, p.fit)
    if problem:
        return problem
    for name, values in (("mean", p.mean), ("std", p.std)):
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            return f"{name}={list(values)}: expected 3 finite numbers (R, G, B)"
    # Pixels are scaled to [0, 1] before the normalisation: their mean lies in it, their std at most 0.5.
    if not all(0 <= m <= 1 for m in p.mean):
        return f"mean={list(p.mean)}: every channel's mean must be in [0, 1] (pixels scaled to [0, 1])"
    if not all(MIN_STD <= v <= 1 for v in p.std):
        return f"std={list(p.std)}: every channel's std must be in [{MIN_STD}, 1] (pixels scaled to [0, 1])"
    return ""


def preprocess_from(meta: dict) -> Preprocess:
    """The Preprocess a model's metadata records; ValueError (naming the key) if a value is missing or unusable."""
    try:
        return Preprocess(image_size=meta["image_size"], cell_crop=meta.get("cell_crop", 0) or 0,
                          fit=meta["fit"], mean=meta["mean"], std=meta["std"])
    except KeyError as err:
        raise ValueError(f"no {err.args[0]!r}") from None
    except TypeError as err:
        raise ValueError(f"a value of the wrong type ({err})") from None
