"""Rasters and their windows: finding the GeoTIFFs of a job, checking each one, the grid of windows over it, and
reading one window as a normalised image with its valid-pixel mask.

A window is ``tile_size`` × ``tile_size`` pixels of the raster's own pixel grid (after the optional resampling to a
ground sample distance). The grid runs row-major from the top-left corner with stride ``tile_size``; where the raster
is not a multiple of the tile size the last row and column are shifted inward to end at the raster edge (they
overlap their neighbour); a raster smaller than one tile gives one window at ``(0, 0)``, padded with invalid pixels.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import torch

from geolink.errors import DataError, InputError, MissingInputError
from geolink.graph.readers import BBox, is_geographic
from geolink.runtime import normalise, require_module

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
"""File endings taken from a folder of images."""
SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "uint32", "int32", "float32", "float64")
"""Pixel types geolink embeds; uint8 is scaled by 1/255, the others by ``scale`` (floats default to 1)."""


# ------------------------------------------------------------------------------------------------------ the grid
def window_offsets(length: int, size: int) -> list[int]:
    """Start offsets of the windows along one axis: ``0, size, 2·size, ...``, the last shifted inward to end at
    ``length`` (one offset 0 when ``length <= size``)."""
    if length <= size:
        return [0]
    count = math.ceil(length / size)
    return [k * size for k in range(count - 1)] + [length - size]


def pixel_to_crs(transform: Any, col: float, row: float) -> tuple[float, float]:
    """The CRS coordinates of pixel corner ``(col, row)`` under the affine ``transform``."""
    return (transform.a * col + transform.b * row + transform.c, transform.d * col + transform.e * row + transform.f)


@dataclass(frozen=True)
class Window:
    """One window of a raster: its top-left pixel ``(row, col)`` and side ``size`` (pixels)."""

    row: int
    col: int
    size: int

    def footprint(self, transform: Any) -> shapely.Polygon:
        """The window's pixel square in the raster CRS (``transform``: the raster's affine transform)."""
        corners = [(self.col, self.row), (self.col + self.size, self.row), (self.col + self.size, self.row + self.size),
                   (self.col, self.row + self.size)]
        return shapely.Polygon([pixel_to_crs(transform, col, row) for col, row in corners])

    def bounds(self, transform: Any) -> BBox:
        """(west, south, east, north) of :meth:`footprint`."""
        return tuple(float(v) for v in shapely.bounds(self.footprint(transform)))


def grid_windows(height: int, width: int, size: int) -> list[Window]:
    """The windows of a ``height`` × ``width`` raster, row-major from the top-left (see the module docstring)."""
    return [Window(row, col, size) for row in window_offsets(height, size) for col in window_offsets(width, size)]


# ------------------------------------------------------------------------------------------------------ rasters
def expand_images(images: Iterable[str | Path]) -> list[Path]:
    """Files of ``images``: files as given, folders by their raster files (sorted), globs by their matches (sorted);
    duplicates dropped, first occurrence kept.

    Raises:
        MissingInputError: a path that does not exist, or a glob or folder that matches no raster.
    """
    found: list[Path] = []
    for item in images:
        text = str(item)
        if any(char in text for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise MissingInputError(f"images: the glob {text!r} matches no file (check the pattern)")
            found += matches
        elif Path(text).is_dir():
            matches = sorted(p for p in Path(text).rglob("*") if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)
            if not matches:
                raise MissingInputError(f"images: the folder {text} holds no raster ({', '.join(RASTER_SUFFIXES)})")
            found += matches
        elif Path(text).is_file():
            found.append(Path(text))
        else:
            raise MissingInputError(f"image {text} not found (check the path)")
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class RasterInfo:
    """What a job needs to know about one raster (picklable: the file is opened again where it is read).

    Attributes:
        path: the file.
        crs: its CRS (``"EPSG:32633"``, or WKT when it has no EPSG code), or the ``crs`` override.
        transform: the affine pixel → CRS transform of the (resampled) pixel grid.
        width, height: pixels of that grid.
        bands: the 1-based band indexes read.
        dtype: the pixel type.
        gsd: the resampling ground sample distance, or None (native grid).
    """

    path: Path
    crs: str
    transform: Any
    width: int
    height: int
    bands: tuple[int, ...]
    dtype: str
    gsd: float | None = None
    crs_override: bool = False

    @property
    def footprint(self) -> shapely.Polygon:
        """The raster's extent in its CRS."""
        corners = [(0, 0), (self.width, 0), (self.width, self.height), (0, self.height)]
        return shapely.Polygon([pixel_to_crs(self.transform, col, row) for col, row in corners])

    def open(self) -> Any:
        """The rasterio dataset to read from: the file, or a ``WarpedVRT`` onto the ``gsd`` grid (also carrying a
        ``crs`` override)."""
        rasterio = require_module("rasterio", "embed", "reading rasters")
        try:
            source = rasterio.open(self.path)
        except rasterio.errors.RasterioIOError as err:
            raise DataError(f"image {self.path} cannot be read as a raster ({' '.join(str(err).split())[:200]})"
                            ) from None
        if self.gsd is None and not self.crs_override:
            return source
        from rasterio.vrt import WarpedVRT

        keywords = {"src_crs": self.crs} if self.crs_override else {}
        return WarpedVRT(source, crs=self.crs, transform=self.transform, width=self.width, height=self.height,
                         resampling=rasterio.enums.Resampling.bilinear, **keywords)


