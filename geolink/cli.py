"""The ``geolink`` command: one subcommand per job, its flags derived from the job's dataclass config.

Every job is a pair ``(config dataclass, function)`` named in :data:`JOBS` as import strings, so ``geolink --help``
imports nothing heavy; a job's module is imported when the job runs or its ``--help`` is built. Each config field
becomes one flag (:func:`add_config_arguments`) and the parsed flags become the config again
(:func:`config_from_args`): a flag, its type, default and help are declared once, on the field. The conventions:

- metadata ``help`` (required), ``flag`` (default ``--field-name``), ``positional`` and ``metavar``;
- types (read with :func:`typing.get_type_hints`): ``str``, ``int``, ``float``, ``Path``, ``bool`` (``--x``, or
  ``--x/--no-x`` when the default is True), ``Enum`` subclasses (choices = values), ``X | None``, fixed tuples
  (``nargs=N``), ``tuple[T, ...]`` / ``list[T]`` (one or more values), ``dict`` (repeatable ``KEY=VALUE``, values
  read as JSON, else as text) and any class with a ``from_string(text)`` classmethod;
- a field without default is required; validation lives in the config's ``__post_init__``.

Errors the user can fix (:class:`geolink.errors.GeoLinkError`, missing or unreadable files, bad flag values) are
printed as one line ``error: <what> (<the fix>)`` on stderr with exit code 2; ``--debug`` or ``GEOLINK_DEBUG=1``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import json
import os
import re
import sys
import textwrap
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from geolink.errors import GeoLinkError

#: exceptions printed as one ``error:`` line (exit code 2) rather than a traceback
USER_ERRORS = (GeoLinkError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own, so example commands keep their line breaks
    (indented lines continue four columns further in); never breaks a flag at its hyphens."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            depth = len(line) - len(line.lstrip())
            margin, hanging = indent + " " * depth, indent + " " * (depth + 4 if depth else 0)
            lines.append(textwrap.fill(line.strip(), width, initial_indent=margin, subsequent_indent=hanging,
                                       break_on_hyphens=False))
        return "\n".join(lines)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose usage errors are one line: ``error: <prog>: <what> (run <prog> --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (run `{self.prog} --help`)\n")


# ------------------------------------------------------------------------------------------------- the deriver
def _flag(item: dataclasses.Field) -> str:
    return item.metadata.get("flag", "--" + item.name.replace("_", "-"))


def _strip_optional(kind: Any) -> Any:
    """``X | None`` -> ``X``; other types unchanged."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(kind) if member is not type(None)]
        if len(members) != 1:
            raise TypeError(f"the command line reads no union {kind}; use one type or 'X | None'")
        return members[0]
    return kind


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, _json_or_text(value)


def _value_parser(kind: Any) -> tuple[Callable[[str], Any], str | None]:
    """``(parse one command-line word, default metavar)`` for a scalar type."""
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        values = [str(member.value) for member in kind]

        def parse_member(text: str) -> enum.Enum:
            try:
                return kind(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(values)})") from None

        parse_member.__name__ = kind.__name__
        return parse_member, "{" + ",".join(values) + "}"
    if hasattr(kind, "from_string"):
        def parse_text(text: str) -> Any:
            try:
                return kind.from_string(text)
            except (GeoLinkError, ValueError) as error:
                raise argparse.ArgumentTypeError(str(error)) from None

        parse_text.__name__ = kind.__name__
        return parse_text, None
    if kind in (str, int, float, Path):
        return kind, None
    if kind is Any:
        return _json_or_text, None
    raise TypeError(f"the command line cannot read a {kind!r} field")


