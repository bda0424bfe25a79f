"""Packing throughput: `bloodcells pack` (decode-check, hash, audit, write; 1 and 2 processes) vs `tar -cf` of
the same files.

`tar` is the I/O floor: it copies the bytes and nothing else. Ratios hold on a noisy shared machine;
absolute times do not. Grouping defaults to `files` (the cell recovery of `--groups cells` is timed apart by
`bloodcells cells`, a few minutes on the real TRAIN folder).

    python benchmarks/bench_pack.py [--src ../shared/blood-cells] [--repeats 3] [--groups files] [--no-record]

Writes the figures, with the run's provenance, as the "pack" section of results/speed.json (docs/speed.md renders
them); --no-record only prints them.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import record

from bloodcells_dist.pack.shards import PackOptions, pack_shards
from bloodcells_dist.pack.sources import scan_images


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Median seconds over repeats for tar and for pack at 1 and 2 workers, as images/s."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/blood-cells"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--groups", default="files", help="the pack's --groups (default: files)")
    parser.add_argument("--no-record", action="store_true", help="print only; leave results/speed.json as it is")
    args = parser.parse_args()
    images = scan_images(args.src).images
    n = len(images)
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp, "files.txt")
        listing.write_text("".join(f"{img.path}\n" for img in images))
        runs = {
            "tar -cf (I/O floor)": lambda: subprocess.run(["tar", "-cf", f"{tmp}/all.tar", "-T", str(listing)],
                                                          check=True, stderr=subprocess.DEVNULL),
            "pack, 1 process": lambda: pack_shards(args.src, Path(tmp, "w1"), PackOptions(
                overwrite=True, workers=1, groups=args.groups), say=lambda _: None),
            "pack, 2 processes": lambda: pack_shards(args.src, Path(tmp, "w2"), PackOptions(
                overwrite=True, workers=2, groups=args.groups), say=lambda _: None),
        }
        for fn in runs.values():  # warm the page cache so every variant reads from memory
            fn()
        results = {name: statistics.median(timed(fn) for _ in range(args.repeats)) for name, fn in runs.items()}
    floor = results["tar -cf (I/O floor)"]
    print(f"{n} images from {args.src}, median of {args.repeats}")
    for name, seconds in results.items():
        print(f"{name:<22} {seconds:6.2f} s  {n / seconds:8,.0f} images/s  {seconds / floor:5.1f}x tar's time")
    if not args.no_record:
        keys = {"tar -cf (I/O floor)": "tar", "pack, 1 process": "pack_1_process", "pack, 2 processes": "pack_2_processes"}
        record("speed", "pack", {"images": n, "repeats": args.repeats, "groups": args.groups,
                                 "images_per_second": {keys[k]: round(n / s, 1) for k, s in results.items()}},
               command=shlex.join(["python", "benchmarks/bench_pack.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
