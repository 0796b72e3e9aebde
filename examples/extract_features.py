"""Export global features of a folder of image tiles (optionally fused with their OSM graphs) with the tile ids.

Every image under ``--data`` (recursively; PNG/JPG/TIF/``.npy``) is a tile; its id is its path relative to
``--data`` without suffix (``city/tile_001``). Images are resized to ``--img-size``. Features are the image
encoder's global feature (``--pool avg``: mean of final-normed patch tokens, GeoLink's contrastive pooling;
``token``: the cls token), or, with ``--graph-dir``, the mean over positions of the fusion encoder's fused map (the
image + OSM representation; tile ``<id>``'s graph is ``<graph-dir>/<id>.safetensors``, official layout or geolink
graph files).

Work is done in chunks of ``--chunk-size`` tiles written to ``<output-dir>/parts/``; a rerun skips finished chunks
(resume after an interruption), then everything is merged into ``features.npy`` + ``ids.txt`` (``--format npy``),
``features.safetensors`` (ids in its metadata, ``--format safetensors``) or both, and ``metrics.json`` records the
counts, width and throughput.

Example::

    python examples/extract_features.py --data tiles/ --model geolink_vit_large_patch16_224.neurips2025_unimodal \\
        --output-dir features/ --format both
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch_geometric.data import Batch
from tqdm.auto import tqdm

from geolink.cli import parse_config
from geolink.data.transforms import resize_image
from geolink.errors import ConfigError, DataError, MissingInputError
from geolink.eval.encoders import encode_images, load_encoder
from geolink.finetune import IMAGE_SUFFIXES, list_images, read_image, read_tile_graph, write_metrics
from geolink.runtime import Precision, autocast, normalise, resolve_device, resolve_precision, seed_everything


@dataclass(kw_only=True)
class ExtractConfig:
    """Feature export of a folder of image tiles."""

    data: Path = field(metadata={"help": "folder of image tiles (searched recursively)"})
    model: str = field(default="geolink_tiny.demo", metadata={
        "help": "geolink folder, Hub repo, pretrained tag, architecture name (random weights), or timm:<name>"})
    graph_dir: Path | None = field(default=None, metadata={"help": "graphs per tile: export fused features"})
    graph_vocab: Path | None = field(default=None, metadata={"help": "embedding table for compact geolink graph files"})
    pool: str = field(default="avg", metadata={"help": "image feature pooling: avg, token or default"})
    img_size: int = field(default=224, metadata={"help": "input size"})
    output_dir: Path = field(default=Path("features"), metadata={"help": "output folder"})
    format: str = field(default="both", metadata={"help": "output format: npy, safetensors or both"})
    batch_size: int = field(default=32, metadata={"help": "batch size"})
    chunk_size: int = field(default=4096, metadata={"help": "tiles per resumable part"})
    precision: Precision = field(default=Precision.AUTO, metadata={"help": "autocast precision"})
    device: str = field(default="auto", metadata={"help": "cuda, cpu or auto"})
    seed: int = field(default=0, metadata={"help": "seed (extraction is deterministic in eval mode)"})
    quiet: bool = field(default=False, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        if self.pool not in ("avg", "token", "default") or self.format not in ("npy", "safetensors", "both"):
            raise ConfigError(f"pool must be avg, token or default and format npy, safetensors or both; got "
                              f"{self.pool!r}, {self.format!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the script; returns the exit code."""
    config = parse_config(ExtractConfig, argv, __doc__)
    seed_everything(config.seed)
    out, tiles, size = config.output_dir, sorted(list_images(config.data, recursive=True).items()), config.img_size
    if not tiles:
        raise MissingInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {config.data}")
    device = resolve_device(config.device)
    amp_dtype, multimodal = resolve_precision(config.precision, device), config.graph_dir is not None
    # overrides reach architecture names and timm models only (trained folders and tags have fixed widths)
    timm = config.model.startswith("timm:")
    overrides: dict = {"img_size": config.img_size} if timm else {"image": {"img_size": config.img_size}}
    table = safetensors.torch.load_file(str(config.graph_vocab))["embeddings"] if config.graph_vocab else None
    if multimodal:
        missing = [t for t, _ in tiles if not (config.graph_dir / f"{t}.safetensors").is_file()]
        if missing:
            raise MissingInputError(f"{len(missing)} tiles have no graph in {config.graph_dir} (e.g. {missing[:3]})")
        first = read_tile_graph(config.graph_dir / f"{tiles[0][0]}.safetensors", table)
        overrides["osm"] = {"text_dim": int(first["polygon"].x.shape[1])}
    loaded = load_encoder(config.model, component="fusion" if multimodal else "image", **overrides)
    model = loaded.model.to(device).eval()
    parts = out / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    started, computed = time.time(), 0
    chunks = [tiles[i:i + config.chunk_size] for i in range(0, len(tiles), config.chunk_size)]
    bar = tqdm(total=len(tiles), desc="features", disable=config.quiet)
    for index, chunk in enumerate(chunks):
        part = parts / f"part-{index:05d}.safetensors"
        if part.is_file():
            bar.update(len(chunk))
            continue
        features = []
        for start in range(0, len(chunk), config.batch_size):
            batch = chunk[start:start + config.batch_size]
            images = torch.stack([resize_image(read_image(path), (size, size)) for _, path in batch]).to(device)
            images = normalise(images, loaded.mean, loaded.std)
            with torch.no_grad(), autocast(device, amp_dtype):
                if multimodal:
                    graphs = Batch.from_data_list([read_tile_graph(config.graph_dir / f"{t}.safetensors", table)
                                                   for t, _ in batch])
                    feats = model(images, graphs.to(device))[-1].mean(dim=(2, 3))
                else:
                    feats = encode_images(model, images, config.pool)
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
                raise DataError(f"{part} was written for other tiles (the folder or chunk_size changed); delete "
                                f"{parts} and rerun")
            features.append(handle.get_tensor("features"))
        ids += part_ids
    matrix, kind = torch.cat(features), "fused" if multimodal else f"image/{config.pool}"
    if config.format in ("npy", "both"):
        np.save(out / "features.npy", matrix.numpy())
        (out / "ids.txt").write_text("\n".join(ids) + "\n", encoding="utf-8")
    if config.format in ("safetensors", "both"):
        safetensors.torch.save_file({"features": matrix}, str(out / "features.safetensors"),
                                    metadata={"ids": json.dumps(ids), "model": config.model, "kind": kind})
    write_metrics(out, {"num_tiles": len(ids), "feature_dim": int(matrix.shape[1]), "model": config.model,
                        "kind": kind, "computed_now": computed, "seconds": round(seconds, 2),
                        "tiles_per_second": round(computed / seconds, 2) if computed and seconds > 0 else None,
                        "config": asdict(config)})
    print(f"wrote {len(ids)} × {matrix.shape[1]} features to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
