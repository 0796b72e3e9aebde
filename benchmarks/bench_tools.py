"""Quality of the tools on the pretrained heads, each against its baseline in the same run (issue 12).

1. Retrieval: recall@1/5/10 image→OSM and OSM→image over pairs, next to chance (k / N).
2. Masked-tag suggestion: top-k accuracy of the true tag strings of every node of the real example tiles, each node
   masked alone, against a tag-frequency baseline (the same candidates ranked by how often each tag occurs on the
   nodes of the *other* tiles) and the expectation of a uniformly random ranking.
3. Masked prediction on graphs without tag text (the UFZ samples, CLIP-512 features): mean cosine of the masked
   prediction to the actual feature, against predicting the mean feature of the other nodes. Needs a model reading
   512-wide features (the official weights); skipped, with the reason, otherwise.
4. Exact search time: ``topk_cosine`` of 256 queries over N keys, next to one unchunked matmul + ``torch.topk``,
   median (min–max) of the runs.

Run (the embedded demo; preliminary, on whatever machine)::

    python benchmarks/bench_tools.py [--quick]

With the official release (converted on the fly; the tiles need its CLIP text model)::

    python benchmarks/bench_tools.py --model GeoLink_multimodal.pth --text-model clip \\
        --pairs ../shared/data/official_examples/ufz
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import SHARED, describe_run
from geolink.demo import TILES, list_tiles
from geolink.explain import load_tool_model, node_labels, read_osm_input, text_encoder_for
from geolink.graph.schema import NODE_TYPES
from geolink.graph.tags import load_key_frequency
from geolink.retrieval import open_pairs, pair_indexes, recall_at_k, topk_cosine
from geolink.suggest import default_candidates, masked_predictions, rank_candidates

KS = (1, 5, 10)


def random_hit_rate(candidates: int, true: int, k: int) -> float:
    """P(at least one of ``true`` correct items is in the top ``k`` of a uniformly random ranking of
    ``candidates``)."""
    if true == 0:
        return 0.0
    k = min(k, candidates)
    return 1.0 - math.comb(candidates - true, k) / math.comb(candidates, k)


def retrieval(model, spec: str, draws: int) -> None:
    images, graphs = pair_indexes(model, spec, draws)
    recall = recall_at_k(images.embeddings, graphs.embeddings, KS)
    label = f"{spec} ({len(images)} pairs{f', {draws} crops per tile' if draws > 1 else ''})"
    for direction in ("image_to_osm", "osm_to_image"):
        cells = "  ".join(f"R@{k} {recall[direction][k]:.3f} (chance {recall['chance'][k]:.3f})" for k in KS)
        print(f"| {label} | {direction.replace('_to_', ' → ')} | {cells} |")


def tile_inputs(model, model_name: str, text_model: str | None):
    from geolink.explain import read_image

    tiles = []
    for name in list_tiles():
        folder = TILES / name
        _, pixels = read_image(folder / f"{name}.jpg", model)
        graph, vocabulary = read_osm_input(folder, model_name, text_model)
        labels = node_labels(graph, vocabulary)
        tiles.append((name, pixels, graph, vocabulary, labels))
    return tiles


def suggestion(model, model_name: str, text_model: str | None) -> None:
    encoder = text_encoder_for(model_name, text_model)
    tiles = tile_inputs(model, model_name, text_model)
    frequency = load_key_frequency("official") or {}
    hits = {"model": Counter(), "frequency": Counter()}
    random_expectation: Counter = Counter()
    nodes_total = candidates_total = 0
    for name, pixels, graph, vocabulary, labels in tiles:
        counts = Counter(s for other, _, _, _, other_labels in tiles if other != name
                         for t in NODE_TYPES for node in other_labels[t] for s in node.split("; ") if s)
        candidates = default_candidates(graph, vocabulary)
        key_rank = {s: -frequency.get(s.split(":")[0], 0.0) for s in candidates}
        baseline = sorted(candidates, key=lambda s: (-counts[s], key_rank[s]))
        nodes = [(t, i) for t in NODE_TYPES for i in range(graph[t].num_nodes)]
        predictions = masked_predictions(model, pixels, graph, nodes)
        for (node_type, index), prediction in zip(nodes, predictions):
            true = {s for s in labels[node_type][index].split("; ") if s}
            if not true:
                continue
            ranked = [tag for tag, _ in rank_candidates(prediction, candidates, encoder, max(KS))]
            nodes_total += 1
            candidates_total += len(candidates)
            for k in KS:
                hits["model"][k] += bool(true & set(ranked[:k]))
                hits["frequency"][k] += bool(true & set(baseline[:k]))
                random_expectation[k] += random_hit_rate(len(candidates), len(true & set(candidates)), k)
    print(f"\n{nodes_total} tagged nodes of {len(tiles)} tiles, each masked alone; "
          f"{candidates_total / max(nodes_total, 1):.0f} candidates per node on average (the tile's vocabulary + "
          "the 200 commonest keys)\n")
    print("| ranking | " + " | ".join(f"top-{k}" for k in KS) + " |")
    print("|---|" + "---:|" * len(KS))
    for label, counter in (("masked prediction (model)", hits["model"]),
                           ("tag frequency on the other tiles (baseline)", hits["frequency"]),
                           ("uniformly random (expectation)", random_expectation)):
        print(f"| {label} | " + " | ".join(f"{counter[k] / max(nodes_total, 1):.3f}" for k in KS) + " |")


def ufz_prediction(model, ufz: Path) -> None:
    if model.osm_encoder.text_dim != 512:
        print(f"\nUFZ masked prediction: skipped: the model reads {model.osm_encoder.text_dim}-wide tag features, the "
              "UFZ graphs carry CLIP-512 ones (run with the official weights, see the module docstring)")
        return
    names, images, graphs = open_pairs(ufz)
    model_cos, mean_cos, count = 0.0, 0.0, 0
    for pixels, graph in zip(images, graphs):
        nodes = [(t, i) for t in NODE_TYPES for i in range(graph[t].num_nodes)]
        predictions = masked_predictions(model, pixels, graph, nodes)
        features = torch.cat([graph[t].x for t in NODE_TYPES])
        for row, ((node_type, index), prediction) in enumerate(zip(nodes, predictions)):
            actual = graph[node_type].x[index]
            others = torch.cat([features[:row], features[row + 1:]]).mean(dim=0)
            model_cos += float(F.cosine_similarity(prediction, actual, dim=0))
            mean_cos += float(F.cosine_similarity(others, actual, dim=0))
            count += 1
    print(f"\nUFZ masked prediction, {count} nodes of {len(names)} graphs: mean cosine to the actual feature "
          f"{model_cos / count:.3f} (model) vs {mean_cos / count:.3f} (mean feature of the other nodes, baseline)")


def search_time(sizes: list[int], runs: int, dim: int) -> None:
    print("\n| keys | 256 queries, exact top-10, chunked `topk_cosine` (ms) | one full matmul + `torch.topk` (ms) |\n"
          "|---:|---:|---:|")
    generator = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(256, dim, generator=generator), dim=1)

    def timed(function) -> str:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            function()
            times.append((time.perf_counter() - start) * 1000)
        return f"{statistics.median(times):.1f} ({min(times):.1f}–{max(times):.1f})"

    for size in sizes:
        keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1)
        chunked = timed(lambda keys=keys: topk_cosine(queries, keys, 10))
        full = timed(lambda keys=keys: torch.topk(queries @ keys.t(), 10, dim=1))
        print(f"| {size:,} | {chunked} | {full} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="geolink_tiny.demo", help="pretrained tag, folder or official .pth")
    parser.add_argument("--text-model", default=None, help="text model of the tile graphs (default: the tag's)")
    parser.add_argument("--pairs", default="bundled", help="pairs for retrieval ('bundled', a dataset, UFZ folder)")
    parser.add_argument("--quick", action="store_true", help="smallest settings (checks that the script runs)")
    args = parser.parse_args()
    print(describe_run())
    torch.manual_seed(0)
    model = load_tool_model(args.model, "pretraining")
    print(f"model {args.model}\n\n| pairs | direction | recall@k |\n|---|---|---|")
    with torch.no_grad():
        retrieval(model, args.pairs, 1)
        if args.pairs == "bundled":
            retrieval(model, args.pairs, 2 if args.quick else 8)
        suggestion(model, args.model, args.text_model)
        ufz_prediction(model, SHARED / "official_examples" / "ufz")
    search_time([100_000] if args.quick else [100_000, 1_000_000], 1 if args.quick else 5,
                model.region_projection.out_features)


if __name__ == "__main__":
    main()
