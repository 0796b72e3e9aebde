"""Retrieval in the shared image-OSM space: exact chunked top-k, indexes (pairs, Parquet), recall@k, the job."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from geolink.retrieval import EmbeddingIndex, open_pairs, recall_at_k, topk_cosine


def test_chunked_topk_equals_a_full_sort():
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(7, 16, generator=generator), torch.randn(103, 16, generator=generator)
    scores, indices = topk_cosine(queries, keys, k=9, chunk=10)
    full = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(keys, dim=1).t()
    expected = torch.topk(full, 9, dim=1)
    torch.testing.assert_close(scores, expected.values)
    assert torch.equal(indices, expected.indices)
    assert topk_cosine(queries, keys[:3], k=9)[1].shape == (7, 3)  # k capped at the index size
    with pytest.raises(ValueError, match="16-wide but the index holds 8-wide"):
        topk_cosine(queries, keys[:, :8])
    with pytest.raises(ValueError, match="index is empty"):
        topk_cosine(queries, keys[:0])


def test_recall_at_k_counts_partners_against_chance():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(20, 8, generator=generator)
    perfect = recall_at_k(images, images + 0.01 * torch.randn(20, 8, generator=generator), ks=(1, 5))
    assert perfect["image_to_osm"] == {1: 1.0, 5: 1.0} and perfect["chance"] == {1: 0.05, 5: 0.25}
    shifted = recall_at_k(images, images.roll(1, dims=0), ks=(1,))  # every partner is someone else's match
    assert shifted["image_to_osm"][1] == 0.0 and shifted["osm_to_image"][1] == 0.0
    with pytest.raises(ValueError, match="recall needs pairs"):
        recall_at_k(images, images[:3])


def test_parquet_index_reads_the_embedding_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    pq.write_table(pa.table({"name": ["a", "b", "c", "d"], "embedding": rows.tolist()}), tmp_path / "e.parquet")
    index = EmbeddingIndex.from_parquet(tmp_path / "e.parquet", "osm")
    assert index.names == ["a", "b", "c", "d"] and torch.allclose(index.embeddings.norm(dim=1), torch.ones(4))
    hits = index.search(rows[2:3] * 3.0, k=2)[0]
    assert hits[0][:2] == (2, "c") and hits[0][2] == pytest.approx(1.0, abs=1e-6)
    pq.write_table(pa.table({"vector": rows.tolist()}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no 'embedding' column"):
        EmbeddingIndex.from_parquet(tmp_path / "bad.parquet", "osm")


@torch.no_grad()
def test_ufz_pairs_index_with_the_converted_official_model(shared):
    from geolink.convert import load_official_checkpoint
    from geolink.retrieval import pair_indexes

    model = load_official_checkpoint(shared("parity", "official_tiny") / "geolink_multimodal_official_format.pth")
    images, graphs = pair_indexes(model.eval(), shared("official_examples", "ufz"))
    assert len(images) == len(graphs) == 6 and images.names == graphs.names
    assert images.embeddings.shape == (6, 64)
    names, pixels, _ = open_pairs(shared("official_examples", "ufz"))
    torch.testing.assert_close(images.embeddings[0], model.encode_image(pixels[0][None], normalize=True)[0])


def test_retrieve_job_writes_hits_and_a_contact_sheet(tmp_path, capsys):
    from PIL import Image

    from geolink.cli import main

    assert main(["retrieve", "--query", "1", "--k", "3", "--out", str(tmp_path / "hits.csv")]) == 0
    with open(tmp_path / "hits.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    with Image.open(tmp_path / "hits.png") as sheet:
        assert sheet.width > 4 * 160
    capsys.readouterr()
    assert main(["retrieve", "--evaluate"]) == 0
    recall = json.loads(capsys.readouterr().out)["recall"]
    assert recall["chance"] == {"1": 0.2, "5": 1.0, "10": 1.0} and set(recall["image_to_osm"]) == {"1", "5", "10"}
    assert main(["retrieve", "--query", "9", "--out", str(tmp_path / "x.json")]) == 2
    assert "query 9 is out of range: the pairs hold 5 samples" in capsys.readouterr().err


def test_recall_counts_ties_against_the_query():
    images = torch.eye(3)
    osm = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # pairs 0 and 1 share one OSM vector
    recall = recall_at_k(images, osm, ks=(1, 2))
    # image 0 ties with osm 1 (rank 2), image 1 is orthogonal to all three OSM vectors (rank 3), image 2 is found
    assert recall["image_to_osm"] == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    assert recall["osm_to_image"][1] == pytest.approx(2 / 3)  # osm 1 is nearest to image 0, not its own image
