"""Pretraining step throughput on CPU at the tiny config: geolink vs the official per-sample-loop formulation.

Both run the same model, weights and inputs (the real UFZ pairs of the parity fixture, cycled to the batch size):

- ``geolink``: node masking and node packing vectorised over the batch.
- ``official-loops``: the official code's formulation of those two stages, a Python loop over the graphs of the
  batch (``randperm`` per graph and type to mask nodes, ``nonzero`` per graph to pack them).

A step is forward (three losses) + backward + AdamW. Median (min–max) of several interleaved runs::

    python benchmarks/bench_train.py [--batch-size 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from bench_forward import pack_nodes_loop
from common import Patched, create_model, describe_run, parity_graphs, spread
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
