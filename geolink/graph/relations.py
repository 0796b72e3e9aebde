"""Vectorised spatial relations between a tile's objects: the nine edge types of DESIGN §3.

Owns topology only. Candidate pairs come from one ``shapely.STRtree`` query per edge family
(``predicate="intersects"``; within one node type, bounding boxes only, each unordered pair once); each candidate's
DE-9IM matrix comes from one vectorised ``shapely.relate`` call and is classified with array operations in the order
the official builder uses (a pair that does not meet gets no edge). Points are linked by a Delaunay
triangulation. There is no Python loop over pairs.

Every function returns ``(edge_index [2, E] int64, relation [E] int64)`` where ``relation`` indexes the edge type's
vocabulary in :data:`geolink.graph.schema.RELATIONS`; edges are sorted by (src, dst), as the official builder
emits them.
"""

from __future__ import annotations

import numpy as np
import shapely
from scipy.spatial import Delaunay, QhullError

from geolink.graph.schema import RELATIONS

SAME_DIM = RELATIONS[("polygon", "to", "polygon")]
_SELF, _TOUCHES, _OVERLAPS, _COVERS, _COVERED_BY = (SAME_DIM.index(r) for r in
                                                    ("self", "touches", "overlaps", "covers", "covered_by"))
_NONE = -1

# DE-9IM cell positions (row = first geometry Interior/Boundary/Exterior, column = second)
II, IB, IE, BI, BB, BE, EI, EB, EE = range(9)


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((2, 0), dtype=np.int64), np.zeros(0, dtype=np.int64)


def _intersecting_pairs(query: np.ndarray, tree_geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query index, tree index) of every intersecting pair, one STRtree query for all."""
    if len(query) == 0 or len(tree_geoms) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pairs = shapely.STRtree(tree_geoms).query(query, predicate="intersects")
    return pairs[0].astype(np.int64), pairs[1].astype(np.int64)


def _de9im(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[M, 9]`` bool: whether each DE-9IM cell of ``relate(a[m], b[m])`` is non-empty (not ``F``)."""
    if len(a) == 0:
        return np.zeros((0, 9), dtype=bool)
    matrices = shapely.relate(a, b).astype("U9")
    return matrices.view(np.uint32).reshape(len(a), 9) != ord("F")


