"""GeoLink pretraining throughput and MFU on one GPU: ViT-L, bf16, synthetic data, one command.

Measures the training step the trainer runs (forward with all three losses, backward, fused AdamW step) on random
images and random contract-valid OSM graphs (~50 nodes per tile, like the paper's data), after warm-up, and reports
samples/s and model FLOPs utilisation (MFU = achieved model FLOP/s ÷ the GPU's dense bf16 peak). Model FLOPs count
the matrix multiplications of the image encoder on the visible 25 % of patches, the MAE decoder on all patches and
the fusion block, times 3 for forward + backward; the OSM encoder (< 1 %) is left out, so MFU is slightly understated.

    python benchmarks/gpu_pretrain.py                    # ViT-L, batch 128, bf16, SDPA, fused AdamW
    python benchmarks/gpu_pretrain.py --compile          # + torch.compile
    python benchmarks/gpu_pretrain.py --arch geolink_tiny --device cpu --batch-size 4 --steps 3 --warmup 1  # smoke

Finishes well under 8 minutes on an H100/H200-class GPU with the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import describe_run, spread
from torch_geometric.data import Batch

import geolink
from geolink.graph.schema import RELATIONS, empty_graph

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def random_graph(text_dim: int, nodes: tuple[int, int, int], edges: int, generator: torch.Generator):
    graph = empty_graph(text_dim)
    counts = dict(zip(("polygon", "line", "point"), nodes))
    for node_type, count in counts.items():
        graph[node_type].x = torch.randn(count, text_dim, generator=generator)
        graph[node_type].pos = torch.rand(count, graph[node_type].pos.shape[1], 2, generator=generator)
    for edge_type, relations in RELATIONS.items():
        src, _, dst = edge_type
        if counts[src] and counts[dst]:
            graph[edge_type].edge_index = torch.stack([torch.randint(counts[src], (edges,), generator=generator),
                                                       torch.randint(counts[dst], (edges,), generator=generator)])
            graph[edge_type].edge_attr = torch.eye(len(relations))[torch.zeros(edges, dtype=torch.long)]
    return graph


def config_value(config: dict, section: str, key: str):
    """``config[section][key]`` of a nested architecture config, or ``config[key]`` of a flat (pre-refactor) one."""
    return config[section][key] if isinstance(config.get(section), dict) else config[key]


def transformer_flops(tokens: int, width: int, depth: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of ``depth`` pre-norm blocks on one sequence: QKV/proj/MLP matmuls + attention scores."""
    matmuls = 2 * tokens * width * width * (4 + 2 * mlp_ratio)
    attention = 2 * 2 * tokens * tokens * width
    return depth * (matmuls + attention)


def model_flops_per_sample(model, nodes: int) -> float:
    image = model.image_encoder
    grid = image.grid_size[0] * image.grid_size[1]
    visible = 1 + int(grid * (1 - model.mask_ratio))
    decoder = model.decoder_embed.out_features
    fusion_dim = model.fusion_encoder.fusion_dim
    forward = (transformer_flops(visible, image.embed_dim, image.depth)
               + 2 * grid * image.patch_size**2 * image.in_chans * image.embed_dim  # patch embedding
               + transformer_flops(1 + grid, decoder, len(model.decoder_blocks))
               + 2 * (1 + grid) * decoder * image.patch_size**2 * image.in_chans  # pixel prediction
               + 2 * 2 * visible * nodes * fusion_dim * 3 + 2 * 4 * (visible + nodes) * fusion_dim**2 * 3)
    return 3 * forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="geolink_vit_large_patch16_224")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak of the device (default: by name)")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    config = geolink.get_model_config(args.arch)
    model = geolink.create_model(args.arch).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    step_model = torch.compile(model) if args.compile else model
    generator = torch.Generator().manual_seed(0)
    text_dim = config_value(config, "osm", "text_dim")
    channels, size = config_value(config, "image", "in_chans"), config_value(config, "image", "img_size")
    graphs = Batch.from_data_list([random_graph(text_dim, (20, 20, 10), 150, generator)
                                   for _ in range(args.batch_size)]).to(device)
    images = torch.randn(args.batch_size, channels, size, size, device=device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
            loss = step_model(images, graphs)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    samples_per_s = args.batch_size / seconds
    flops = model_flops_per_sample(model, nodes=50) * samples_per_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print(describe_run())
    print(f"device {name}, {args.arch}, batch {args.batch_size}, {args.precision}, compile={args.compile}")
    print(f"step {spread(times, 1000, 1)} ms, median (min–max) of {args.steps} steps after {args.warmup} warm-up; "
          f"from the median: {samples_per_s:.1f} samples/s, {flops / 1e9:.1f} model GFLOP/s")
    if peak:
        print(f"MFU {100 * flops / (peak * 1e12):.1f} % of {peak:.0f} TFLOP/s dense bf16")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
