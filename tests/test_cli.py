"""The ``geolink`` command: flags derived from job configs, help for every job, one-line errors with exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import geolink
from geolink.cli import (
    JOBS,
    ArgumentParser,
    add_config_arguments,
    config_from_args,
    in_flag_words,
    job_parser,
    main,
    parse_config,
    resolve,
)
from geolink.errors import ConfigError, InputError, MissingInputError

CONFIG_JOBS = [name for name, job in JOBS.items() if job.config is not None]


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """``geolink <argv>`` in this process: (exit code, stdout, stderr); argparse's exits are caught."""
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------------- the deriver
class Colour(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


class Span:
    """A value with its own text form, like ``TileSize``."""

    def __init__(self, metres: float) -> None:
        self.metres = metres

    @classmethod
    def from_string(cls, text: str) -> Span:
        if not text.endswith("m"):
            raise InputError(f"span {text!r} is not in metres (write e.g. 200m)")
        return cls(float(text[:-1]))


@dataclass
class ToyConfig:
    """A config with one field of every supported type.

    Second paragraph: not part of the command description.
    """

    inputs: tuple[Path, ...] = field(metadata={"help": "input files", "positional": True})
    out: Path = field(metadata={"help": "output folder"})
    name: str = field(default="toy", metadata={"help": "a name"})
    count: int = field(default=3, metadata={"help": "how many (100% sure)"})
    rate: float | None = field(default=None, metadata={"help": "a rate"})
    verbose: bool = field(default=False, metadata={"help": "talk"})
    pretrained: bool = field(default=True, metadata={"help": "load weights"})
    colour: Colour = field(default=Colour.RED, metadata={"help": "a colour"})
    bbox: tuple[float, float, float, float] | None = field(default=None, metadata={"help": "w s e n"})
    tags: list[str] = field(default_factory=list, metadata={"help": "tags"})
    span: Span | None = field(default=None, metadata={"help": "a span"})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "KEY=VALUE", "flag": "--set"})
    max_size: int = field(default=8, metadata={"help": "at most max_size items, before extra"})

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"count must be at least 1; got {self.count}")


def toy(argv: list[str]) -> ToyConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ToyConfig)
    return config_from_args(ToyConfig, parser.parse_args(argv))


def test_deriver_reads_every_supported_type():
    config = toy(["a.pbf", "b.geojson", "--out", "o", "--name", "x", "--count", "5", "--rate", "0.5", "--verbose",
                  "--no-pretrained", "--colour", "blue", "--bbox", "1", "2", "3", "4", "--tags", "p", "q",
                  "--span", "200m", "--set", "osm.text_dim=512", "--set", "note=plain text", "--set", 'l=[1, 2]'])
    assert config.inputs == (Path("a.pbf"), Path("b.geojson")) and config.out == Path("o")
    assert (config.name, config.count, config.rate, config.verbose, config.pretrained) == ("x", 5, 0.5, True, False)
    assert config.colour is Colour.BLUE and config.bbox == (1.0, 2.0, 3.0, 4.0) and config.tags == ["p", "q"]
    assert config.span.metres == 200.0
    assert config.extra == {"osm.text_dim": 512, "note": "plain text", "l": [1, 2]}


def test_deriver_leaves_defaults_to_the_dataclass():
    assert toy(["a", "--out", "o"]) == ToyConfig(inputs=(Path("a"),), out=Path("o"))


def test_parse_config_with_a_scripts_own_defaults(capsys):
    defaults = {"out": Path("runs/toy"), "count": 7}
    config = parse_config(ToyConfig, ["a", "--name", "n"], "A toy script.", defaults)
    assert config == ToyConfig(inputs=(Path("a"),), out=Path("runs/toy"), name="n", count=7)
    assert parse_config(ToyConfig, ["a", "--count", "2"], defaults=defaults).count == 2
    with pytest.raises(SystemExit):
        parse_config(ToyConfig, ["--help"], "A toy script.", defaults, prog="toy")
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: toy") and "how many (100% sure) (default: 7)" in text and "[--out OUT]" in text
    with pytest.raises(ConfigError, match="count must be at least 1"):
        parse_config(ToyConfig, ["a", "--count", "0"], defaults=defaults)


@pytest.mark.parametrize("argv, message", [
    (["--out", "o"], "the following arguments are required: inputs"),
    (["a"], "the following arguments are required: --out"),
    (["a", "--out", "o", "--colour", "green"], "invalid choice 'green' (choose from red, blue)"),
    (["a", "--out", "o", "--count", "many"], "invalid int value: 'many'"),
    (["a", "--out", "o", "--bbox", "1", "2"], "expected 4 arguments"),
    (["a", "--out", "o", "--span", "2ft"], "span '2ft' is not in metres (write e.g. 200m)"),
    (["a", "--out", "o", "--set", "novalue"], "expected KEY=VALUE, got 'novalue'"),
])
def test_deriver_refuses_bad_values(argv, message, capsys):
    parser = ArgumentParser(prog="toy")
    add_config_arguments(parser, ToyConfig)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(argv)
    err = capsys.readouterr().err
    assert_one_line_error(exit_.value.code, err)
    assert message in err