def _crs_text(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()


def inspect_raster(path: str | Path, in_chans: int, bands: Sequence[int] | None = None, crs: str | None = None,
                   gsd: float | None = None) -> RasterInfo:
    """Open ``path`` once and check what embedding it needs: a CRS, ``in_chans`` bands, a supported pixel type.

    Args:
        path: a GeoTIFF / COG (anything rasterio reads).
        in_chans: the bands the model reads.
        bands: 1-based band indexes to read (default: all bands, which must then be ``in_chans``).
        crs: the CRS of a raster that has none (it replaces no existing CRS unless the file has none).
        gsd: resample to this ground sample distance (CRS units, so a projected CRS) before windowing.

    Raises:
        DataError: the file is not a readable raster (corrupt, truncated, not an image).
        InputError: no CRS and no ``crs``, the wrong number of bands, a band index out of range, an unsupported
            pixel type, or ``gsd`` on a raster in degrees.
    """
    rasterio = require_module("rasterio", "embed", "reading rasters")
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"image {path} not found (check the path)")
    try:
        with rasterio.open(path) as source:
            count, dtypes, transform = source.count, source.dtypes, source.transform
            width, height, source_crs = source.width, source.height, source.crs
    except rasterio.errors.RasterioIOError as err:
        raise DataError(f"image {path} cannot be read as a raster ({' '.join(str(err).split())[:200]})") from None
    if source_crs is None and crs is None:
        raise InputError(f"image {path} has no CRS; pass crs (e.g. crs='EPSG:32633') to say which CRS its "
                         "georeferencing is in")
    override = source_crs is None
    crs_text = str(crs) if override else _crs_text(source_crs)
    if override:
        try:
            rasterio.crs.CRS.from_user_input(crs_text)
        except rasterio.errors.CRSError as err:
            raise InputError(f"crs {crs_text!r} is not a CRS rasterio knows ({err})") from None
    if transform.is_identity:
        raise InputError(f"image {path} has no georeferencing (identity transform); georeference it first")
    bands = tuple(int(b) for b in bands) if bands else tuple(range(1, count + 1))
    if any(not 1 <= b <= count for b in bands):
        raise InputError(f"bands {list(bands)} out of range for image {path}, which has {count} band(s) (1-based)")
    if len(bands) != in_chans:
        raise InputError(f"image {path} gives {len(bands)} band(s) but the model reads {in_chans}; pass bands "
                         f"(e.g. bands=(1, 2, 3)) to choose {in_chans}")
    chosen = {dtypes[b - 1] for b in bands}
    if len(chosen) != 1 or next(iter(chosen)) not in SUPPORTED_DTYPES:
        raise InputError(f"image {path} has pixel type {'/'.join(sorted(chosen))}, which geolink does not embed "
                         f"(supported: {', '.join(SUPPORTED_DTYPES)}); convert it first (e.g. gdal_translate -ot "
                         "Float32)")
    if gsd is not None:
        if is_geographic(crs_text) or rasterio.crs.CRS.from_user_input(crs_text).is_geographic:
            raise InputError(f"gsd is in metres but image {path} is in degrees ({crs_text}); reproject it first or "
                             "leave gsd out")
        from affine import Affine

        west, north = transform.c, transform.f
        east, south = pixel_to_crs(transform, width, height)
        width, height = max(1, round((east - west) / gsd)), max(1, round((north - south) / gsd))
        transform = Affine(gsd, 0.0, west, 0.0, -gsd, north)
    return RasterInfo(path, crs_text, transform, width, height, bands, next(iter(chosen)), gsd, override)


