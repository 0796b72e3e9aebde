"""``geolink embed --maps DIR``: per raster, a georeferenced GeoTIFF quick-look of patch-level features.

Each window's image-encoder patch tokens (final normed, ``[D, S/p, S/p]``) are placed on the raster's patch grid
(one cell = ``p`` × ``p`` pixels; a window lands on the cell of its top-left corner, the last row and column of
windows on the raster's last cells; later windows overwrite the overlap); the raster's cells are then projected on
their first three principal components, each stretched between its 2nd and 98th percentile to 1..255 (0 = no
window). The GeoTIFF's transform is the raster's scaled by ``p``, in the raster's CRS. The features are held in
memory (float16) until the end of the run: memory grows with the raster's area when maps are asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geolink.embed.windows import RasterInfo


def pca_rgb(features: np.ndarray, filled: np.ndarray, max_samples: int = 20000, seed: int = 0) -> np.ndarray:
    """``[H, W, D]`` features → ``[3, H, W]`` uint8: the first three principal components of the ``filled`` cells,
    stretched 2–98 % to 1..255; 0 where not filled."""
    values = features[filled].astype(np.float32)
    rgb = np.zeros((3, *filled.shape), dtype=np.uint8)
    if len(values) < 3:
        return rgb
    rng = np.random.default_rng(seed)
    sample = values[rng.choice(len(values), min(max_samples, len(values)), replace=False)]
    mean = sample.mean(0)
    _, _, basis = np.linalg.svd(sample - mean, full_matrices=False)
    projected = (values - mean) @ basis[:3].T
    low, high = np.percentile(projected, 2, axis=0), np.percentile(projected, 98, axis=0)
    scaled = np.clip((projected - low) / np.maximum(high - low, 1e-12), 0, 1) * 254 + 1
    for band in range(min(3, scaled.shape[1])):
        rgb[band][filled] = scaled[:, band].round().astype(np.uint8)
    return rgb


class RasterMaps:
    """Collects the patch features of a run's windows, per raster, and writes the quick-looks.

    Args:
        folder: where ``<raster stem>.features.tif`` files go.
        rasters: the job's rasters.
        patch_size: the model's patch size in pixels.
    """

    def __init__(self, folder: Path, rasters: Sequence[RasterInfo], patch_size: int) -> None:
        self.folder, self.rasters, self.patch = Path(folder), list(rasters), int(patch_size)
        self.features: dict[int, np.ndarray] = {}
        self.filled: dict[int, np.ndarray] = {}

    def add(self, meta: dict[str, Any], patch_map: np.ndarray) -> None:
        """Place one window's ``[D, g, g]`` patch map."""
        k = int(meta["raster"])
        info = self.rasters[k]
        rows, cols = math.ceil(info.height / self.patch), math.ceil(info.width / self.patch)
        if k not in self.features:
            self.features[k] = np.zeros((rows, cols, patch_map.shape[0]), dtype=np.float16)
            self.filled[k] = np.zeros((rows, cols), dtype=bool)
        size = patch_map.shape[1] * self.patch
        # a window ending at the raster's edge is aligned to the edge's cell, the others to the cell of their corner
        row, col = int(meta["row"]), int(meta["col"])
        top = max(0, rows - patch_map.shape[1]) if row + size >= info.height else row // self.patch
        left = max(0, cols - patch_map.shape[2]) if col + size >= info.width else col // self.patch
        grid = patch_map.transpose(1, 2, 0)[: rows - top, : cols - left]
        self.features[k][top:top + grid.shape[0], left:left + grid.shape[1]] = grid
        self.filled[k][top:top + grid.shape[0], left:left + grid.shape[1]] = True

    def write(self) -> list[str]:
        """Write one 3-band uint8 GeoTIFF per raster that got windows; returns the paths."""
        import rasterio
        from affine import Affine

        self.folder.mkdir(parents=True, exist_ok=True)
        written = []
        for k, features in self.features.items():
            info = self.rasters[k]
            rgb = pca_rgb(features, self.filled[k])
            path = self.folder / f"{info.path.stem}.features.tif"
            t = info.transform
            transform = Affine(t.a * self.patch, t.b * self.patch, t.c, t.d * self.patch, t.e * self.patch, t.f)
            with rasterio.open(path, "w", driver="GTiff", width=rgb.shape[2], height=rgb.shape[1], count=3,
                               dtype="uint8", crs=info.crs, transform=transform, nodata=0) as dataset:
                dataset.write(rgb)
            written.append(str(path))
        return written