def _argument(item: dataclasses.Field, kind: Any) -> dict[str, Any]:
    """``add_argument`` keywords (less name, help and default) for one field of type ``kind``."""
    kind = _strip_optional(kind)
    origin, members = typing.get_origin(kind), typing.get_args(kind)
    optional_positional = item.metadata.get("positional") and not _required(item)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction if item.default is True else "store_true"}
    if origin is dict or kind is dict:
        return {"action": "append", "type": _key_value, "metavar": "KEY=VALUE"}
    if origin in (tuple, list):
        fixed = origin is tuple and Ellipsis not in members
        if not fixed and len(members) > 1 and members[1] is not Ellipsis:
            raise TypeError(f"the command line reads tuple[T, ...] or fixed tuples, not {kind}")
        if fixed and len(set(members)) != 1:
            raise TypeError(f"the command line reads fixed tuples of one type, not {kind}")
        parse, metavar = _value_parser(members[0] if members else str)
        return {"type": parse, "metavar": metavar, "nargs": len(members) if fixed else "*" if optional_positional
                else "+"}
    parse, metavar = _value_parser(kind)
    return {"type": parse, "metavar": metavar, **({"nargs": "?"} if optional_positional else {})}


def _required(item: dataclasses.Field) -> bool:
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING


def _default_text(item: dataclasses.Field, defaults: Mapping[str, Any]) -> str:
    default = defaults.get(item.name, item.default)
    if default is dataclasses.MISSING and item.default_factory is not dataclasses.MISSING:
        default = item.default_factory()
    if default is dataclasses.MISSING or default is None or default is False or default in ((), [], {}, ""):
        return ""
    if default is True:
        return " (default: yes)"
    if isinstance(default, enum.Enum):
        default = default.value
    if isinstance(default, (tuple, list)):
        default = " ".join(str(value) for value in default)
    return f" (default: {default})"


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type,
                         defaults: Mapping[str, Any] | None = None) -> None:
    """Add one argument per field of the dataclass ``config_class`` to ``parser`` (conventions: module docstring).

    Absent options leave their attribute unset, so :func:`config_from_args` lets the dataclass apply its own
    defaults, or those of ``defaults`` (``{field: value}``, e.g. a task's own number of epochs: shown in the help,
    and a field given one is no longer required).
    """
    defaults = defaults or {}
    hints = typing.get_type_hints(config_class)
    for item in dataclasses.fields(config_class):
        if not item.init:
            continue
        keywords = _argument(item, hints[item.name])
        if item.metadata.get("metavar"):
            keywords["metavar"] = item.metadata["metavar"]
        keywords = {key: value for key, value in keywords.items() if value is not None}
        help_text = in_flag_words(item.metadata["help"], config_class, skip=item.name) + _default_text(item, defaults)
        help_text = help_text.replace("%", "%%")
        if item.metadata.get("positional"):
            parser.add_argument(item.name, help=help_text, default=argparse.SUPPRESS, **keywords)
        else:
            parser.add_argument(_flag(item), dest=item.name, help=help_text, default=argparse.SUPPRESS,
                                required=_required(item) and item.name not in defaults, **keywords)