# -------------------------------------------------------------------------------------------------- one window
def read_window(source: Any, info: RasterInfo, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``[C, S, S]`` (the raster's dtype, 0 where invalid) and the valid mask ``[S, S]`` of a window;
    pixels outside the raster (a padded window) are invalid, as are nodata, masked and non-finite pixels.

    Args:
        source: ``info.open()``.
    """
    from rasterio.windows import Window as RioWindow

    size = window.size
    data = np.zeros((len(info.bands), size, size), dtype=info.dtype)
    valid = np.zeros((size, size), dtype=bool)
    rows, cols = min(size, info.height - window.row), min(size, info.width - window.col)
    if rows <= 0 or cols <= 0:
        return data, valid
    region = RioWindow(window.col, window.row, cols, rows)
    try:
        pixels = source.read(indexes=list(info.bands), window=region)
        masks = source.read_masks(indexes=list(info.bands), window=region)
    except Exception as err:  # rasterio raises RasterioIOError / CPLE_* errors for damaged blocks
        reason = " ".join(str(err.__cause__ or err).split())[:200]
        raise DataError(f"image {info.path} is damaged: window row={window.row} col={window.col} cannot be read "
                        f"({reason}); pass keep_going to skip what cannot be read") from None
    inside = (masks > 0).all(axis=0)
    if pixels.dtype.kind == "f":
        inside &= np.isfinite(pixels).all(axis=0)
    pixels = np.where(inside[None], pixels, 0).astype(info.dtype, copy=False)
    data[:, :rows, :cols] = pixels
    valid[:rows, :cols] = inside
    return data, valid


def scale_for(dtype: str, scale: float | None, path: Path | None = None) -> float:
    """The divisor that takes ``dtype`` pixels to [0, 1]: 255 for uint8, ``scale`` otherwise (floats: 1 when
    ``scale`` is None).

    Raises:
        InputError: an integer type other than uint8 and no ``scale``.
    """
    if dtype == "uint8":
        return 255.0
    if scale is not None:
        return float(scale)
    if np.dtype(dtype).kind == "f":
        return 1.0
    where = f"image {path} has" if path is not None else "the pixels have"
    raise InputError(f"{where} pixel type {dtype}; pass scale, the value that maps to 1 (e.g. scale=10000 for "
                     "Sentinel-2 L2A reflectance, scale=65535 for full-range uint16)")


def to_model_input(pixels: np.ndarray, scale: float | None, mean: Sequence[float], std: Sequence[float]
                   ) -> torch.Tensor:
    """``[C, S, S]`` pixels → the model's float32 input: uint8 through :func:`geolink.runtime.normalise` (which scales
    by 1/255), other types divided by ``scale`` first (see :func:`scale_for`)."""
    if pixels.dtype == np.uint8:
        return normalise(torch.from_numpy(np.ascontiguousarray(pixels)), mean, std)
    values = torch.from_numpy(pixels.astype(np.float32)) / scale_for(str(pixels.dtype), scale)
    return normalise(values, mean, std)
