"""Batched augmentation where the batch lives (CPU or GPU): uint8 images in, model-ready tensors out.

Every random parameter of a sample comes from a counter-based hash of (seed, epoch, sample id), computed
for the whole batch at once: a sample is augmented the same way whatever the world size, batch size,
worker count, data path (cache or stream) or resume point.

Per sample, in today's order (see README, "Data" for where a distribution changed):
flips -> multiple of 90 degrees (odd turns of a non-square frame reflected at its edges) -> small affine
(+-15 degrees, 5% shift, scale 0.9-1.1, filled with the mean colour) -> colour jitter (brightness,
contrast, saturation +-20%) -> stain jitter (off by default: a hue turn and a gain per channel, for the
stain and white balance of other smears) -> random erasing (off by default: one rectangle of 2-20% of the
frame in the mean colour) -> normalisation -> channels_last and the autocast dtype. The geometric steps
are one inverse-mapped sampling grid and a single `grid_sample`; both colour steps are one 3x3 matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from .plan import stable_seed
from .preprocess import MEAN, STD, Preprocess

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # Accelerate's mixed_precision -> the autocast dtype

MASK32 = 0xFFFFFFFF
# Draws per sample, in this order (a fixed slot each, so switching one augmentation off changes no other).
HFLIP, VFLIP, ROT90, ANGLE, SHIFT_X, SHIFT_Y, SCALE, BRIGHTNESS, CONTRAST, SATURATION = range(10)
HUE, GAIN_R, GAIN_G, GAIN_B, ERASE, ERASE_AREA, ERASE_ASPECT, ERASE_TOP, ERASE_LEFT = range(10, 19)
DRAWS = 19
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
# RGB -> YIQ: a hue turn is a rotation of the (I, Q) chroma plane that keeps the luma Y and every gray.
YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
YIQ_TO_RGB = tuple(map(tuple, torch.linalg.inv(torch.tensor(YIQ, dtype=torch.float64)).tolist()))


@cache
def constant(values: tuple, device: torch.device) -> torch.Tensor:
    """A small constant tensor on the device, made once: a copy per batch would sync a GPU with the host."""
    return torch.tensor(values, dtype=torch.float32, device=device)


TURNS = (((1, 0), (0, 1)), ((0, 1), (-1, 0)), ((-1, 0), (0, -1)), ((0, -1), (1, 0)))  # 0, 90, 180, 270 degrees


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h in [0, 2^32), in int64 without overflow (16-bit halves)."""
    return ((h & 0xFFFF) * c + ((((h >> 16) * c) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: every input bit flips about half of the output bits."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def sample_uniforms(seed: int, epoch: int, ids: torch.Tensor, draws: int = DRAWS) -> torch.Tensor:
    """(N, draws) floats in [0, 1), a pure function of (seed, epoch, sample id, draw), on ids' device."""
    base = stable_seed(seed, epoch, "augment") & MASK32
    ids = ids.to(torch.int64)
    h = _fmix32((ids & MASK32) ^ base)
    h = _fmix32(h ^ ((ids >> 32) & MASK32))
    counters = torch.arange(1, draws + 1, device=ids.device, dtype=torch.int64) * 0x9E3779B9 & MASK32
    bits = _fmix32((h[:, None] + counters[None, :]) & MASK32)
    return (bits >> 8).to(torch.float32) / float(1 << 24)  # 24 bits: exact in float32


@dataclass(frozen=True)
class DeviceAugment:
    """What to do to a batch: the augmentation switches, normalisation, memory format and dtype."""

    flip: bool = False
    rot90: bool = False
    affine: bool = False
    color: bool = False
    hue: float = 0.0  # stain jitter: hue turned by up to +-hue of a full turn (torchvision's ColorJitter hue)
    gain: float = 0.0  # stain jitter: each channel scaled by a factor in [1 - gain, 1 + gain]
    erase: float = 0.0  # probability of erasing one rectangle (torchvision's RandomErasing, mean colour)
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    channels_last: bool = False
    dtype: torch.dtype = torch.float32  # the autocast dtype (bf16/fp16) saves a cast in the first conv

    def __call__(self, images: torch.Tensor, ids: torch.Tensor | None = None, *, seed: int = 0,
                 epoch: int = 0) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> augmented (when ids are given), normalised float (N, 3, H, W)."""
        x = images  # values 0..255 throughout: the 1/255 is folded into the normalisation
        mean, std = constant(tuple(self.mean), x.device), constant(tuple(self.std), x.device)
        if ids is not None and len(x):
            u = sample_uniforms(seed, epoch, ids.to(x.device))
            if self.flip or self.rot90 or self.affine:
                x = self.geometry(x.to(torch.float32), u, fill=mean * 255)
            if self.color:
                x = color_jitter(x.to(torch.float32), u).clamp_(0, 255)
            if self.hue or self.gain:
                x = stain_jitter(x.to(torch.float32), u, self.hue, self.gain).clamp_(0, 255)
            if self.erase:
                x = random_erase(x.to(torch.float32), u, self.erase, fill=mean * 255)
        # (x / 255 - mean) / std in one pass, then the memory format and dtype in another.
        x = torch.addcmul((-mean / std).view(1, -1, 1, 1), x, (1 / (255 * std)).view(1, -1, 1, 1))
        return x.to(self.dtype, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def geometry(self, x: torch.Tensor, u: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        """Flips, 90-degree turns and the small affine as one per-sample affine grid and one grid_sample.

        In pixels from the image centre, an output pixel p samples the source at F R A(p): A inverts the
        small affine, R the turn, F the flips. Points A(p) outside the frame take the fill colour; points of
        an odd turn outside a non-square frame are reflected at its edges (grid_sample's reflection).
        """
        n, _, height, width = x.shape
        eye = torch.eye(2, device=x.device).expand(n, 2, 2)
        linear, shift = eye, torch.zeros(n, 2, device=x.device)
        if self.affine:  # v2.RandomAffine(15, translate=(0.05, 0.05), scale=(0.9, 1.1)), inverted
            angle = (u[:, ANGLE] * 30 - 15) * (math.pi / 180)
            tx = torch.round((u[:, SHIFT_X] * 2 - 1) * 0.05 * width)  # whole pixels, as torchvision
            ty = torch.round((u[:, SHIFT_Y] * 2 - 1) * 0.05 * height)
            cos, sin = torch.cos(angle) / (0.9 + 0.2 * u[:, SCALE]), torch.sin(angle) / (0.9 + 0.2 * u[:, SCALE])
            linear = torch.stack((torch.stack((cos, sin), -1), torch.stack((-sin, cos), -1)), -2)
            shift = -(linear @ torch.stack((tx, ty), -1)[..., None])[..., 0]
        turn_flip = eye
        if self.rot90:
            k = (u[:, ROT90] * 4).long().clamp(max=3)
            turn_flip = constant(TURNS, x.device)[k]
        if self.flip:
            signs = torch.stack([torch.where(u[:, j] < 0.5, -1.0, 1.0) for j in (HFLIP, VFLIP)], -1)
            turn_flip = signs[..., None] * turn_flip
        # Pixels -> grid_sample's [-1, 1] coordinates (align_corners=False): g = p / half, so a map
        # p -> m p + t becomes g -> (m_ij half_j / half_i) g + t / half.
        half = constant((width / 2, height / 2), x.device)
        to_grid = lambda m, t: torch.cat((m * (half[None, :] / half[:, None]), (t / half)[..., None]), -1)
        theta = to_grid(turn_flip @ linear, (turn_flip @ shift[..., None])[..., 0])
        grid = sampling_grid(theta, height, width)
        # Nearest, as torchvision's RandomAffine (and twice as fast as bilinear); turns and flips stay exact.
        out = F.grid_sample(x, grid, mode="nearest", padding_mode="reflection", align_corners=False)
        if not self.affine:
            return out
        # A(p) outside the frame: |A(p)| > half. The grid holds F R A(p) / half; F R only permutes and signs
        # the axes, so an odd turn compares each axis against the other axis's half-size.
        odd = (turn_flip[:, 0, 0] == 0).view(-1, 1, 1, 1)
        ratio = torch.where(odd, constant((width / height, height / width), x.device), 1.0)
        outside = (grid.abs() * ratio).amax(-1)[:, None] > 1  # (N, 1, H, W)
        return torch.where(outside, fill.view(1, -1, 1, 1), out)


def sampling_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """F.affine_grid(theta, align_corners=False) as one batched matmul (twice as fast on CPU)."""
    xs = (torch.arange(width, device=theta.device) + 0.5) / (width / 2) - 1
    ys = (torch.arange(height, device=theta.device) + 0.5) / (height / 2) - 1
    base = torch.stack((xs.expand(height, width), ys[:, None].expand(height, width),
                        torch.ones(height, width, device=theta.device)), -1).view(1, height * width, 3)
    return torch.bmm(base.expand(len(theta), -1, -1), theta.transpose(1, 2)).view(len(theta), height, width, 2)


def color_jitter(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [0.8, 1.2] per sample, as one 3x3 colour matrix.

    All three are linear maps that commute (grayscale weights sum to 1), so their order does not matter;
    the caller clamps once at the end (torchvision clamps after each, which differs only at saturation).
    """
    n = len(x)
    w = constant(GRAY, x.device)
    b, c, s = (0.8 + 0.4 * u[:, j] for j in (BRIGHTNESS, CONTRAST, SATURATION))
    # saturation: s * I + (1 - s) * (each output channel = gray); contrast and brightness scale it.
    sat = s.view(n, 1, 1) * torch.eye(3, device=x.device) + (1 - s).view(n, 1, 1) * w.view(1, 1, 3)
    matrix = (c * b).view(n, 1, 1) * sat
    # contrast blends towards the mean gray level of the brightened image: (1 - c) * b * mean gray.
    mean_gray = (x.mean((2, 3)) @ w) * b * (1 - c)  # (N,)
    out = torch.bmm(matrix, x.flatten(2)) + mean_gray.view(n, 1, 1)
    return out.view_as(x)


def stain_jitter(x: torch.Tensor, u: torch.Tensor, hue: float, gain: float) -> torch.Tensor:
    """A hue turn of up to +-hue of a full circle (in YIQ, so luma and grays stay) followed by a gain per
    channel in [1 - gain, 1 + gain]: the stain and white balance of another smear, as one 3x3 matrix."""
    n = len(x)
    angle = (u[:, HUE] * 2 - 1) * hue * 2 * math.pi
    cos, sin, zero, one = torch.cos(angle), torch.sin(angle), torch.zeros(n, device=x.device), torch.ones(n, device=x.device)
    turn = torch.stack((torch.stack((one, zero, zero), -1), torch.stack((zero, cos, -sin), -1),
                        torch.stack((zero, sin, cos), -1)), -2)
    gains = 1 + (u[:, GAIN_R:GAIN_B + 1] * 2 - 1) * gain  # (N, 3)
    matrix = gains[..., None] * (constant(YIQ_TO_RGB, x.device) @ turn @ constant(YIQ, x.device))
    return torch.bmm(matrix, x.flatten(2)).view_as(x)


def random_erase(x: torch.Tensor, u: torch.Tensor, p: float, fill: torch.Tensor) -> torch.Tensor:
    """With probability p per sample, one rectangle of 2-20% of the frame, aspect ratio 0.3-3.3 (log-uniform),
    clipped to the frame, takes the fill colour (torchvision's RandomErasing with value=mean, one try)."""
    n, _, height, width = x.shape
    area = (0.02 + 0.18 * u[:, ERASE_AREA]) * height * width
    aspect = torch.exp((u[:, ERASE_ASPECT] * 2 - 1) * math.log(10 / 3))
    h = torch.sqrt(area / aspect).round().clamp(1, height)
    w = torch.sqrt(area * aspect).round().clamp(1, width)
    top = (u[:, ERASE_TOP] * (height - h + 1)).floor()
    left = (u[:, ERASE_LEFT] * (width - w + 1)).floor()
    ys = torch.arange(height, device=x.device).view(1, height, 1)
    xs = torch.arange(width, device=x.device).view(1, 1, width)
    inside = ((ys >= top.view(n, 1, 1)) & (ys < (top + h).view(n, 1, 1)) & (xs >= left.view(n, 1, 1))
              & (xs < (left + w).view(n, 1, 1)) & (u[:, ERASE] < p).view(n, 1, 1))
    return torch.where(inside[:, None], fill.view(1, -1, 1, 1), x)


def training_augment(config: TrainConfig, preprocess: Preprocess, mixed_precision: str) -> DeviceAugment:
    """The run's augmentation as its config sets it, normalised as `preprocess` and cast for the autocast dtype."""
    return DeviceAugment(flip=config.aug_flip, rot90=config.aug_rot90, affine=config.aug_affine,
                         color=config.aug_color, hue=config.aug_hue, gain=config.aug_gain, erase=config.aug_erase,
                         mean=preprocess.mean, std=preprocess.std, channels_last=config.channels_last,
                         dtype=DTYPES.get(mixed_precision, torch.float32))
