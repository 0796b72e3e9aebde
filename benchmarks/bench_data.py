"""Data-pipeline benchmark (issue 4): samples/s per CPU core with the default augmentation, and bytes per sample.

Run from the repository root: ``python benchmarks/bench_data.py [--data bundled] [--samples 2000] [--runs 5]
[--workers 2]``. Single process first (one intra-op thread: one core; per-core throughput is samples per CPU-second
of the process, robust to other load on the machine, with the wall-clock rate next to it), then, with ``--workers N``, a
``DataLoader`` with N worker processes (one thread each) batching with ``collate_pairs``; per-core = samples/s / N.
Each sample is a full ``PairShards`` item: decode the stored JPEG, ``RandomResizedCrop(224)`` + flips + quarter
turns + colour jitter on image and graph, normalise, materialise ``x`` from the embedding table. Reports the median
of ``--runs`` runs and prints a Markdown table for ``benchmarks/RESULTS.md``.
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
from torch.utils.data import DataLoader

import geolink
from geolink.data.dataset import PairShards, collate_pairs
from geolink.data.shards import shard_sizes


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
    results["samples_per_s_per_core_augmented"] = round(statistics.median(r[1] for r in aug), 1)
    results["samples_per_wall_s_augmented"] = round(statistics.median(r[0] for r in aug), 1)
    results["samples_per_s_per_core_no_augmentation"] = round(statistics.median(r[1] for r in plain), 1)
    results["samples_per_wall_s_no_augmentation"] = round(statistics.median(r[0] for r in plain), 1)
    if args.workers:
        runs = [with_workers(root, args.samples, args.workers, args.batch_size) for _ in range(args.runs)]
        results[f"samples_per_s_{args.workers}_workers"] = round(statistics.median(runs), 1)
        results["samples_per_s_per_core_workers"] = round(statistics.median(runs) / args.workers, 1)
    results.update({f"{k}_per_sample": round(v, 1) for k, v in shard_sizes(root).items() if k != "samples"})
    results["samples_in_dataset"] = shard_sizes(root)["samples"]
    print(json.dumps(results, indent=1))
    print("\n| measure | value | target |\n|---|---|---|")
    print(f"| samples per CPU-second (per core), default augmentation, 1 process | "
          f"{results['samples_per_s_per_core_augmented']} (wall: {results['samples_per_wall_s_augmented']}) | ≥ 300 |")
    print(f"| samples per CPU-second (per core), no augmentation, 1 process | "
          f"{results['samples_per_s_per_core_no_augmentation']} (wall: {results['samples_per_wall_s_no_augmentation']})"
          " | |")
    if args.workers:
        print(f"| samples/s, DataLoader {args.workers} workers (per core) | "
              f"{results[f'samples_per_s_{args.workers}_workers']} ({results['samples_per_s_per_core_workers']}) "
              "| ≥ 300 per core |")
    print(f"| graph bytes per sample (stored, incl. offsets) | {results['graph_bytes_per_sample']} | ≤ 20 000 |")
    print(f"| image bytes per sample (JPEG as published) | {results['image_bytes_per_sample']} | |")


if __name__ == "__main__":
    main()
