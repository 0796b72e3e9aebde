"""Pretraining step throughput on CPU at the tiny config: geolink vs the official per-sample-loop formulation.

Both run the same model, weights and inputs (the real UFZ pairs of the parity fixture, cycled to the batch size):

- ``geolink``: node masking and node packing vectorised over the batch.
- ``official-loops``: the official code's formulation of those two stages, a Python loop over the graphs of the
  batch (``randperm`` per graph and type to mask nodes, ``nonzero`` per graph to pack them).

A step is forward (three losses) + backward + AdamW. Median (min–max) of several interleaved runs::

    python benchmarks/bench_train.py [--batch-size 16] [--repeats 5]

``--baseline TREE`` adds the whole training loop (``geolink.train.trainer.train`` on the bundled pairs, CPU, data
loading, logging and checkpointing included) of another geolink tree against this checkout, in fresh processes,
alternating, each process timing the interval between consecutive optimizer steps after two warm-up steps::

    git worktree add /tmp/geolink_main 4d1738e
    python benchmarks/bench_train.py --baseline /tmp/geolink_main [--loop-steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_forward import pack_nodes_loop
from common import REPO, Patched, create_model, describe_run, parity_graphs, spread
from torch_geometric.data import Batch

import geolink.models.pretrain as pretrain_module
from geolink.graph.schema import NODE_TYPES


def mask_nodes_loop(self, graph, batch_dict, sample_seeds=None):
    """The official masking: for every type and every graph, a ``randperm`` of its nodes."""
    x_dict, node_mask = {}, {}
    for node_type in NODE_TYPES:
        x, batch = graph[node_type].x, batch_dict[node_type]
        masked = torch.zeros(x.shape[0], dtype=torch.bool)
        counts = torch.bincount(batch, minlength=int(getattr(graph, "num_graphs", 1)))
        start = 0
        for count in counts.tolist():
            if count:
                chosen = torch.randperm(count)[: max(1, min(count, round(count * self.node_mask_ratio)))]
                masked[start + chosen] = True
            start += count
        x_dict[node_type] = torch.where(masked.unsqueeze(1), self.node_mask_token[node_type], x)
        node_mask[node_type] = masked
    return x_dict, node_mask


def loop_child(steps: int, batch: int, out: Path) -> None:
    """In a fresh process: run the trainer of the imported tree, print the seconds between optimizer steps."""
    from geolink.train import TrainConfig
    from geolink.train.trainer import train

    stamps: list[float] = []
    real_step = torch.optim.AdamW.step

    def timed_step(self, *args, **kwargs):
        stamps.append(time.perf_counter())
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = timed_step
    train(TrainConfig(data="bundled", out=out, max_steps=steps, batch_size=batch, warmup_steps=1, save_every=steps,
                      device="cpu", seed=0))
    print(json.dumps([b - a for a, b in zip(stamps[2:], stamps[3:])]))


def loop_times(tree: Path, steps: int, batch: int) -> list[float]:
    """Seconds per training-loop step of the geolink in ``tree`` (a fresh process, PYTHONPATH=tree)."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        result = subprocess.run([sys.executable, __file__, "--loop-child", "--loop-steps", str(steps),
                                 "--batch-size", str(batch), "--loop-out", out], capture_output=True, text=True,
                                env=env, check=False)
    if result.returncode:
        raise RuntimeError(f"training loop of {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare_loops(baseline: Path, steps: int, batch: int, repeats: int) -> None:
    trees = {f"baseline {baseline}": baseline, f"this checkout {REPO}": REPO}
    times: dict[str, list[float]] = {label: [] for label in trees}
    for _ in range(repeats):
        for label, tree in trees.items():
            times[label] += loop_times(tree, steps, batch)
    print(f"training loop (geolink.train.trainer.train), geolink_tiny, bundled pairs, batch {batch}, CPU; seconds "
          f"between optimizer steps, median (min–max) over {repeats} alternating processes × {steps - 3} steps")
    print("| tree | s/step | samples/s (from the median) |")
    print("|---|---:|---:|")
    for label, values in times.items():
        print(f"| {label} | {spread(values, digits=3)} | {batch / statistics.median(values):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", type=Path, default=None, help="also time the training loop of this tree")
    parser.add_argument("--loop-steps", type=int, default=8, help="steps per training-loop process (>= 4)")
    parser.add_argument("--loop-only", action="store_true", help="only the training-loop comparison")
    parser.add_argument("--loop-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loop-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop_child:
        loop_child(args.loop_steps, args.batch_size, args.loop_out)
        return
    if args.loop_only:
        print(describe_run())
        compare_loops(args.baseline, args.loop_steps, args.batch_size, args.repeats)
        return

    all_images, graphs = parity_graphs()
    order = [i % 3 for i in range(args.batch_size)]
    images, batch = all_images[order], Batch.from_data_list([graphs[i] for i in order])
    torch.manual_seed(0)
    model = create_model("geolink_tiny", text_dim=512).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(formulation: str) -> float:
        with contextlib.ExitStack() as patches:
            if formulation == "official-loops":
                patches.enter_context(Patched(pretrain_module.GeoLinkForPretraining, "mask_nodes", mask_nodes_loop))
                patches.enter_context(Patched(pretrain_module, "pack_nodes", pack_nodes_loop))
            start = time.perf_counter()
            model(images, batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return time.perf_counter() - start

    formulations = ("geolink", "official-loops")
    times: dict[str, list[float]] = {f: [] for f in formulations}
    for formulation in formulations:
        step(formulation)  # warm-up
    for _ in range(args.repeats):
        for formulation in formulations:
            times[formulation].append(step(formulation))
    print(describe_run())
    print(f"pretraining step (forward + backward + AdamW), geolink_tiny (text_dim 512), batch {args.batch_size}, "
          f"CPU; median (min–max) of {args.repeats} interleaved runs")
    print("| formulation | s/step | samples/s (from the median) |")
    print("|---|---:|---:|")
    for formulation, values in times.items():
        print(f"| {formulation} | {spread(values, digits=3)} | {args.batch_size / statistics.median(values):.1f} |")
    if args.baseline:
        compare_loops(args.baseline, args.loop_steps, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
