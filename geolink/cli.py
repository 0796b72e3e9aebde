"""The ``geolink`` command: one subcommand per job.

Each subcommand is a pair of functions, ``_add_<name>(subparsers)`` declaring its arguments and
``_run_<name>(args)`` doing the work; heavy imports happen inside ``_run_*`` so ``geolink --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
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
    parser.add_argument("--out", required=True, help="output folder")
    tiling = parser.add_mutually_exclusive_group()
    tiling.add_argument("--tile-size", help="tile side, e.g. 200m, 1km or 0.002deg (default 200m)")
    tiling.add_argument("--grid", help="ROWSxCOLS: split the bbox into equal tiles, e.g. 6x4")
    tiling.add_argument("--footprints", nargs="+", help="GeoTIFF images (or a JSON list of [w, s, e, n] bboxes): "
                                                        "one tile per image footprint")
    parser.add_argument("--bbox", help="region west,south,east,north (default: the data's extent)")
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

    from geolink.graph.tiles import build_graphs_command

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


COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "info": (_add_info, _run_info),
    "convert": (_add_convert, _run_convert),
    "build-graphs": (_add_build_graphs, _run_build_graphs),
    "tag-stats": (_add_tag_stats, _run_tag_stats),
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
    _, run = COMMANDS[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
