"""Training throughput of the data paths against the model alone, in one run, same batch, precision and device.

    python benchmarks/bench_train.py --shards SHARDS [--batch-size 64] [--precision bf16] [--device cpu]
        [--image-size 120,160] [--cell-crop 0] [--steps 20] [--rounds 2] [--workers 1] [--cache-dir DIR]

Rows (each the median over --rounds, measured in turn so that machine noise hits them alike):
  model alone      the training step on synthetic, ready tensors: the ceiling
  cache            decoded cache -> epoch plan -> batched augmentation on the device -> training step
  stream           shards -> data workers decode -> batched augmentation on the device -> training step
  old per-sample   shards -> data workers decode and augment each sample (torchvision v2) -> training step
Also reports the time to build the decoded cache of the full TRAIN folder (train + val splits) and to load it.
The model is best.yaml's (widths 32,64,128,128); the step is forward, loss, backward and SGD.
Writes the figures, with the run's provenance, as the "train-cpu" or "train-gpu" section of results/speed.json
(one run per batch size; docs/speed.md renders them); --no-record only prints them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from record import record
from torchvision.transforms import v2

from bloodcells_dist.data.augment import DeviceAugment
from bloodcells_dist.data.batches import CachedBatches, StreamedBatches, shard_positions
from bloodcells_dist.data.cache import load_or_build
from bloodcells_dist.data.plan import EpochPlan, stable_seed
from bloodcells_dist.data.preprocess import MEAN, STD, Preprocess, decode_jpeg
from bloodcells_dist.data.stream import TrainStream, sample_id, stream_loader
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.train.model import BloodCellCNN

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


class RandomRot90(torch.nn.Module):
    """The previous pipeline's per-sample 90-degree turn (centre crop and reflect pad for non-square frames)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()).item())
        if k == 0:
            return image
        height, width = image.shape[-2:]
        image = torch.rot90(image, k, dims=(-2, -1))
        if k % 2 and height != width:
            image = v2.functional.center_crop(image, [min(height, width)] * 2)
            pad_h, pad_w = height - image.shape[-2], width - image.shape[-1]
            pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            image = F.pad(image[None], pads, mode="reflect")[0]
        return image


def old_transform(size: tuple[int, int]) -> v2.Compose:
    """The previous per-sample training transform (transforms.build_transform with every switch on)."""
    return v2.Compose([v2.Resize(list(size), antialias=True), v2.ToDtype(torch.float32, scale=True),
                       v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90(),
                       v2.RandomAffine(degrees=15, translate=(0.05, 0.05), scale=(0.9, 1.1), fill=list(MEAN)),
                       v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2), v2.Normalize(MEAN, STD)])


class PerSampleStream(TrainStream):
    """The training stream with the previous per-sample pipeline in the data workers (this benchmark's only)."""

    transform: v2.Compose

    def decode(self, sample: dict) -> tuple[torch.Tensor, int, int]:
        uid = sample_id(sample["__key__"])
        with torch.random.fork_rng(devices=[]):  # per-sample seed: independent of order and workers
            torch.manual_seed(stable_seed(self.plan.seed, self.epoch, uid))
            return self.transform(decode_jpeg(sample["jpg"])), int(sample["cls"]), uid