def _sort_edges(src: np.ndarray, dst: np.ndarray, rel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((dst, src))
    return np.stack([src[order], dst[order]]).astype(np.int64), rel[order].astype(np.int64)


def same_dim_relations(geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """polygon→polygon or line→line edges over ``[self, touches, overlaps, covers, covered_by, equals]``.

    For each intersecting pair ``i < j`` the DE-9IM matrix of ``j`` against ``i`` is classified, in this order:
    interiors disjoint → ``touches``; ``j`` covers ``i`` → (i ``covered_by`` j, j ``covers`` i); ``j`` covered by
    ``i`` → the reverse; interiors meet and each has interior outside the other → ``overlaps`` (so crossing
    lines overlap); anything else → no edge. Identical geometries therefore come out as covers / covered_by (the
    lower index is ``covered_by``), never ``equals``: the official builder's quirk, kept for compatibility.
    Every node also has a ``self`` edge.
    """
    geoms = np.asarray(geoms, dtype=object)
    n = len(geoms)
    if n == 0:
        return _empty()
    qi, tj = shapely.STRtree(geoms).query(geoms)  # bounding boxes only: relate tells the pairs that meet apart
    keep = qi < tj
    i, j = qi[keep].astype(np.int64), tj[keep].astype(np.int64)
    m = _de9im(geoms[j], geoms[i])
    rel_ij = np.full(len(i), _NONE)
    rel_ji = np.full(len(i), _NONE)
    intersects = m[:, II] | m[:, IB] | m[:, BI] | m[:, BB]
    touches = intersects & ~m[:, II]
    j_covers_i = intersects & ~m[:, EI] & ~m[:, EB] & ~touches
    j_covered_by_i = intersects & ~m[:, IE] & ~m[:, BE] & ~touches & ~j_covers_i
    overlaps = m[:, II] & m[:, IE] & m[:, EI] & ~touches & ~j_covers_i & ~j_covered_by_i
    for mask, forward, backward in ((touches, _TOUCHES, _TOUCHES), (j_covers_i, _COVERED_BY, _COVERS),
                                    (j_covered_by_i, _COVERS, _COVERED_BY), (overlaps, _OVERLAPS, _OVERLAPS)):
        rel_ij[mask] = forward
        rel_ji[mask] = backward
    linked = rel_ij != _NONE
    i, j, rel_ij, rel_ji = i[linked], j[linked], rel_ij[linked], rel_ji[linked]
    nodes = np.arange(n)
    src = np.concatenate([nodes, i, j])
    dst = np.concatenate([nodes, j, i])
    rel = np.concatenate([np.full(n, _SELF), rel_ij, rel_ji])
    return _sort_edges(src, dst, rel)


def line_polygon_relations(lines: np.ndarray, polygons: np.ndarray
                           ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """line→polygon ``[touches, crosses, covered_by]`` and polygon→line ``[touches, crosses, covers]`` edges.

    Classification of ``relate(line, polygon)`` for intersecting pairs: interiors disjoint → touches; line covered
    by the polygon → covered_by / covers; interiors meet with some of either outside the other → crosses.
    """
    lines = np.asarray(lines, dtype=object)
    polygons = np.asarray(polygons, dtype=object)
    li, pj = _intersecting_pairs(lines, polygons)
    if len(li) == 0:
        return _empty(), _empty()
    m = _de9im(lines[li], polygons[pj])
    intersects = m[:, II] | m[:, IB] | m[:, BI] | m[:, BB]
    rel = np.full(len(li), _NONE)
    touches = intersects & ~m[:, II]
    covered = intersects & ~touches & ~m[:, IE] & ~m[:, BE]
    crosses = m[:, II] & (m[:, IE] | m[:, EI]) & ~touches & ~covered
    rel[touches], rel[covered], rel[crosses] = 0, 2, 1  # indices in both vocabularies
    linked = rel != _NONE
    li, pj, rel = li[linked], pj[linked], rel[linked]
    return _sort_edges(li, pj, rel), _sort_edges(pj, li, rel)


def point_other_relations(points: np.ndarray, others: np.ndarray
                          ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """point→other ``[touches, within]`` and other→point ``[touches, contains]`` edges (other = line or polygon).

    A point on the other's boundary touches it; a point in its interior is within it.
    """
    points = np.asarray(points, dtype=object)
    others = np.asarray(others, dtype=object)
    pi, oj = _intersecting_pairs(points, others)
    if len(pi) == 0:
        return _empty(), _empty()
    m = _de9im(points[pi], others[oj])
    intersects = m[:, II] | m[:, IB] | m[:, BI] | m[:, BB]
    rel = np.full(len(pi), _NONE)
    touches = intersects & ~m[:, II]
    within = m[:, II] & ~m[:, IE] & ~m[:, BE]
    rel[touches], rel[within] = 0, 1
    linked = rel != _NONE
    pi, oj, rel = pi[linked], oj[linked], rel[linked]
    return _sort_edges(pi, oj, rel), _sort_edges(oj, pi, rel)


def delaunay_relations(xy: np.ndarray, min_points: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """point→point ``[self, delaunay]`` edges: Delaunay triangulation edges in both directions (sorted, unique),
    then one self edge per point (the official order).

    Args:
        xy: ``[N, 2]`` point coordinates (triangulated as given, in the tile CRS, like the official builder).
        min_points: triangulate only when there are at least this many points (the official builder uses 4;
            geolink triangulates any three non-collinear points). Fewer points, or collinear / coincident
            points that admit no triangle, get self edges only.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    n = len(xy)
    if n == 0:
        return _empty()
    pairs = np.zeros((0, 2), dtype=np.int64)
    if n >= max(min_points, 3):
        try:
            simplices = Delaunay(xy).simplices.astype(np.int64)
        except QhullError:  # all points collinear or coincident: no triangle exists
            simplices = np.zeros((0, 3), dtype=np.int64)
        if len(simplices):
            a, b, c = simplices.T
            src = np.concatenate([a, b, a, b, c, c])
            dst = np.concatenate([b, c, c, a, b, a])
            keys = np.unique(src * n + dst)  # sorted by (src, dst), duplicates (shared triangle sides) removed
            pairs = np.stack([keys // n, keys % n], axis=1)
    nodes = np.arange(n)
    edge_index = np.concatenate([pairs.T, np.stack([nodes, nodes])], axis=1).astype(np.int64)
    relation = np.concatenate([np.ones(len(pairs), dtype=np.int64), np.zeros(n, dtype=np.int64)])
    return edge_index, relation


def all_relations(polygons: np.ndarray, lines: np.ndarray, points: np.ndarray, point_xy: np.ndarray | None = None,
                  delaunay_min_points: int = 3) -> dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]]:
    """The nine edge types of a tile (DESIGN §3), each as ``(edge_index, relation)``.

    Args:
        polygons, lines, points: shapely geometry arrays, one node each, in node order.
        point_xy: ``[N_point, 2]`` coordinates of ``points`` (computed when None).
        delaunay_min_points: see :func:`delaunay_relations`.
    """
    if point_xy is None:
        point_xy = shapely.get_coordinates(np.asarray(points, dtype=object)) if len(points) else np.zeros((0, 2))
    line_poly, poly_line = line_polygon_relations(lines, polygons)
    point_line, line_point = point_other_relations(points, lines)
    point_poly, poly_point = point_other_relations(points, polygons)
    return {
        ("polygon", "to", "polygon"): same_dim_relations(polygons),
        ("polygon", "to", "line"): poly_line,
        ("polygon", "to", "point"): poly_point,
        ("line", "to", "polygon"): line_poly,
        ("line", "to", "line"): same_dim_relations(lines),
        ("line", "to", "point"): line_point,
        ("point", "to", "polygon"): point_poly,
        ("point", "to", "line"): point_line,
        ("point", "to", "point"): delaunay_relations(point_xy, delaunay_min_points),
    }