def config_from_args(config_class: type, args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> Any:
    """The ``config_class`` instance of parsed arguments (fields whose flag was not given take their value in
    ``defaults``, else the dataclass default).

    Raises:
        geolink.errors.ConfigError: the config's own validation refused the values.
    """
    hints = typing.get_type_hints(config_class)
    values = dict(defaults or {})
    for item in dataclasses.fields(config_class):
        if item.init and hasattr(args, item.name):
            value, kind = getattr(args, item.name), _strip_optional(hints[item.name])
            origin = typing.get_origin(kind) or kind
            values[item.name] = origin(value) if origin in (tuple, list, dict) and value is not None else value
    return config_class(**values)


def in_flag_words(message: str, config_class: type, skip: str | None = None) -> str:
    """``message`` with the config's option names written as their flags where the two spell differently:
    ``tile_size`` -> ``--tile-size``, ``overrides`` -> ``--set`` (a one-word name like ``k`` stays: it reads the
    same as its flag ``--k`` and may be a plain word of the text).

    A name is replaced only as a word of its own outside quotes, never inside a path, file name, placeholder or
    keyword argument (``runs/out_dir/x``, ``out_dir.json``, ``'out_dir'``, ``<out_dir>``, ``tile_size=200`` stay as
    they are), and never ``skip`` (the option whose own help this is).
    """
    names = {item.name: _flag(item) for item in dataclasses.fields(config_class)
             if item.init and not item.metadata.get("positional") and item.name != skip
             and ("_" in item.name or "flag" in item.metadata)}
    if not names:
        return message
    word = re.compile(r"(?<![\w./\\<-])(" + "|".join(map(re.escape, sorted(names, key=len, reverse=True)))
                      + r")(?![\w/\\'>=-]|\.\w)")
    parts = re.split(r"('[^']*'|\"[^\"]*\")", message)
    return "".join(part if index % 2 else word.sub(lambda match: names[match.group(1)], part)
                   for index, part in enumerate(parts))


def parse_config(config_class: type, argv: Sequence[str] | None = None, description: str | None = None,
                 defaults: Mapping[str, Any] | None = None, prog: str | None = None) -> Any:
    """Parse ``argv`` into a ``config_class`` instance with the flags :func:`add_config_arguments` derives (for a
    script over a job config; bad values exit with one ``error:`` line and code 2, as in ``geolink``)."""
    parser = ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    add_config_arguments(parser, config_class, defaults)
    return config_from_args(config_class, parser.parse_args(argv), defaults)


# ---------------------------------------------------------------------------------------------------------- jobs
def info() -> int:
    """Print the versions geolink runs with, every registered architecture, and a table of the pretrained tags:
    where their weights can come from now (offline), what they hold, their text model and licence."""
    import platform

    import timm
    import torch
    import torch_geometric

    import geolink
    from geolink.registry import AVAILABILITY

    print(f"geolink {geolink.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
          f"torch_geometric {torch_geometric.__version__}")
    print(f"cuda available: {torch.cuda.is_available()}")
    print("architectures:")
    for name in geolink.list_models():
        print(f"  {name}")
    print("pretrained:")
    availability = geolink.list_pretrained(available=True)
    rows = [("tag", "availability", "holds", "text model", "licence")]
    for name, where in availability.items():
        tag = geolink.get_pretrained_tag(name)
        rows.append((name, where, tag.holds, tag.text_model or "-", tag.license))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    for where in dict.fromkeys(availability.values()):
        print(f"{where}: {AVAILABILITY[where]}")
    return 0


@dataclasses.dataclass(frozen=True)
class Job:
    """A subcommand: its config class and function as ``"module:name"`` strings, imported when the job is used.

    Attributes:
        name: the subcommand.
        help: one line for ``geolink --help`` (the job's own ``--help`` shows the config's docstring).
        config: ``"module:ConfigClass"``, or None for a job without options.
        function: ``"module:function"`` (or the function) taking the config, or nothing when ``config`` is None,
            and returning what :func:`show` prints.
        epilog: examples shown under the job's ``--help``.
    """

    name: str
    help: str
    config: str | None
    function: str | Callable[..., Any]
    epilog: str = ""


JOBS: dict[str, Job] = {job.name: job for job in (
    Job("info", "print versions and the registered architectures and pretrained tags", None, info),
    Job("demo", "run the embedded tiny GeoLink on a bundled tile and write a PNG (offline)",
        "geolink.demo:DemoConfig", "geolink.demo:run_demo"),
    Job("convert", "convert an official GeoLink .pth checkpoint into a from_pretrained folder",
        "geolink.convert:ConvertConfig", "geolink.convert:convert",
        "example:\n  geolink convert GeoLink_multimodal.pth converted/ --component fusion"),
    Job("pretrain", "pretrain (or continue pretraining) a GeoLink model",
        "geolink.train.config:TrainConfig", "geolink.train.trainer:run",
        "examples:\n  geolink pretrain --data bundled --out runs/tiny --max-steps 200 --batch-size 8\n"
        "  torchrun --nproc_per_node 8 -m geolink.cli pretrain --arch geolink_vit_large_patch16_224 "
        "--data shards/ --batch-size 64 --precision bf16 --out runs/vitl"),
    Job("plot-metrics", "draw a pretraining run's metrics.jsonl as training curves (PNG; needs matplotlib)",
        "geolink.plots:PlotMetricsConfig", "geolink.plots:plot_metrics",
        "example:\n  geolink plot-metrics runs/tiny/metrics.jsonl --out curves.png"),
    Job("build-graphs", "turn OpenStreetMap data into one stored graph per tile",
        "geolink.graph.tiles:BuildGraphsConfig", "geolink.graph.tiles:build_graphs",
        "examples:\n  geolink build-graphs --pbf helsinki.osm.pbf --tile-size 200m --out graphs/\n"
        "  geolink build-graphs --vector city.geojson --grid 6 4 --text-model minilm --out graphs/"),
    Job("tag-stats", "count OSM tag keys into a key-frequency table",
        "geolink.graph.readers:TagStatsConfig", "geolink.graph.readers:tag_stats",
        "example:\n  geolink tag-stats finland.osm.pbf --out tag_weights.json --min-count 10"),
    Job("eval", "kNN / linear-probe evaluation of an encoder on an ImageFolder, side by side with timm models",
        "geolink.eval.compare:EvalConfig", "geolink.eval.compare:evaluate_image_folder",
        "example:\n  geolink eval all --model geolink_vit_large_patch16_224.neurips2025_unimodal "
        "--data EuroSAT_RGB --compare-timm vit_large_patch16_224.mae"),
    Job("make-pairs", "build (or append to) a sharded image-OSM pair dataset for pretraining",
        "geolink.data.shards:MakePairsConfig", "geolink.data.shards:make_pairs",
        "examples:\n  geolink make-pairs --official-tiles official_examples/osm_tiles --text-model "
        "minilm --out pairs/\n"
        "  geolink make-pairs --images tiles/ --pbf helsinki.osm.pbf --text-model minilm --out pairs/"),
    Job("explain", "draw where each OSM object of a tile looks in the image (fusion-block attention maps, PNG)",
        "geolink.explain:ExplainConfig", "geolink.explain:explain",
        "example:\n  geolink explain --image tile.jpg --osm tile_folder/ --model geolink_tiny.demo "
        "--out attention.png"),
    Job("osm-qa", "score how much the image and the neighbours disagree with each OSM object's tags (GeoJSON + PNG)",
        "geolink.suggest:OsmQaConfig", "geolink.suggest:osm_qa",
        "example:\n  geolink osm-qa --image tile.jpg --osm tile_folder/ --model geolink_tiny.demo --out qa.geojson"),
    Job("retrieve", "image<->OSM retrieval with the contrastive heads: top-k + contact sheet, or recall@k",
        "geolink.retrieval:RetrieveConfig", "geolink.retrieval:retrieve",
        "examples:\n  geolink retrieve --pairs bundled --query 2 --direction image-to-osm --out hits.json\n"
        "  geolink retrieve --pairs bundled --draws 8 --evaluate"),
    Job("embed", "embed every window of GeoTIFFs with their OpenStreetMap context into a GeoParquet table",
        "geolink.embed.job:EmbedConfig", "geolink.embed.job:embed",
        "examples:\n  geolink embed scene.tif --osm region.osm.pbf --out scene.parquet\n"
        "  geolink embed tiles/ --osm none --model geolink_tiny.demo --mode image --out tiles.parquet"),
    Job("tag-table", "embed a tag vocabulary once into a table file that graph builds start warm from",
        "geolink.graph.tag_table:TagTableConfig", "geolink.graph.tag_table:build_tag_table",
        "example:\n  geolink tag-table --from helsinki.osm.pbf --text-model minilm --out helsinki_minilm.safetensors"),
    Job("export", "export the image or fusion encoder to ONNX or torch.export", "geolink.export:ExportConfig",
        "geolink.export:export",
        "example:\n  geolink export --model geolink_tiny.demo --component fusion --format onnx --out exported/"),
)}


def resolve(target: str | Callable[..., Any]) -> Any:
    """The object an import string ``"module:name"`` names (a callable is returned as it is)."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _description(config_class: type | None, job: Job) -> str:
    """The first paragraph of the config's docstring, in flag words (else the job's one-line help)."""
    if config_class is None:
        return job.help[0].upper() + job.help[1:] + "."
    return in_flag_words(" ".join((config_class.__doc__ or "").strip().split("\n\n")[0].split()), config_class)


def job_parser(job: Job) -> argparse.ArgumentParser:
    """The parser of ``geolink <job>``: one flag per config field, plus ``--debug``."""
    config_class = resolve(job.config) if job.config else None
    parser = ArgumentParser(prog=f"geolink {job.name}", description=_description(config_class, job),
                            epilog=job.epilog or None, formatter_class=HelpFormatter)
    if config_class is not None:
        add_config_arguments(parser, config_class)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The top-level ``geolink`` parser: the job names and the global ``--debug`` (a job's options are parsed by
    :func:`job_parser`)."""
    parser = ArgumentParser(prog="geolink",
                            description="GeoLink: remote-sensing image + OpenStreetMap foundation model. "
                                        "Run `geolink <command> --help` for the options of a command.")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also: GEOLINK_DEBUG=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for job in JOBS.values():
        subparsers.add_parser(job.name, help=job.help, add_help=False)
    return parser