def test_derived_help_shows_help_defaults_and_choices(capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ToyConfig)
    text = " ".join(parser.format_help().split())
    for expected in ("--count COUNT how many (100% sure) (default: 3)", "--colour {red,blue} a colour (default: red)",
                     "--pretrained, --no-pretrained load weights (default: yes)", "--set KEY=VALUE",
                     "--bbox BBOX BBOX BBOX BBOX", "inputs input files"):
        assert expected in text


def test_messages_name_options_by_their_flags_where_they_differ():
    assert in_flag_words("max_size must be at least 1, like count", ToyConfig) == \
        "--max-size must be at least 1, like count"
    assert in_flag_words("extra and max_size clash", ToyConfig) == "--set and --max-size clash"
    # never inside quotes, paths, file names, placeholders or keyword arguments, nor the option's own help
    kept = "'max_size' in runs/max_size/x or max_size.json, <max_size>, f(max_size=2)"
    assert in_flag_words(kept, ToyConfig) == kept
    assert in_flag_words("at most max_size items", ToyConfig, skip="max_size") == "at most max_size items"
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ToyConfig)
    assert "at most max_size items, before --set (default: 8)" in " ".join(parser.format_help().split())


# ------------------------------------------------------------------------------------------------------ the jobs
def test_help_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "geolink.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for name, job in JOBS.items():
        assert name in result.stdout and job.help.split()[0] in result.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: geolink" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(JOBS))
def test_every_job_has_help(name, capsys):
    code, out, _ = run_cli(capsys, name, "--help")
    assert code == 0 and out.startswith(f"usage: geolink {name}")
    job = JOBS[name]
    if job.config is not None:
        first_paragraph = resolve(job.config).__doc__.strip().split("\n\n")[0]
        assert " ".join(first_paragraph.split()[:6]) in " ".join(out.split())


@pytest.mark.parametrize("name", CONFIG_JOBS)
def test_each_config_field_is_exactly_one_flag(name):
    config_class = resolve(JOBS[name].config)
    destinations = [action.dest for action in job_parser(JOBS[name])._actions if action.dest not in ("help", "debug")]
    fields = [item.name for item in dataclasses.fields(config_class) if item.init]
    assert sorted(destinations) == sorted(fields)


