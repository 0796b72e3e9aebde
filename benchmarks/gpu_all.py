"""Every GPU figure of GeoLink in one run (under 8 minutes on one H200): one JSON and one Markdown table.

Sections (random weights, synthetic inputs shaped like the paper's data: 224 × 224 tiles, ~50 OSM nodes per tile):

1. ViT-L pretraining step (forward with the three losses, backward, fused AdamW), bf16, eager and
   ``torch.compile``: samples/s and MFU (model FLOPs as in ``gpu_pretrain.py`` ÷ the GPU's dense bf16 peak).
2. ViT-L image-encoder inference (``forward_features``), batch 256, bf16, eager and compiled: images/s.
3. Fusion-encoder inference (image encoder + OSM encoder + two-way block), bf16: images/s.
4. Tag embedding through the public ``TagEncoder`` API (MiniLM, fp32 and bf16): strings/s, cold cache.

Each figure is the median (min–max) over timed repeats after warm-up, with CUDA synchronised around each repeat::

    benchmarks/gpu_all.sh                       # on a GPU machine: writes gpu_all.json and gpu_all.md under --out
    python benchmarks/gpu_all.py --smoke        # CPU, tiny config, seconds: checks that every section runs

Without CUDA and without ``--smoke`` it stops with a message (exit 2) instead of measuring a CPU by mistake.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import describe_run
from gpu_pretrain import PEAK_BF16_TFLOPS, config_value, model_flops_per_sample, random_graph
from torch_geometric.data import Batch

import geolink
from geolink.graph.text import TagEncoder
from geolink.train.trainer import make_optimizer

FULL = {"arch": "geolink_vit_large_patch16_224", "train_batch": 128, "infer_batch": 256, "fusion_batch": 64,
        "warmup": 5, "repeats": 10, "strings": 20000, "tag_batch": 512}
SMOKE = {"arch": "geolink_tiny", "train_batch": 2, "infer_batch": 2, "fusion_batch": 2, "warmup": 1, "repeats": 2,
         "strings": 64, "tag_batch": 32}


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls, the device synchronised around each."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float], items: int) -> dict[str, float]:
    """Items/s from the median time, and from the slowest and fastest repeats."""
    return {"per_s": items / statistics.median(times), "per_s_min": items / max(times),
            "per_s_max": items / min(times), "median_s": statistics.median(times), "repeats": len(times)}


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def graphs_for(text_dim: int, batch: int, device: torch.device) -> Batch:
    generator = torch.Generator().manual_seed(0)
    return Batch.from_data_list([random_graph(text_dim, (20, 20, 10), 150, generator)
                                 for _ in range(batch)]).to(device)


def pretraining(settings: dict, device: torch.device, bf16: bool, compile: bool, peak: float | None) -> dict:
    torch.manual_seed(0)
    config = geolink.get_model_config(settings["arch"])
    model = geolink.create_model(settings["arch"]).to(device).train()
    optimizer = make_optimizer(model, 0.05)
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    step_model = torch.compile(model) if compile else model
    batch = settings["train_batch"]
    size = config_value(config, "image", "img_size")
    images = torch.randn(batch, config_value(config, "image", "in_chans"), size, size, device=device)
    graphs = graphs_for(config_value(config, "osm", "text_dim"), batch, device)
    seeds = torch.arange(batch, device=device)

    def step() -> None:
        with autocast(device, bf16):
            loss = step_model(images, graphs, sample_seeds=seeds, validate=False)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = summary(timed(step, settings["warmup"], settings["repeats"], device), batch)
    flops = model_flops_per_sample(model, nodes=50) * result["per_s"]
    result["model_tflops"] = flops / 1e12
    result["mfu"] = flops / (peak * 1e12) if peak else None
    return result


def image_inference(settings: dict, device: torch.device, bf16: bool, compile: bool) -> dict:
    torch.manual_seed(0)
    encoder = geolink.create_model(settings["arch"], component="image").to(device).eval()
    run = torch.compile(encoder.forward_features) if compile else encoder.forward_features
    size = encoder.grid_size[0] * encoder.patch_size
    images = torch.randn(settings["infer_batch"], encoder.in_chans, size, size, device=device)

    def infer() -> None:
        with torch.inference_mode(), autocast(device, bf16):
            run(images)

    return summary(timed(infer, settings["warmup"], settings["repeats"], device), settings["infer_batch"])


def fusion_inference(settings: dict, device: torch.device, bf16: bool) -> dict:
    torch.manual_seed(0)
    fusion = geolink.create_model(settings["arch"], component="fusion").to(device).eval()
    image = fusion.image_encoder
    size = image.grid_size[0] * image.patch_size
    batch = settings["fusion_batch"]
    images = torch.randn(batch, image.in_chans, size, size, device=device)
    graphs = graphs_for(fusion.osm_encoder.text_dim, batch, device)

    def infer() -> None:
        with torch.inference_mode(), autocast(device, bf16):
            fusion(images, graphs, validate=False)

    return summary(timed(infer, settings["warmup"], settings["repeats"], device), batch)


def tag_strings(count: int, salt: int) -> list[str]:
    """Distinct OSM-like tag strings (a new set per call: the encoder's cache stays cold)."""
    kinds = ["building=yes", "highway=residential", "amenity=restaurant", "landuse=grass", "shop=supermarket",
             "natural=tree", "leisure=park", "railway=rail", "waterway=stream", "building=apartments"]
    return [f"{kinds[i % len(kinds)]}; name=Place {salt}-{i}; addr:street=Street {i % 97}; "
            f"height={i % 40}; levels={i % 9}" for i in range(count)]


def tag_embedding(settings: dict, device: torch.device, dtype: torch.dtype) -> dict:
    encoder = TagEncoder("minilm", device=str(device), batch_size=settings["tag_batch"], dtype=dtype)
    calls = iter(range(10**6))

    def embed() -> None:
        encoder.encode(tag_strings(settings["strings"], next(calls)))

    return summary(timed(embed, 1, max(2, settings["repeats"] // 3), device), settings["strings"])


def markdown(results: dict) -> str:
    lines = [f"GeoLink GPU benchmarks: {results['device']}, {results['arch']}, torch {results['torch']}",
             "", "| measurement | setting | throughput, median (min–max) | MFU |", "|---|---|---:|---:|"]
    for row in results["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['name']} | {row['setting']} | skipped: {row['skipped']} | |")
            continue
        mfu = f"{100 * row['mfu']:.1f} %" if row.get("mfu") is not None else ""
        lines.append(f"| {row['name']} | {row['setting']} | {row['per_s']:.1f} ({row['per_s_min']:.1f}–"
                     f"{row['per_s_max']:.1f}) {row['unit']} | {mfu} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, seconds (checks every section runs)")
    parser.add_argument("--out", type=Path, default=Path("gpu_all_results"), help="folder for gpu_all.json/.md")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (CUDA when available)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: by GPU name)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pretrain", "compile", "image", "fusion", "tags"])
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if args.device == "auto" and cuda else "cpu" if args.device == "auto"
                          else args.device)
    if device.type != "cuda" and not args.smoke:
        print("gpu_all.py measures a GPU, and no CUDA device is available (or --device cpu was given); run it on a "
              "GPU machine, or pass --smoke for the quick CPU check of every section", file=sys.stderr)
        return 2
    settings = SMOKE if args.smoke else FULL
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    bf16 = device.type == "cuda" or not args.smoke  # the smoke run stays in fp32 on CPUs without bf16 matmuls
    precision = "bf16" if bf16 else "fp32"
    results = {"device": name, "arch": settings["arch"], "torch": torch.__version__, "smoke": args.smoke,
               "run": describe_run(), "peak_bf16_tflops": peak, "settings": settings, "rows": []}
    started = time.perf_counter()

    def add(name: str, setting: str, unit: str, measure: Callable[[], dict], skip: str | None = None) -> None:
        row = {"name": name, "setting": setting, "unit": unit}
        if skip:
            row["skipped"] = skip
        else:
            row.update(measure())
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
        results["rows"].append(row)
        value = row.get("skipped") or f"{row['per_s']:.1f} {unit}"
        print(f"[{time.perf_counter() - started:6.1f} s] {name}, {setting}: {value}", flush=True)

    no_compile = "smoke run (compilation takes minutes)" if args.smoke else "--skip compile" \
        if "compile" in args.skip else None
    train, infer = f"batch {settings['train_batch']}, {precision}", f"batch {settings['infer_batch']}, {precision}"
    if "pretrain" not in args.skip:
        add("pretraining step", f"{train}, eager", "samples/s",
            lambda: pretraining(settings, device, bf16, False, peak))
        add("pretraining step", f"{train}, compiled", "samples/s",
            lambda: pretraining(settings, device, bf16, True, peak), no_compile)
    if "image" not in args.skip:
        add("image encoder inference", f"{infer}, eager", "images/s",
            lambda: image_inference(settings, device, bf16, False))
        add("image encoder inference", f"{infer}, compiled", "images/s",
            lambda: image_inference(settings, device, bf16, True), no_compile)
    if "fusion" not in args.skip:
        add("fusion encoder inference", f"batch {settings['fusion_batch']}, {precision}, ~50 nodes", "images/s",
            lambda: fusion_inference(settings, device, bf16))
    if "tags" not in args.skip:
        for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            add("tag embedding (TagEncoder, MiniLM)", f"{settings['strings']} strings, {label}, cold cache",
                "strings/s", lambda dtype=dtype: tag_embedding(settings, device, dtype),
                "smoke run" if args.smoke and dtype == torch.bfloat16 else None)
    results["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_all.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gpu_all.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {args.out / 'gpu_all.json'} and {args.out / 'gpu_all.md'} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