def show(job: Job, config: Any, result: Any) -> int:
    """Print what a job returned and give the exit code: an int is the code; the eval report becomes a table;
    other dicts are printed as one JSON line. Jobs that return a path (convert, demo) say themselves what they
    wrote."""
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    if job.name == "eval":
        from geolink.eval.compare import format_table

        print(f"{config.data}: {len(result['classes'])} classes, {result['num_train']} train / "
              f"{result['num_test']} test")
        print(format_table(result["results"]))
        if config.output is not None:
            print(f"wrote {config.output}")
    elif isinstance(result, dict):
        print(json.dumps(result, default=str))
    return 0


def _one_line(error: BaseException, config_class: type | None) -> str:
    if isinstance(error, OSError) and error.filename is not None and not isinstance(error, GeoLinkError):
        what = f"{error.strerror or type(error).__name__}: {error.filename}"
        fix = {FileNotFoundError: "check the path", NotADirectoryError: "a folder on the path is a file",
               FileExistsError: "a file is in the way: choose another path", IsADirectoryError: "pass a file",
               PermissionError: "check its permissions"}
        message = f"{what} ({next((f for k, f in fix.items() if isinstance(error, k)), 'check the path')})"
    else:
        message = str(error).strip() or type(error).__name__
    message = " ".join(message.split())
    return in_flag_words(message, config_class) if config_class is not None else message


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: Any = None, line: str | None = None) -> None:
    """``warnings.showwarning`` for the command line: ``warning: <message>`` on one line (``--debug`` restores
    Python's ``file:line: Category:`` form)."""
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``geolink`` console script; returns the process exit code."""
    # torch_geometric's import triggers torch's jit.script deprecation notice: noise for a command-line user
    warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
    parser = build_parser()
    top, rest = parser.parse_known_args(argv)
    if top.command is None:
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        parser.print_help()
        return 0
    job = JOBS[top.command]
    debug = top.debug or os.environ.get("GEOLINK_DEBUG", "") not in ("", "0")
    config_class = resolve(job.config) if job.config else None
    args = job_parser(job).parse_args(rest)
    debug = debug or args.debug
    try:
        with warnings.catch_warnings():  # restores Python's warning display when the job returns
            if not debug:
                warnings.showwarning = _one_line_warning
            config = config_from_args(config_class, args) if config_class is not None else None
            function = resolve(job.function)
            result = function(config) if config_class is not None else function()
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {_one_line(error, config_class)}", file=sys.stderr)
        return 2
    return show(job, config, result)


if __name__ == "__main__":
    sys.exit(main())
