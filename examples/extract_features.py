"""Export global features of a folder of image tiles (optionally fused with their OSM graphs) with the tile ids.

Every image under ``--data`` (recursively; PNG/JPG/TIF/``.npy``) is a tile; its id is its path relative to
``--data`` without suffix (``city/tile_001``). Images are resized to ``--img-size``. Features are

- image only: the encoder's global feature (``--pool avg``: mean of final-normed patch tokens, GeoLink's
  contrastive pooling; ``token``: the cls token);
- with ``--graph-dir``: the mean over positions of the fused map of the fusion encoder (``fusion_dim`` wide), the
  image + OSM representation; the graph of tile ``<id>`` is ``<graph-dir>/<id>.safetensors`` (official layout or
  geolink graph files, see ``finetune_multimodal_segmentation.py``).

Work is done in chunks of ``--chunk-size`` tiles written to ``<output-dir>/parts/``; a rerun skips finished chunks
(resume after an interruption), then everything is merged into ``features.npy`` + ``ids.txt`` (``--format npy``),
``features.safetensors`` (ids in its metadata, ``--format safetensors``) or both, and ``metrics.json`` records the
counts, width and throughput.

Example::

    python examples/extract_features.py --data tiles/ --model geolink_vit_large_patch16_224.neurips2025_unimodal \\
        --output-dir features/ --format both
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_utils import IMAGE_SUFFIXES, read_image, seed_everything, write_metrics  # noqa: E402

from geolink.eval.encoders import default_device, load_encoder, normalise, resolve_precision  # noqa: E402


def list_tiles(root: Path) -> list[tuple[str, Path]]:
    """``(tile id, path)`` of every image under ``root``, sorted by id."""
    if not root.is_dir():
        raise FileNotFoundError(f"no folder {root}")
    tiles = sorted((p.relative_to(root).with_suffix("").as_posix(), p) for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not tiles:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return tiles


def load_batch(tiles: Sequence[tuple[str, Path]], size: int) -> torch.Tensor:
    """``[B, C, size, size]`` images in ``[0, 1]`` (bilinear resize when needed)."""
    images = []
    for _, path in tiles:
        image = read_image(path)
        if image.shape[-2:] != (size, size):
            image = F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False)[0]
        images.append(image)
    return torch.stack(images)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder of image tiles (searched recursively)")
    parser.add_argument("--model", default="geolink_vit_large_patch16_224.neurips2025_unimodal",
                        help="geolink folder, Hub repo, pretrained tag, architecture name (random weights), or "
                             "timm:<name>; default %(default)s")
    parser.add_argument("--graph-dir", default=None, help="graphs per tile: export fused image + OSM features")
    parser.add_argument("--graph-vocab", default=None, help="embedding table for compact geolink graph files")
    parser.add_argument("--pool", choices=["avg", "token", "default"], default="avg",
                        help="image feature pooling (default avg)")
    parser.add_argument("--img-size", type=int, default=224, help="input size (default %(default)s)")
    parser.add_argument("--output-dir", default="features", help="output folder (default %(default)s)")
    parser.add_argument("--format", choices=["npy", "safetensors", "both"], default="both",
                        help="output format (default both)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="tiles per resumable part (default %(default)s)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="autocast precision (default auto)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="seed (extraction is deterministic in eval mode)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code."""
    args = build_parser().parse_args(argv)
    seed_everything(args.seed)
    root, out = Path(args.data), Path(args.output_dir)
    tiles = list_tiles(root)
    device = torch.device(args.device) if args.device else default_device()
    amp_dtype = resolve_precision(args.precision, device)
    multimodal = args.graph_dir is not None
    # constructor overrides only reach architecture names / config JSONs / timm models (load_encoder ignores them
    # for trained folders and tags, whose widths are fixed)
    overrides: dict = {"img_size": args.img_size}
    table = None
    if multimodal:
        from finetune_multimodal_segmentation import load_tile_graph
        from torch_geometric.data import Batch

        if args.graph_vocab:
            table = safetensors.torch.load_file(args.graph_vocab)["embeddings"]
        graph_path = lambda tile_id: Path(args.graph_dir) / f"{tile_id}.safetensors"  # noqa: E731
        missing = [t for t, _ in tiles if not graph_path(t).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} tiles have no graph in {args.graph_dir} (e.g. {missing[:3]})")
        first = load_tile_graph(graph_path(tiles[0][0]), table)
        overrides["text_dim"] = int(first["polygon"].x.shape[1])
    loaded = load_encoder(args.model, component="fusion" if multimodal else "image", **overrides)
    model = loaded.model.to(device).eval()
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    started, computed = time.time(), 0
    chunks = [tiles[i:i + args.chunk_size] for i in range(0, len(tiles), args.chunk_size)]
    bar = tqdm(total=len(tiles), desc="features", disable=args.quiet)
    for index, chunk in enumerate(chunks):
        part = parts / f"part-{index:05d}.safetensors"
        if part.is_file():
            bar.update(len(chunk))
            continue
        features = []
        for start in range(0, len(chunk), args.batch_size):
            batch = chunk[start:start + args.batch_size]
            images = normalise(load_batch(batch, args.img_size).to(device), loaded.mean, loaded.std)
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                                 enabled=amp_dtype is not None):
                if multimodal:
                    graphs = Batch.from_data_list([load_tile_graph(graph_path(t), table) for t, _ in batch])
                    feats = model(images, graphs.to(device))[-1].mean(dim=(2, 3))
                else:
                    from geolink.eval.encoders import encode_images

                    feats = encode_images(model, images, args.pool)
            features.append(feats.float().cpu())
            bar.update(len(batch))
        computed += len(chunk)
        tmp = part.with_name(part.name + ".tmp")
        safetensors.torch.save_file({"features": torch.cat(features).contiguous()}, str(tmp),
                                    metadata={"ids": json.dumps([t for t, _ in chunk])})
        tmp.replace(part)
    bar.close()
    seconds = time.time() - started
    features, ids = [], []
    for index in range(len(chunks)):
        part = parts / f"part-{index:05d}.safetensors"
        with safetensors.safe_open(str(part), framework="pt") as handle:
            part_ids = json.loads(handle.metadata()["ids"])
            if part_ids != [t for t, _ in chunks[index]]:
                raise RuntimeError(f"{part} was written for other tiles (the folder or --chunk-size changed); "
                                   f"delete {parts} and rerun")
            features.append(handle.get_tensor("features"))
        ids += part_ids
    matrix = torch.cat(features)
    if args.format in ("npy", "both"):
        np.save(out / "features.npy", matrix.numpy())
        (out / "ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    if args.format in ("safetensors", "both"):
        safetensors.torch.save_file({"features": matrix}, str(out / "features.safetensors"),
                                    metadata={"ids": json.dumps(ids), "model": args.model,
                                              "kind": "fused" if multimodal else f"image/{args.pool}"})
    write_metrics(out, {"num_tiles": len(ids), "feature_dim": int(matrix.shape[1]), "model": args.model,
                        "kind": "fused" if multimodal else f"image/{args.pool}", "computed_now": computed,
                        "seconds": round(seconds, 2),
                        "tiles_per_second": round(computed / seconds, 2) if computed and seconds > 0 else None,
                        "args": vars(args)})
    print(f"wrote {len(ids)} × {matrix.shape[1]} features to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
