"""Training throughput: bloodcells_dist's shard pipeline vs a plain ImageFolder + PIL baseline, same run.

Both feed the same model (the reference design), batch size, optimizer and loop; only the data path
differs: ours reads WebDataset shards, decodes with libjpeg-turbo and augments tensors with transforms v2;
the baseline reads JPEG files through torchvision ImageFolder with PIL-based transforms. Prints images/s
for each at 120x160 and 240x320, and the ratio.

    python benchmarks/bench_train.py [--shards shards] [--images ROOT/TRAIN] [--steps 30] [--workers 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets, transforms as T

from bloodcells_dist.loader import TrainStream, train_loader
from bloodcells_dist.manifest import ShardManifest
from bloodcells_dist.model import BloodCellCNN
from bloodcells_dist.transforms import MEAN, STD, build_transform


def baseline_loader(root: Path, size: tuple[int, int], batch: int, workers: int) -> torch.utils.data.DataLoader:
    """The usual notebook pipeline: ImageFolder + PIL transforms + shuffling DataLoader."""
    tf = T.Compose([T.Resize(size), T.RandomHorizontalFlip(), T.RandomVerticalFlip(),
                    T.RandomAffine(15, translate=(0.05, 0.05), scale=(0.9, 1.1)),
                    T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(), T.Normalize(MEAN, STD)])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(root), tf), batch_size=batch, shuffle=True,
                                       num_workers=workers, drop_last=True, persistent_workers=False)


def shard_loader(shards: str, size: tuple[int, int], batch: int, workers: int, steps: int):
    """The trainer's own pipeline (bloodcells_dist.loader.TrainStream), one process."""
    urls = ShardManifest.load(shards).shard_urls(shards, "train")
    tf = build_transform(size, flip=True, rot90=True, affine=True, color=True)
    stream = TrainStream(urls, transform=tf, batch_size=batch, steps=steps, epoch=0, seed=0, rank=0, world_size=1,
                         shuffle=True, shuffle_buffer=1000)
    return train_loader(stream, workers, pin_memory=False)


def images_per_second(loader, size: tuple[int, int], batch: int, steps: int, warmup: int = 3) -> float:
    """Train the reference model for `steps` batches after `warmup`; return images/s over the timed part."""
    torch.manual_seed(0)
    model = BloodCellCNN(image_size=size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    start, seen = None, 0
    for i, (images, labels) in enumerate(loader):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(labels)
        if i + 1 == warmup + steps:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    """Measure both pipelines at both sizes and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="shards")
    parser.add_argument("--images", type=Path,
                        default=Path("../shared/blood-cells/dataset2-master/dataset2-master/images/TRAIN"))
    parser.add_argument("--steps", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.workers} data workers, {args.steps} timed steps")
    print(f"{'size':>9} {'baseline img/s':>15} {'shards img/s':>13} {'ratio':>6}")
    for size in ((120, 160), (240, 320)):
        base = images_per_second(baseline_loader(args.images, size, args.batch_size, args.workers), size,
                                 args.batch_size, args.steps)
        ours = images_per_second(shard_loader(args.shards, size, args.batch_size, args.workers, args.steps + 3),
                                 size, args.batch_size, args.steps)
        print(f"{size[0]:>4}x{size[1]:<4} {base:>15.1f} {ours:>13.1f} {ours / base:>6.2f}")


if __name__ == "__main__":
    main()
