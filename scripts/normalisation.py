"""Per-channel mean and std of a split's images (RGB scaled to [0, 1], pooled over every pixel of a seeded sample),
the figures behind `bloodcells_dist/data/preprocess.py`'s MEAN and STD. Writes results/normalisation.json.

    python scripts/normalisation.py --shards SHARDS [--split train] [--images 498] [--seed 0] [--out results/normalisation.json]

The published constants were computed once from 498 sampled TRAIN images (commit e7a1a8e); the script that did it
was not kept. This one recomputes them from packed shards; the JSON keeps both, and a test checks that the code's
constants are the published ones.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bloodcells_dist.pack.manifest import ShardManifest  # noqa: E402
from bloodcells_dist.train.provenance import provenance  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def channel_statistics(images: list[bytes]) -> tuple[list[float], list[float]]:
    """Mean and std of R, G and B over every pixel of the images (each scaled to [0, 1])."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for data in images:
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
        total += pixels.sum(0)
        squares += (pixels ** 2).sum(0)
        count += len(pixels)
    mean = total / count
    return mean.tolist(), np.sqrt(squares / count - mean ** 2).tolist()


def sampled_images(shards: Path, split: str, images: int, seed: int) -> tuple[list[bytes], int]:
    """`images` image files drawn with `seed` from the split's shards (all of them if fewer), and the split's size."""
    manifest = ShardManifest.load(shards)
    names = []
    for url in manifest.shard_urls(shards, split):
        with tarfile.open(url) as tar:
            names += [(url, m.name) for m in tar.getmembers() if m.name.lower().endswith(IMAGE_SUFFIXES)]
    chosen = sorted(random.Random(seed).sample(names, min(images, len(names))))
    found = []
    for url in dict.fromkeys(u for u, _ in chosen):
        wanted = {n for u, n in chosen if u == url}
        with tarfile.open(url) as tar:
            found += [tar.extractfile(m).read() for m in tar.getmembers() if m.name in wanted]  # type: ignore[union-attr]
    return found, len(names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--images", type=int, default=498, help="images sampled (the published constants used 498)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "normalisation.json")
    args = parser.parse_args()
    images, available = sampled_images(args.shards, args.split, args.images, args.seed)
    mean, std = channel_statistics(images)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["recomputed"] = {
        "mean": [round(v, 4) for v in mean], "std": [round(v, 4) for v in std],
        "images": len(images), "of": available, "split": args.split, "seed": args.seed,
        "shards": str(args.shards),
        "command": "python scripts/normalisation.py " + " ".join(sys.argv[1:]),
        "provenance": provenance(),
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.split}: {len(images)} of {available} images, mean {result['recomputed']['mean']}, "
          f"std {result['recomputed']['std']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
