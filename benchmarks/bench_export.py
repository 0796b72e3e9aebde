"""Exported encoders on CPU: onnxruntime against eager PyTorch, images/s, in the same run.

For each encoder the file is exported once (``geolink.export.export_model``, ONNX opset 18), then eager PyTorch
(``torch.inference_mode``) and an onnxruntime CPU session (as many intra-op threads as torch uses) run the same
inputs, interleaved, median (min–max) of several runs; the outputs are compared too. Random weights (speed does not
depend on them); the image is a real UFZ sample, the fusion encoder's graphs are the real UFZ graphs, cycled to the
batch size::

    python benchmarks/bench_export.py                 # image: geolink_tiny and ViT-L; fusion: geolink_tiny
    python benchmarks/bench_export.py --quick         # geolink_tiny only, batch 2, 2 runs: checks the script works
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import SHARED, describe_run, spread
from torch_geometric.data import Batch

from geolink.data.folders import OfficialPairFolder
from geolink.export import export_model, pad_graphs
from geolink.registry import create_model


def ufz_inputs(batch: int) -> tuple[torch.Tensor, Batch]:
    folder = OfficialPairFolder(SHARED / "official_examples" / "ufz")
    items = [folder[i % len(folder)] for i in range(batch)]
    return torch.stack([image for image, _ in items]), Batch.from_data_list([graph for _, graph in items])


def measure(name: str, model: torch.nn.Module, component: str, images: torch.Tensor, graphs: Batch,
            runs: int, folder: Path) -> list[str]:
    import onnxruntime as ort

    start = time.perf_counter()
    path = export_model(model, folder, component, "onnx")
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    if component == "image":
        inputs = (images,)

        def eager():
            return [model.forward_features(images)]
    else:
        inputs = (images, *pad_graphs(graphs).as_tuple())

        def eager():
            return model(images, graphs, validate=False)
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    times: dict[str, list[float]] = {"eager PyTorch": [], "onnxruntime": []}
    with torch.inference_mode():
        reference, exported = eager(), session.run(None, feed)  # warm-up
        for _ in range(runs):
            for label, fn in (("eager PyTorch", eager), ("onnxruntime", lambda: session.run(None, feed))):
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
    error = max(float(np.abs(e - r.numpy()).max() / np.abs(r.numpy()).max()) for e, r in zip(exported, reference))
    batch = images.shape[0]
    rows = []
    for label, values in times.items():
        rows.append(f"| {name} | {label} | {batch} | {spread([batch / v for v in values], digits=1)} | "
                    f"{statistics.median(times['eager PyTorch']) / statistics.median(values):.2f}× | "
                    f"{error:.1e} | {export_s:.0f} s |")
    path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--archs", nargs="*", default=["geolink_tiny", "geolink_vit_large_patch16_224"],
                        help="architectures of the image-encoder rows")
    parser.add_argument("--fusion-arch", default="geolink_tiny")
    parser.add_argument("--quick", action="store_true", help="geolink_tiny only, batch 2, 2 runs")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.runs, args.archs = 2, 2, ["geolink_tiny"]

    images, graphs = ufz_inputs(args.batch_size)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.archs:
            torch.manual_seed(0)
            encoder = create_model(arch, component="image").eval()
            rows += measure(f"image encoder, {arch}", encoder, "image", images, graphs, args.runs, Path(folder))
            del encoder
        torch.manual_seed(0)
        fusion = create_model(args.fusion_arch, component="fusion", osm={"text_dim": 512}).eval()
        rows += measure(f"fusion encoder, {args.fusion_arch} (UFZ graphs)", fusion, "fusion", images, graphs,
                        args.runs, Path(folder))
    print(describe_run())
    print(f"CPU inference, 224 × 224, fp32; images/s median (min–max) of {args.runs} interleaved runs; speed-up of "
          "the median vs eager; max |exported − eager| / max |eager| over the outputs; export time")
    print("| encoder | runtime | batch | images/s | vs eager | rel. error | export |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
