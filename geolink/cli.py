"""The ``geolink`` command: one subcommand per job.

Each subcommand is a pair of functions, ``_add_<name>(subparsers)`` declaring its arguments and
``_run_<name>(args)`` doing the work; heavy imports happen inside ``_run_*`` so ``geolink --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("info", help="print versions and the registered architectures and pretrained tags",
                          description="Print the versions geolink runs with and every registered model.")


def _run_info(args: argparse.Namespace) -> int:
    import platform

    import timm
    import torch
    import torch_geometric

    import geolink

    print(f"geolink {geolink.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
          f"torch_geometric {torch_geometric.__version__}")
    print(f"cuda available: {torch.cuda.is_available()}")
    print("architectures:")
    for name in geolink.list_models():
        print(f"  {name}")
    print("pretrained:")
    for name in geolink.list_pretrained():
        print(f"  {name}")
    return 0


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert an official GeoLink .pth checkpoint into a from_pretrained folder",
        description="Convert an official GeoLink release checkpoint (multimodal or unimodal ViT .pth) into a "
                    "geolink folder that `from_pretrained`, `geolink.load_model` and (for image encoders) "
                    "`timm.create_model('local-dir:<dir>', pretrained=True)` load. The file is read with "
                    "torch.load(weights_only=True): pickled code is refused, never run.",
        epilog="example: geolink convert GeoLink_multimodal.pth converted/ --component fusion")
    parser.add_argument("checkpoint", help="official .pth file")
    parser.add_argument("out_dir", help="output folder (created)")
    parser.add_argument("--component", choices=["pretraining", "fusion", "image", "osm"], default=None,
                        help="save only this component (default: everything the file holds)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="also upload the folder to this Hugging Face Hub repo (needs network and a token)")


def _run_convert(args: argparse.Namespace) -> int:
    from geolink.convert import load_official_checkpoint
    from geolink.registry import COMPONENTS, extract_component

    model = load_official_checkpoint(args.checkpoint)
    if args.component is not None and not isinstance(model, COMPONENTS[args.component]):
        extracted = extract_component(model, args.component)
        if extracted is None:
            print(f"error: {args.checkpoint} holds a {type(model).__name__}, which has no {args.component!r} "
                  "component", file=sys.stderr)
            return 2
        model = extracted
    model.save_pretrained(args.out_dir)
    print(f"converted {args.checkpoint} -> {args.out_dir} ({type(model).__name__})")
    if args.push_to_hub:
        url = model.push_to_hub(args.push_to_hub)
        print(f"pushed to {url}")
    return 0


def _add_build_graphs(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-graphs", help="turn OpenStreetMap data into one stored graph per tile",
        description="Cut a region into tiles and write each tile's OSM graph (DESIGN §3, compact safetensors) plus "
                    "the shared tag vocabulary (and its embedding table with --text-model) and an index. Rerunning "
                    "skips finished tiles; --shard i/n splits the tiles between machines.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pbf", help="OpenStreetMap extract (.osm.pbf / .osm)")
    source.add_argument("--vector", help="vector file with tags (GeoJSON; .gpkg/.shp/... need geolink[geo])")
    source.add_argument("--merge-shards", action="store_true",
                        help="after all --shard runs finished: merge their vocabularies into one for the folder")
    parser.add_argument("--out", required=True, help="output folder")
    tiling = parser.add_mutually_exclusive_group()
    tiling.add_argument("--tile-size", help="tile side, e.g. 200m, 1km or 0.002deg (default 200m)")
    tiling.add_argument("--grid", help="ROWSxCOLS: split the bbox into equal tiles, e.g. 6x4")
    tiling.add_argument("--footprints", nargs="+", help="GeoTIFF images (or a JSON list of [w, s, e, n] bboxes): "
                                                        "one tile per image footprint")
    parser.add_argument("--bbox", help="region west,south,east,north, in degrees with --pbf, else in --crs "
                                       "(default: the data's extent)")
    parser.add_argument("--crs", default="EPSG:4326", help="tile CRS (default EPSG:4326)")
    parser.add_argument("--text-model", help="Hugging Face text model folder or Hub id; stores the embedding table "
                                             "(without it only the vocabulary is stored)")
    parser.add_argument("--pooling", default="official", help="tag pooling (default: official)")
    parser.add_argument("--text-cache", help="folder for the on-disk tag embedding cache")
    parser.add_argument("--tag-weights", default="official", help="key-frequency JSON (default: the official table)")
    parser.add_argument("--keys", help="comma-separated OSM keys to keep (default: keys of the frequency table)")
    parser.add_argument("--deny-keys", help="comma-separated OSM keys to drop")
    parser.add_argument("--workers", type=int, default=1, help="processes for the geometry work (default 1)")
    parser.add_argument("--shard", help="i/n: build only tiles k with k %% n == i (e.g. $SLURM_ARRAY_TASK_ID/8)")
    parser.add_argument("--device", help="text model device (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_build_graphs(args: argparse.Namespace) -> int:
    import json

    from geolink.graph.tiles import build_graphs_command, merge_shards

    if args.merge_shards:
        print(json.dumps(merge_shards(args.out, progress=not args.quiet)))
        return 0
    summary = build_graphs_command(
        pbf=args.pbf, vector=args.vector, out=args.out, tile_size=args.tile_size, grid=args.grid,
        footprints=args.footprints, bbox=args.bbox, crs=args.crs, text_model=args.text_model, pooling=args.pooling,
        text_cache=args.text_cache, tag_weights=args.tag_weights, keys=args.keys, deny_keys=args.deny_keys,
        workers=args.workers, shard=args.shard, device=args.device, progress=not args.quiet)
    print(json.dumps(summary))
    return 0


def _add_tag_stats(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tag-stats", help="count OSM tag keys into a key-frequency table",
        description="Count, for each tag key, the OSM objects carrying it, over .osm.pbf / GeoJSON inputs, and write "
                    "the JSON table OSMGraphBuilder(tag_weights=...) reads (keys with ':' written with spaces).")
    parser.add_argument("inputs", nargs="+", help=".osm.pbf / .osm / GeoJSON files")
    parser.add_argument("--out", required=True, help="output JSON file")
    parser.add_argument("--min-count", type=int, default=1, help="drop keys seen fewer times (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_tag_stats(args: argparse.Namespace) -> int:
    from geolink.graph.tags import count_keys

    table = count_keys(args.inputs, args.out, min_count=args.min_count, progress=not args.quiet)
    print(f"wrote {len(table)} keys to {args.out}")
    return 0


def _add_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="kNN / linear-probe evaluation of an encoder on an ImageFolder, side by side with timm models",
        description="Frozen-feature scene-classification protocols on an ImageFolder dataset (EuroSAT, RESISC-45, "
                    "...): the weighted kNN (L2-normalised global features, k=20, T=0.07) and/or a linear probe. "
                    "The folder is either <data>/train + <data>/test (or val) with one sub-folder per class, or "
                    "one sub-folder per class, split here (stratified, seeded). With --compare-timm, timm models "
                    "are evaluated under the same protocol and printed in the same table.",
        epilog="example: geolink eval all --model geolink_vit_large_patch16_224.neurips2025_unimodal "
               "--data EuroSAT_RGB --compare-timm vit_large_patch16_224.mae")
    parser.add_argument("protocol", choices=["knn", "linear", "all"], help="which protocol(s) to run")
    parser.add_argument("--model", required=True,
                        help="geolink folder, Hub repo, pretrained tag, or architecture name (random weights)")
    parser.add_argument("--data", required=True, help="ImageFolder root")
    parser.add_argument("--compare-timm", nargs="+", default=[], metavar="NAME",
                        help="timm model(s) to evaluate alongside, e.g. vit_tiny_patch16_224")
    parser.add_argument("--timm-pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="load timm's pretrained weights for --compare-timm models (default: yes; downloads once)")
    parser.add_argument("--img-size", type=int, default=224, help="input size (default 224)")
    parser.add_argument("--pool", choices=["avg", "token", "default"], default="avg",
                        help="global feature: mean of patch tokens (default), cls token, or the model's own pooling")
    parser.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default 0.07)")
    parser.add_argument("--probe-epochs", type=int, default=100, help="linear-probe epochs (default 100)")
    parser.add_argument("--probe-lr", type=float, default=1e-3, help="linear-probe AdamW learning rate (default 1e-3)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="held-out share per class when the folder has no train/test split (default 0.2)")
    parser.add_argument("--batch-size", type=int, default=64, help="feature-extraction batch size (default 64)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (default 0)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="autocast precision (default auto: bf16, or fp16 on GPUs without bf16)")
    parser.add_argument("--seed", type=int, default=0, help="split and probe seed (default 0)")
    parser.add_argument("--output", default=None, help="also write all results to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from geolink.eval.compare import evaluate_image_folder, format_table

    report = evaluate_image_folder(
        args.model, args.data, protocols=("knn", "linear") if args.protocol == "all" else (args.protocol,),
        compare_timm=args.compare_timm, timm_pretrained=args.timm_pretrained, img_size=args.img_size,
        pool=args.pool, k=args.k, temperature=args.temperature, probe_epochs=args.probe_epochs,
        probe_lr=args.probe_lr, batch_size=args.batch_size, num_workers=args.workers, device=args.device,
        precision=args.precision, test_fraction=args.test_fraction, seed=args.seed, progress=not args.quiet)
    print(f"{args.data}: {len(report['classes'])} classes, {report['num_train']} train / {report['num_test']} test")
    print(format_table(report["results"]))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.output}")
    return 0


def _add_pretrain(subparsers: argparse._SubParsersAction) -> None:
    from geolink.train.config import build_parser as add_train_flags

    parser = subparsers.add_parser(
        "pretrain", help="pretrain (or continue pretraining) a GeoLink model",
        description="GeoLink pretraining (MAE + image-OSM contrastive + masked-node consistency) on one CPU/GPU or "
                    "many with torchrun. Writes <out>/metrics.jsonl, checkpoints under <out>/checkpoints/ and the "
                    "final from_pretrained folder <out>/final/.",
        epilog="examples:\n  geolink pretrain --data bundled --out runs/tiny --max-steps 200 --batch-size 8\n"
               "  torchrun --nproc_per_node 8 -m geolink.cli pretrain --arch geolink_vit_large_patch16_224 "
               "--data shards/ --batch-size 64 --precision bf16 --out runs/vitl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(parser)


def _run_pretrain(args: argparse.Namespace) -> int:
    from geolink.train.config import config_from_args
    from geolink.train.trainer import run

    return run(config_from_args(args))


def _add_make_pairs(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-pairs", help="build (or append to) a sharded image-OSM pair dataset for pretraining",
        description="Pair image tiles with their OpenStreetMap graphs and store them as a sharded, append-only pair "
                    "dataset (index.json + safetensors shards + tag vocabulary and embedding table; no pickle) that "
                    "`geolink pretrain --data <out>`, PairShards and StreamingPairShards read. Inputs: the official "
                    "example layout (--official-tiles), or a folder of image tiles (--images) with footprints "
                    "(--footprints JSON, or the GeoTIFF bounds) and an OSM source (--pbf or --vector). Rerunning "
                    "on the same --out appends new tiles and skips those already stored.",
        epilog="examples:\n  geolink make-pairs --official-tiles official_examples/osm_tiles --text-model "
               "sentence-transformers/all-MiniLM-L6-v2 --out pairs/\n"
               "  geolink make-pairs --images tiles/ --pbf helsinki.osm.pbf --text-model ./minilm --out pairs/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--official-tiles", metavar="DIR",
                        help="official layout: DIR/<tile>/{<tile>.jpg, <tile>_{polygon,line,point}.geojson, meta.json}")
    source.add_argument("--images", metavar="DIR", help="folder of image tiles (.jpg/.png/.tif)")
    parser.add_argument("--footprints", metavar="JSON",
                        help="with --images: {image file name or stem: [west, south, east, north]} in --crs "
                             "(default: read the GeoTIFF bounds of the images)")
    parser.add_argument("--crs", default="EPSG:4326", help="CRS of --footprints (default EPSG:4326)")
    osm = parser.add_mutually_exclusive_group()
    osm.add_argument("--pbf", help="with --images: .osm.pbf / .osm file (read for the tiles' extent only)")
    osm.add_argument("--vector", help="with --images: any vector file geolink reads (GeoJSON, .gpkg, ...)")
    parser.add_argument("--text-model", required=True,
                        help="text model for the tag embedding table: a local folder or a Hub id "
                             "(e.g. sentence-transformers/all-MiniLM-L6-v2, 384 wide)")
    parser.add_argument("--pooling", default="official", help="tag pooling (default: official)")
    parser.add_argument("--tag-weights", default="official", help="key-frequency JSON (default: the official table)")
    parser.add_argument("--out", required=True, help="dataset folder (created, or appended to)")
    parser.add_argument("--samples-per-shard", type=int, default=1024, help="pairs per shard file (default 1024)")
    parser.add_argument("--device", help="text model device (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_make_pairs(args: argparse.Namespace) -> int:
    import json

    from geolink.data.shards import make_pairs
    from geolink.graph.text import TagEncoder

    if args.images and not (args.pbf or args.vector):
        raise SystemExit("geolink make-pairs: --images needs an OSM source, --pbf or --vector")
    encoder = TagEncoder(args.text_model, pooling=args.pooling, device=args.device)
    summary = make_pairs(args.out, official_tiles_dir=args.official_tiles, images=args.images,
                         footprints=args.footprints, pbf=args.pbf, vector=args.vector, crs=args.crs,
                         tag_encoder=encoder, tag_weights=args.tag_weights,
                         samples_per_shard=args.samples_per_shard, progress=not args.quiet)
    print(json.dumps(summary))
    return 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the embedded tiny GeoLink on a bundled tile and write a PNG (offline)",
        description="Offline demo: loads the embedded pretrained geolink_tiny.demo, builds the OSM graph of a "
                    "bundled official example tile, runs the fusion encoder and writes a PNG with the image, the OSM "
                    "graph drawn over it and a PCA of the fused features.")
    parser.add_argument("--out", default="geolink_demo.png", help="output PNG (default: geolink_demo.png)")
    parser.add_argument("--tile", default=None, help="bundled tile name (default: a472140250_FI_21; "
                                                     "`--tile list` lists them)")


def _run_demo(args: argparse.Namespace) -> int:
    from geolink.demo import DEFAULT_TILE, list_tiles, run_demo

    if args.tile == "list":
        print("\n".join(list_tiles()))
        return 0
    path = run_demo(args.out, args.tile or DEFAULT_TILE)
    print(f"wrote {path.resolve()}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "info": (_add_info, _run_info),
    "demo": (_add_demo, _run_demo),
    "convert": (_add_convert, _run_convert),
    "pretrain": (_add_pretrain, _run_pretrain),
    "build-graphs": (_add_build_graphs, _run_build_graphs),
    "tag-stats": (_add_tag_stats, _run_tag_stats),
    "eval": (_add_eval, _run_eval),
    "make-pairs": (_add_make_pairs, _run_make_pairs),
}


def build_parser() -> argparse.ArgumentParser:
    """The full ``geolink`` argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="geolink",
        description="GeoLink: remote-sensing image + OpenStreetMap foundation model. "
                    "Run `geolink <command> --help` for the options of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for add_parser, _ in COMMANDS.values():
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``geolink`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    # torch_geometric's import triggers torch's jit.script deprecation notice: noise for a command-line user
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
    _, run = COMMANDS[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
