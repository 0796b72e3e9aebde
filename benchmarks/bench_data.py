"""Data-pipeline benchmark (issue 4): samples/s per CPU core with the default augmentation, and bytes per sample.

Run from the repository root: ``python benchmarks/bench_data.py [--data bundled] [--samples 2000] [--runs 5]
[--workers 2]``. Single process first (one intra-op thread: one core; per-core throughput is samples per CPU-second
of the process, robust to other load on the machine, with the wall-clock rate next to it), then, with ``--workers N``, a
``DataLoader`` with N worker processes (one thread each) batching with ``collate_pairs``; per-core = samples/s / N.
Each sample is a full ``PairShards`` item: decode the stored JPEG, ``RandomResizedCrop(224)`` + flips + quarter
turns + colour jitter on image and graph, normalise, materialise ``x`` from the embedding table. Reports the median
(min–max) of ``--runs`` runs and prints a Markdown table for ``benchmarks/RESULTS.md``. The byte sizes are means over
the dataset's samples, read from its index.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from common import describe_run, import_first, spread
from torch.utils.data import DataLoader

import geolink
from geolink.data.shards import shard_sizes

PairShards = import_first("geolink.data.pairs:PairShards", "geolink.data.dataset:PairShards")
collate_pairs = import_first("geolink.data.pairs:collate_pairs", "geolink.data.dataset:collate_pairs")


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def single_process(root: Path, samples: int, transform: str | None) -> tuple[float, float]:
    """``(samples per wall second, samples per CPU second)`` of ``dataset[i, draw]`` in this process (one thread).

    The CPU-second figure is the per-core throughput even when other processes share the machine; the wall figure
    equals it on an idle core.
    """
    dataset = PairShards(root, transform=transform)
    n = len(dataset)
    for i in range(min(20, samples)):  # warm-up: open the shard, load the table
        dataset[i % n, i]
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(samples):
        dataset[i % n, i]
    return samples / (time.perf_counter() - start), samples / (time.process_time() - cpu)


def with_workers(root: Path, samples: int, workers: int, batch_size: int) -> float:
    """Samples/s of a DataLoader with ``workers`` processes (startup excluded: timed from the first batch)."""
    dataset = PairShards(root, transform="train")
    n = len(dataset)
    keys = [(i % n, i) for i in range(samples + workers * 2 * batch_size)]
    batches = [keys[k:k + batch_size] for k in range(0, len(keys), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_pairs,
                        worker_init_fn=_one_thread, persistent_workers=False, prefetch_factor=4)
    iterator = iter(loader)
    for _ in range(workers * 2):  # let every worker produce its first batches before timing
        next(iterator)
    start, count = time.perf_counter(), 0
    for images, _ in iterator:
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="bundled", help="pair dataset folder, or 'bundled'")
    parser.add_argument("--samples", type=int, default=2000, help="samples per run")
    parser.add_argument("--runs", type=int, default=5, help="runs (the median is reported)")
    parser.add_argument("--workers", type=int, default=0, help="also measure a DataLoader with N workers")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    root = Path(geolink.__file__).parent / "assets" / "pairs" if args.data == "bundled" else Path(args.data)
    torch.set_num_threads(1)
    results = {"data": str(args.data), "cpu": platform.processor() or platform.machine(),
               "cores": os.cpu_count(), "load_average": os.getloadavg()[0], "torch": torch.__version__}
    aug = [single_process(root, args.samples, "train") for _ in range(args.runs)]
    plain = [single_process(root, args.samples, None) for _ in range(args.runs)]
    rates = {"augmented_per_core": [r[1] for r in aug], "augmented_wall": [r[0] for r in aug],
             "plain_per_core": [r[1] for r in plain], "plain_wall": [r[0] for r in plain]}
    if args.workers:
        rates["workers"] = [with_workers(root, args.samples, args.workers, args.batch_size) for _ in range(args.runs)]
        rates["workers_per_core"] = [r / args.workers for r in rates["workers"]]
    for key, values in rates.items():
        results[f"samples_per_s_{key}"] = {"median": round(statistics.median(values), 1),
                                           "min": round(min(values), 1), "max": round(max(values), 1)}
    sizes = shard_sizes(root)
    results.update({f"{k}_per_sample": round(v, 1) for k, v in sizes.items() if k != "samples"})
    results["samples_in_dataset"] = sizes["samples"]
    print(describe_run())
    print(json.dumps(results, indent=1))
    print(f"\nsamples/s: median (min–max) of {args.runs} runs of {args.samples} samples")
    print("\n| measure | value | target |\n|---|---|---|")
    print(f"| samples per CPU-second (per core), default augmentation, 1 process | "
          f"{spread(rates['augmented_per_core'], digits=1)} (wall: {spread(rates['augmented_wall'], digits=1)}) "
          "| ≥ 300 |")
    print(f"| samples per CPU-second (per core), no augmentation, 1 process | "
          f"{spread(rates['plain_per_core'], digits=1)} (wall: {spread(rates['plain_wall'], digits=1)}) | |")
    if args.workers:
        print(f"| samples/s, DataLoader {args.workers} workers (per core) | {spread(rates['workers'], digits=1)} "
              f"({spread(rates['workers_per_core'], digits=1)}) | ≥ 300 per core |")
    print(f"| graph bytes per sample (stored, incl. offsets), mean | {results['graph_bytes_per_sample']:.0f} | "
          "≤ 20 000 |")
    print(f"| image bytes per sample (JPEG as published), mean | {results['image_bytes_per_sample']:.0f} | |")
    print(f"| shard file bytes per sample (incl. safetensors header), mean | {results['file_bytes_per_sample']:.0f} "
          "| |")

if __name__ == "__main__":
    main()
