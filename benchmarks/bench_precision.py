"""Training-step throughput of the reference model: fp32 vs bf16 autocast, contiguous vs channels_last.

The model alone (synthetic input tensors, no data loading), as the trainer runs it with `mixed_precision`
and `channels_last`; all four combinations in the same run, so their ratios can be compared.

    python benchmarks/bench_precision.py [--size 120 160] [--batch-size 32] [--steps 12] [--device cpu|cuda]

On CUDA each step is synchronized before it is timed. Writes the figures, with the run's provenance, as the
"precision-cpu" or "precision-gpu" section of results/speed.json (one run per batch size; docs/speed.md renders
them); --no-record only prints them.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from record import record

from bloodcells_dist.train.model import BloodCellCNN


def images_per_second(size: tuple[int, int], batch: int, steps: int, *, bf16: bool, channels_last: bool,
                      widths: tuple[int, ...], device: torch.device) -> float:
    """Median images/s of `steps` SGD steps after 3 warm-up steps."""
    torch.manual_seed(0)
    model = BloodCellCNN(image_size=size, widths=widths, hidden=(256, 128), dropout=0.3)
    model = model.to(device)
    images, labels = torch.randn(batch, 3, *size, device=device), torch.randint(0, 4, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images).float(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    timed = sorted(times[3:])
    return batch / timed[len(timed) // 2]


def main() -> None:
    """Print a table of the four combinations and their speed-up over fp32 contiguous."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, nargs=2, default=(120, 160), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--widths", type=int, nargs=4, default=(32, 64, 128, 128))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-record", action="store_true", help="print only; leave results/speed.json as it is")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {tuple(args.size)}, batch {args.batch_size}")
    base, rates = None, {}
    for bf16 in (False, True):
        for channels_last in (False, True):
            rate = images_per_second(tuple(args.size), args.batch_size, args.steps, bf16=bf16,
                                     channels_last=channels_last, widths=tuple(args.widths), device=device)
            base = base or rate
            rates[f"{'bf16' if bf16 else 'fp32'} {'channels_last' if channels_last else 'contiguous'}"] = \
                {"img_per_s": round(rate, 1), "x": round(rate / base, 2)}
            print(f"{'bf16' if bf16 else 'fp32'} {'channels_last' if channels_last else 'contiguous   '} "
                  f"{rate:7.1f} img/s  x{rate / base:.2f}", flush=True)
    if not args.no_record:
        record("speed", f"precision-{'gpu' if device.type == 'cuda' else 'cpu'}",
               {"threads": torch.get_num_threads(), "image_size": list(args.size), "steps": args.steps},
               command=shlex.join(["python", "benchmarks/bench_precision.py", *sys.argv[1:]]), device=str(device),
               precision="all four", run={"batch": args.batch_size, "img_per_s": rates})


if __name__ == "__main__":
    main()
