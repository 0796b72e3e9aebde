"""Straightforward reference implementation of the official GeoLink graph semantics (tests + benchmark baseline).

Deliberately simple and independent of ``geolink.graph.relations``/``build``: one ``shapely.relate`` call per pair
in nested Python loops, DE-9IM strings matched against the textbook patterns in the official order, one text-model
forward pass per tag occurrence without padding (as the official builder runs it). Geometries are used as given
(single-part, already clipped), like the official builder.
"""

from __future__ import annotations

import math

import numpy as np
import shapely
import torch
from scipy.spatial import Delaunay, QhullError

SELF, TOUCHES, OVERLAPS, COVERS, COVERED_BY = "self", "touches", "overlaps", "covers", "covered_by"


def matches(matrix: str, pattern: str) -> bool:
    """DE-9IM pattern match: ``*`` anything, ``T`` non-empty, ``F`` empty."""
    for cell, want in zip(matrix, pattern, strict=True):
        if want == "T" and cell == "F" or want == "F" and cell != "F":
            return False
    return True


def any_match(matrix: str, patterns: tuple[str, ...]) -> bool:
    return any(matches(matrix, p) for p in patterns)


DISJOINT = ("FF*FF****",)
COVERS_PATTERNS = ("T*****FF*", "*T****FF*", "***T**FF*", "****T*FF*")
COVERED_BY_PATTERNS = ("T*F**F***", "*TF**F***", "**FT*F***", "**F*TF***")


def same_dim(geoms: list) -> list[tuple[int, int, str]]:
    """(src, dst, relation) edges, row-major, for polygon→polygon / line→line."""
    n = len(geoms)
    rel: dict[tuple[int, int], str] = {(i, i): SELF for i in range(n)}
    for i in range(n):
        for j in range(i + 1, n):
            m = shapely.relate(geoms[j], geoms[i])
            if any_match(m, DISJOINT):
                continue
            if m[0] == "F":
                rel[i, j] = rel[j, i] = TOUCHES
            elif any_match(m, COVERS_PATTERNS):  # j covers i
                rel[i, j], rel[j, i] = COVERED_BY, COVERS
            elif any_match(m, COVERED_BY_PATTERNS):  # j covered by i
                rel[i, j], rel[j, i] = COVERS, COVERED_BY
            elif matches(m, "T*T***T**"):
                rel[i, j] = rel[j, i] = OVERLAPS
    return [(i, j, rel[i, j]) for i in range(n) for j in range(n) if (i, j) in rel]


def line_polygon(lines: list, polygons: list) -> tuple[list, list]:
    """line→polygon and polygon→line edges."""
    rel = {}
    for i, line in enumerate(lines):
        for j, polygon in enumerate(polygons):
            m = shapely.relate(line, polygon)
            if any_match(m, DISJOINT):
                continue
            if m[0] == "F":
                rel[i, j] = ("touches", "touches")
            elif any_match(m, COVERED_BY_PATTERNS):
                rel[i, j] = ("covered_by", "covers")
            elif matches(m, "T*T******") or matches(m, "T*****T**"):
                rel[i, j] = ("crosses", "crosses")
    forward = [(i, j, r[0]) for (i, j), r in sorted(rel.items())]
    backward = [(j, i, r[1]) for (i, j), r in sorted(rel.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return forward, backward


def point_other(points: list, others: list) -> tuple[list, list]:
    """point→other (touches/within) and other→point (touches/contains) edges."""
    rel = {}
    for i, point in enumerate(points):
        for j, other in enumerate(others):
            m = shapely.relate(point, other)
            if any_match(m, DISJOINT):
                continue
            if m[0] == "F":
                rel[i, j] = ("touches", "touches")
            elif matches(m, "T*F**F***"):
                rel[i, j] = ("within", "contains")
    forward = [(i, j, r[0]) for (i, j), r in sorted(rel.items())]
    backward = [(j, i, r[1]) for (i, j), r in sorted(rel.items(), key=lambda kv: (kv[0][1], kv[0][0]))]
    return forward, backward


def point_point(points: list, min_points: int = 3) -> list[tuple[int, int, str]]:
    """Delaunay edges (sorted, both directions) then self edges."""
    edges = set()
    if len(points) >= min_points:
        try:
            for a, b, c in Delaunay([p.coords[0] for p in points]).simplices:
                for s, d in ((a, b), (b, c), (a, c)):
                    edges.add((int(s), int(d)))
                    edges.add((int(d), int(s)))
        except QhullError:
            pass
    return [(s, d, "delaunay") for s, d in sorted(edges)] + [(i, i, "self") for i in range(len(points))]


def relations(polygons: list, lines: list, points: list, min_points: int = 3) -> dict:
    """All nine edge types as lists of (src, dst, relation name)."""
    lp, pl = line_polygon(lines, polygons)
    ptl, ltp = point_other(points, lines)
    ptp, ptpo = point_other(points, polygons)
    return {("polygon", "to", "polygon"): same_dim(polygons), ("line", "to", "line"): same_dim(lines),
            ("line", "to", "polygon"): lp, ("polygon", "to", "line"): pl,
            ("point", "to", "line"): ptl, ("line", "to", "point"): ltp,
            ("point", "to", "polygon"): ptp, ("polygon", "to", "point"): ptpo,
            ("point", "to", "point"): point_point(points, min_points)}


def polygon_anchors(polygon) -> list[tuple[float, float]]:
    """Three interior points (deterministic radius (d_min + d_max) / 4, 10 steps back to the centroid,
    point_on_surface fallback) then the centroid, in tile coordinates."""
    center = polygon.centroid
    dist = [center.distance(shapely.Point(x, y)) for x, y in polygon.exterior.coords]
    radius = (min(dist) / 2 + max(dist) / 2) / 2
    out = []
    for k in range(3):
        theta = np.radians(360 / 3 * k)
        for r in np.linspace(radius, 0, 10):
            p = shapely.Point(center.x + r * np.cos(theta), center.y + r * np.sin(theta))
            if polygon.contains(p):
                out.append((p.x, p.y))
                break
        else:
            p = polygon.point_on_surface()
            out.append((p.x, p.y))
    return out + [(center.x, center.y)]


def anchors(kind: str, geom) -> list[tuple[float, float]]:
    if kind == "polygon":
        return polygon_anchors(geom)
    if kind == "line":
        return [geom.centroid.coords[0], geom.coords[0], geom.coords[-1]]
    return [geom.coords[0]]


def normalise(xy: list, bbox) -> np.ndarray:
    west, south, east, north = bbox
    return np.array([[(x - west) / (east - west), 1 - (y - south) / (north - south)] for x, y in xy])


@torch.no_grad()
def tag_embedding(model, tokenizer, text: str) -> np.ndarray:
    """One tag string, unpadded, last hidden state averaged over every token but the first."""
    inputs = tokenizer(text, return_tensors="pt", padding=False, truncation=False)
    hidden = model(**{k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                   ).last_hidden_state
    return hidden[:, 1:].mean(dim=1)[0].numpy()


def node_feature(label: str, model, tokenizer, frequency: dict) -> np.ndarray:
    """Official node feature: log-frequency-weighted mean of per-tag embeddings (plain mean if weights sum to 0)."""
    words = label.split(";")
    embeds = np.array([tag_embedding(model, tokenizer, w) for w in words])
    weights = np.array([math.log(frequency.get(w.split(":")[0], 1)) for w in words]).reshape(-1, 1)
    return (embeds * weights).sum(0) / weights.sum() if weights.sum() != 0 else embeds.mean(0)