def images_per_second(batches: Iterator, step, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """Run `warmup` then `steps` training steps on the batches; images/s over the timed steps."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i, (images, labels) in enumerate(batches):
        if i == warmup:
            sync()
            start = time.perf_counter()
        step(images, labels)
        if i + 1 == warmup + steps:
            sync()
            return steps * batch / (time.perf_counter() - start)
    raise SystemExit(f"only {i + 1} batches: lower --steps")


def main() -> None:
    """Measure every path in turn for --rounds rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", default="shards")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", choices=list(DTYPES), default="bf16")
    parser.add_argument("--channels-last", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--image-size", default="120,160")
    parser.add_argument("--cell-crop", type=float, default=0, help="the config's cell_crop (0: the whole frame)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="data workers of the stream paths")
    parser.add_argument("--cache-dir", type=Path, help="default: a temporary folder (the build is timed)")
    parser.add_argument("--paths", default="model,cache,stream,old")
    parser.add_argument("--no-record", action="store_true", help="print only; leave results/speed.json as it is")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.image_size.split(","))
    device, dtype, batch = torch.device(args.device), DTYPES[args.precision], args.batch_size
    manifest = ShardManifest.load(args.shards)
    load_start = os.getloadavg()[0]
    print(f"torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
          f"batch {batch}, {args.precision}, channels_last {bool(args.channels_last)}, {size[0]}x{size[1]}, "
          f"cell_crop {args.cell_crop}, "
          f"{args.workers} data worker(s) for the stream paths, {args.steps} timed steps x {args.rounds} rounds")

    # Cache of the full TRAIN folder (train + val splits): build it (timed), then load it (timed).
    tmp = tempfile.TemporaryDirectory()
    cache_dir = args.cache_dir or Path(tmp.name)
    start = time.perf_counter()
    preprocess = Preprocess(size, cell_crop=args.cell_crop)
    samples, path, built = load_or_build(manifest, args.shards, ["train", "val"], preprocess, cache_dir=cache_dir,
                                         workers=max(1, os.cpu_count() or 1))
    build = time.perf_counter() - start
    start = time.perf_counter()
    samples, _, _ = load_or_build(manifest, args.shards, ["train", "val"], preprocess, cache_dir=cache_dir, workers=1)
    samples.images = samples.images.clone()  # into memory, as a training run has it after its first epoch
    load = time.perf_counter() - start
    print(f"decoded cache: {len(samples.keys)} images, {samples.images.numel() / 2**20:,.0f} MB; "
          f"{'built' if built else 'found'} in {build:.1f} s, loaded in {load:.1f} s ({path.name})")

    torch.manual_seed(0)
    model = BloodCellCNN(image_size=size, widths=(32, 64, 128, 128), hidden=(256, 128), dropout=0.3).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    rows = samples.select(["train"])
    total = args.warmup + args.steps
    plan = EpochPlan(len(rows), batch, 1, seed=0)
    augment = DeviceAugment(flip=True, rot90=True, affine=True, color=True, channels_last=bool(args.channels_last),
                            dtype=dtype)
    cached = CachedBatches(samples.to(device), rows, rows[:0], plan, augment, 0, device)
    counts = {"train": len(manifest.split("train").shards)}
    streamed = StreamedBatches(manifest.shard_urls(args.shards, "train"), shard_positions(samples, counts, rows),
                               [], None, plan, augment, 0, device, args.workers, 1000, preprocess)
    fixed = augment(samples.images[rows[:batch]].to(device), samples.ids[rows[:batch]].to(device))
    labels = samples.labels[rows[:batch]].to(device)

    def old_batches() -> Iterator:
        stream = PerSampleStream(manifest.shard_urls(args.shards, "train"), shard_positions(samples, counts, rows),
                                 plan=plan, preprocess=preprocess, epoch=0, rank=0, shuffle_buffer=1000)
        stream.transform = old_transform(size)
        for images, labs, _ in stream_loader(stream, args.workers, device.type == "cuda"):
            yield (images.to(device, non_blocking=True).contiguous(memory_format=memory_format),
                   labs.to(device, non_blocking=True))

    paths = {"model alone": lambda: ((fixed, labels) for _ in range(total)),
             "cache": lambda: cached.train_batches(epoch=0),
             "stream": lambda: streamed.train_batches(epoch=0),
             "old per-sample": old_batches}
    chosen = {"model": "model alone", "cache": "cache", "stream": "stream", "old": "old per-sample"}
    paths = {chosen[k]: paths[chosen[k]] for k in args.paths.split(",")}
    results: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, batches in paths.items():
            results[name].append(images_per_second(batches(), step, batch, args.steps, args.warmup, device))
    ceiling = statistics.median(results["model alone"]) if "model alone" in results else None
    print(f"{'path':<16} {'img/s':>9} {'x model alone':>14}   rounds")
    for name, values in results.items():
        rate = statistics.median(values)
        ratio = f"{rate / ceiling:.2f}" if ceiling else "-"
        print(f"{name:<16} {rate:>9.1f} {ratio:>14}   {', '.join(f'{v:.1f}' for v in values)}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if not args.no_record:
        labels = {"stream": f"stream ({args.workers} data worker(s) decode; batched augmentation)",
                  "old per-sample": f"previous per-sample pipeline ({args.workers} data worker(s))"}
        paths = {name: {"rounds": [round(v, 1) for v in values], **({"label": labels[name]} if name in labels else {})}
                 for name, values in results.items()}
        record("speed", f"train-{'gpu' if device.type == 'cuda' else 'cpu'}",
               {"image_size": list(size), "workers": args.workers, "steps": args.steps,
                "load_average_start": round(load_start, 2),
                "cache": {"images": len(samples.keys), "megabytes": round(samples.images.numel() / 2**20),
                          "build_seconds": round(build, 1), "build_workers": max(1, os.cpu_count() or 1),
                          "load_seconds": round(load, 1)}},
               command=shlex.join(["python", "benchmarks/bench_train.py", *sys.argv[1:]]), device=str(device),
               precision=args.precision, run={"batch": batch, "paths": paths})


if __name__ == "__main__":
    main()