def test_info_prints_versions_and_registered_models(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"geolink {geolink.__version__}" in out and "torch " in out
    for name in geolink.list_models() + geolink.list_pretrained():
        assert name in out


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a_file.txt"
    path.write_text("not a folder")
    return path


# job -> (a missing input, a bad value); each a function of (tmp_path, fixture getter) giving the arguments
ERROR_CASES = {
    "build-graphs": (lambda tmp, fixture: ["--pbf", str(tmp / "missing.osm.pbf"), "--out", str(tmp / "o")],
                     lambda tmp, fixture: ["--vector", "x.geojson", "--workers", "0", "--out", str(tmp / "o")]),
    "tag-stats": (lambda tmp, fixture: [str(tmp / "missing.osm.pbf"), "--out", str(tmp / "t.json")],
                  lambda tmp, fixture: [str(tmp / "missing.osm.pbf"), "--out", str(tmp / "t.json"),
                                        "--min-count", "0"]),
    "make-pairs": (lambda tmp, fixture: ["--official-tiles", str(tmp / "missing"), "--out", str(tmp / "o"),
                                         "--text-model", str(fixture("minilm_path"))],
                   lambda tmp, fixture: ["--official-tiles", "tiles", "--text-model", "m", "--out", str(tmp / "o"),
                                         "--samples-per-shard", "0"]),
    "eval": (lambda tmp, fixture: ["knn", "--model", "geolink_tiny", "--data", str(tmp / "missing")],
             lambda tmp, fixture: ["knn", "--model", "geolink_tiny", "--data", str(tmp), "--k", "0"]),
    "pretrain": (lambda tmp, fixture: ["--data", str(tmp / "missing"), "--out", str(tmp / "o"), "--device", "cpu"],
                 lambda tmp, fixture: ["--out", str(tmp / "o"), "--batch-size", "0"]),
    "convert": (lambda tmp, fixture: [str(tmp / "missing.pth"), str(tmp / "o")],
                lambda tmp, fixture: [str(tmp / "missing.pth"), str(tmp / "o"), "--component", "everything"]),
    "demo": (lambda tmp, fixture: ["--out", str(_file(tmp) / "demo.png")],
             lambda tmp, fixture: ["--tile", "no_such_tile"]),
    "plot-metrics": (lambda tmp, fixture: [str(tmp / "missing" / "metrics.jsonl")],
                     lambda tmp, fixture: [str(_file(tmp))]),  # not JSON
    "info": (None, lambda tmp, fixture: ["--verbose"]),  # reads no file
    "explain": (lambda tmp, fixture: ["--image", str(tmp / "missing.jpg"), "--osm", str(tmp)],
                lambda tmp, fixture: ["--image", "tile.jpg", "--osm", "tile/", "--nodes", "0"]),
    "osm-qa": (lambda tmp, fixture: ["--image", str(tmp / "missing.jpg"), "--osm", str(tmp)],
               lambda tmp, fixture: ["--image", "tile.jpg", "--osm", "tile/", "--top-k", "-1"]),
    "retrieve": (lambda tmp, fixture: ["--pairs", str(tmp / "missing")],
                 lambda tmp, fixture: ["--k", "0"]),
    "embed": (lambda tmp, fixture: [str(tmp / "missing.tif"), "--osm", "none", "--out", str(tmp / "o.parquet")],
              lambda tmp, fixture: [str(tmp / "x.tif"), "--osm", "none", "--out", str(tmp / "o.parquet"),
                                    "--batch-size", "0"]),
    "tag-table": (lambda tmp, fixture: ["--from", str(tmp / "missing.osm.pbf"), "--text-model", "minilm", "--out",
                                        str(tmp / "t.safetensors")],
                  lambda tmp, fixture: ["--from", str(tmp), "--text-model", "minilm", "--out",
                                        str(tmp / "t.safetensors"), "--min-count", "0"]),
    "export": (lambda tmp, fixture: ["--model", str(tmp / "missing"), "--out", str(tmp / "o")],
               lambda tmp, fixture: ["--model", "geolink_tiny.demo", "--format", "tflite"]),
}


def test_error_cases_cover_every_job():
    assert set(ERROR_CASES) == set(JOBS)


@pytest.mark.parametrize("name, case", [(name, case) for name, cases in ERROR_CASES.items()
                                        for case, arguments in zip(("missing", "bad"), cases) if arguments])
def test_user_errors_are_one_line_and_exit_2(name, case, tmp_path, request, capsys):
    arguments = ERROR_CASES[name][0 if case == "missing" else 1]
    code, _, err = run_cli(capsys, name, *arguments(tmp_path, request.getfixturevalue))
    assert_one_line_error(code, err)
    if case == "missing":
        assert "missing" in err or "a_file.txt" in err


def test_one_line_error_and_debug_traceback_in_a_fresh_process(tmp_path):
    command = [sys.executable, "-m", "geolink.cli", "tag-stats", str(tmp_path / "missing.osm.pbf"), "--out",
               str(tmp_path / "t.json")]
    plain = subprocess.run(command, capture_output=True, text=True)
    assert_one_line_error(plain.returncode, plain.stderr)  # no warnings either: one line is all
    assert "missing.osm.pbf" in plain.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    env = {**os.environ, "GEOLINK_DEBUG": "1"}
    from_env = subprocess.run(command, capture_output=True, text=True, env=env)
    assert "Traceback (most recent call last)" in from_env.stderr


def test_debug_lets_the_exception_through(tmp_path):
    with pytest.raises(MissingInputError):
        main(["--debug", "eval", "knn", "--model", "geolink_tiny", "--data", str(tmp_path / "missing")])


def test_dict_results_are_printed_as_json(tmp_path, capsys):
    geojson = tmp_path / "a.geojson"
    geojson.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"building": "yes", "name": "x"},
         "geometry": {"type": "Point", "coordinates": [0.0, 0.0]}}]}))
    code, out, _ = run_cli(capsys, "tag-stats", str(geojson), "--out", str(tmp_path / "t.json"), "--quiet")
    assert code == 0 and json.loads(out)["keys"] == len(json.loads((tmp_path / "t.json").read_text()))


def test_warnings_are_one_line_on_the_command_line(tmp_path, capsys):
    from geolink.cli import main

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 1.0, "lr": 0.1, "samples_per_s": 2.0}\n{"step": 2, "lo')  # torn last line
    pytest.importorskip("matplotlib")
    assert main(["plot-metrics", str(metrics), "--out", str(tmp_path / "c.png")]) == 0
    warning_lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()]
    assert len(warning_lines) == 1
    assert warning_lines[0].startswith("warning: ") and "UserWarning" not in warning_lines[0]


def test_a_missing_optional_package_is_one_error_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    from geolink.cli import main

    monkeypatch.setitem(sys.modules, "osmium", None)  # import fails as when geolink[osm] is not installed
    assert main(["build-graphs", "--pbf", str(tmp_path / "region.osm.pbf"), "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: osmium is needed for this; install it with `pip install geolink[osm]`"]
