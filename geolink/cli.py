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


COMMANDS: dict[str, tuple[Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = {
    "info": (_add_info, _run_info),
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
