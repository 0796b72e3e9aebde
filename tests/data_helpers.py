"""Synthetic pairs for the data tests: real builder graphs over random features, real JPEG/PNG bytes."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import shapely
import torch
from PIL import Image

from geolink.graph.build import OSMGraphBuilder

BBOX = (10.0, 50.0, 10.01, 50.01)
TAGS = ["building=yes", "landuse=residential", "highway=residential", "amenity=bench", "natural=tree",
        "shop=bakery", "leisure=park", "waterway=stream"]


class HashEncoder:
    """A deterministic stand-in text model: each tag string gets a fixed pseudo-random vector (no model files)."""

    dim = 16

    def encode(self, strings):
        rows = [np.frombuffer(hashlib.sha256(s.encode()).digest()[:16], dtype=np.uint8) / 255.0 for s in strings]
        return torch.tensor(np.stack(rows) if rows else np.zeros((0, self.dim)), dtype=torch.float32)

    def embedding_table(self, vocabulary):
        return self.encode(getattr(vocabulary, "strings", vocabulary))

    def info(self):
        return {"model_id": "hash-encoder", "dim": self.dim, "pooling": "official"}


def random_features(seed: int, n: int = 24) -> list:
    """``n`` random polygons, lines and points inside (and overlapping) :data:`BBOX`, with OSM tag dicts."""
    rng = np.random.default_rng(seed)
    west, south, east, north = BBOX
    span = np.array([east - west, north - south])
    features = []
    for k in range(n):
        kind = k % 3
        base = np.array([west, south]) + rng.uniform(-0.05, 1.0, 2) * span
        if kind == 0:
            size = rng.uniform(0.05, 0.3, 2) * span
            geom = shapely.box(*base, *(base + size))
        elif kind == 1:
            steps = rng.uniform(-0.3, 0.4, (2, 2)) * span
            geom = shapely.LineString([base, base + steps[0], base + steps[1]])
        else:
            geom = shapely.Point(*base)
        key, value = TAGS[rng.integers(len(TAGS))].split("=")
        tags = {key: value}
        if rng.random() < 0.5:
            key2, value2 = TAGS[rng.integers(len(TAGS))].split("=")
            tags[key2] = value2
        features.append((geom, tags))
    return features


def image_bytes(seed: int, size: tuple[int, int] = (96, 80), fmt: str = "JPEG") -> bytes:
    """A real encoded image (JPEG or PNG) of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def build_graph(seed: int, vocabulary, n: int = 24):
    """A compact DESIGN §3 graph of :func:`random_features` with ids into ``vocabulary``."""
    return OSMGraphBuilder(None, tag_weights="official").build(random_features(seed, n), BBOX, vocabulary=vocabulary,
                                                               materialize=False)


def write_dataset(root, count: int, per_shard: int, start: int = 0, encoder=None):
    """Write pairs ``start .. start + count - 1`` (names ``tile_<k>``, JPEG and PNG alternating); returns
    ``{name: (image bytes, graph)}``."""
    from geolink.data.shards import PairShardWriter

    writer = PairShardWriter(root, tag_encoder=encoder or HashEncoder(), samples_per_shard=per_shard)
    written = {}
    for k in range(start, start + count):
        data = image_bytes(k, (64 + 8 * k, 48 + 4 * k), "JPEG" if k % 2 == 0 else "PNG")
        graph = build_graph(k, writer.vocabulary)
        writer.add(f"tile_{k}", data, graph)
        written[f"tile_{k}"] = (data, graph)
    writer.close()
    return written
