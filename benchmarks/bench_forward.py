"""Fusion encoder forward+backward throughput: geolink's vectorised batch vs per-sample Python-loop formulations.

Three formulations of the same computation (same weights, same inputs), timed in one run:

- ``geolink``: the whole batch at once; nodes of all samples packed into a padded tensor with one scatter.
- ``loop-pack``: the official formulation: batched encoders, but nodes packed by a Python loop over samples
  (``nonzero`` per sample, as the official ``pad_node`` does).
- ``per-sample``: a Python loop running the fusion encoder on one sample at a time.

Inputs are the real UFZ samples of the parity fixture (three images with their official graphs, ≤ 48 nodes), cycled
to the batch size. Prints the median step time with its min–max over the interleaved runs. Usage::

    python benchmarks/bench_forward.py [--batch-size 12] [--repeats 7] [--arch geolink_tiny] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import Patched, create_model, describe_run, parity_graphs, spread
from torch_geometric.data import Batch

import geolink.models.fusion as fusion_module


def pack_nodes_loop(tokens: torch.Tensor, pos: torch.Tensor, batch: torch.Tensor, num_graphs: int):
    """The official packing: one Python iteration (and one ``nonzero``) per sample."""
    counts = torch.bincount(batch, minlength=num_graphs)
    max_nodes = max(1, int(counts.max()))
    packed = tokens.new_zeros(num_graphs, max_nodes, tokens.shape[1])
    packed_pos = pos.new_zeros(num_graphs, max_nodes, pos.shape[1])
    for i in range(num_graphs):
        index = (batch == i).nonzero(as_tuple=True)[0]
        packed[i, : len(index)] = tokens[index]
        packed_pos[i, : len(index)] = pos[index]
    padding_mask = torch.arange(max_nodes, device=batch.device).unsqueeze(0) >= counts.unsqueeze(1)
    return packed, packed_pos, padding_mask


def step(fusion, images, graphs, formulation: str) -> None:
    if formulation == "per-sample":
        for i, graph in enumerate(graphs):
            maps = fusion(images[i:i + 1], Batch.from_data_list([graph]))
            sum(m.square().mean() for m in maps).backward()
        return
    if formulation == "loop-pack":
        with Patched(fusion_module, "pack_nodes", pack_nodes_loop):
            maps = fusion(images, Batch.from_data_list(graphs))
    else:
        maps = fusion(images, Batch.from_data_list(graphs))
    sum(m.square().mean() for m in maps).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="geolink_tiny")
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    all_images, graphs = parity_graphs()
    order = [i % 3 for i in range(args.batch_size)]
    images = all_images[order].to(args.device)
    batch_graphs = [graphs[i].to(args.device) for i in order]
    torch.manual_seed(0)
    fusion = create_model(args.arch, text_dim=512, component="fusion").to(args.device).train()

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    print(describe_run())
    print(f"fusion forward+backward, {args.arch}, batch {args.batch_size}, device {args.device}; "
          f"median (min–max) of {args.repeats} interleaved runs")
    formulations = ("geolink", "loop-pack", "per-sample")
    times: dict[str, list[float]] = {f: [] for f in formulations}
    for formulation in formulations:
        step(fusion, images, batch_graphs, formulation)  # warm-up
    for _ in range(args.repeats):  # interleaved, so load changes on the machine hit every formulation alike
        for formulation in formulations:
            fusion.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            step(fusion, images, batch_graphs, formulation)
            sync()
            times[formulation].append(time.perf_counter() - start)
    base = statistics.median(times["geolink"])
    print("| formulation | s/step | samples/s (from the median) | median time relative to geolink |")
    print("|---|---:|---:|---:|")
    for formulation, values in times.items():
        seconds = statistics.median(values)
        print(f"| {formulation} | {spread(values, digits=3)} | {args.batch_size / seconds:.1f} | "
              f"{seconds / base:.2f}× |")


if __name__ == "__main__":
    main()
