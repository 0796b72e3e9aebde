"""The GeoLink pretraining engine: ``geolink pretrain`` / ``geolink.train.run(TrainConfig(...))``.

One process or many (``torchrun``, DDP; the contrastive loss sees the global batch). Every step consumes a fixed,
seeded slice of an endless shuffled stream of samples, and every sample's masks are seeded by its position in that
stream, so a run is a pure function of its config: resuming reproduces the uninterrupted run, and N processes
reproduce one process with the same global batch.

Plain ``torch.distributed`` rather than Accelerate: the loop needs exactly DDP, autocast, a grad scaler and two
collectives, which are a few lines each here, while Accelerate would add a dependency and its own config system and
still leave the checkpoint format, the data position and the cross-rank loss to write.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from geolink.data.folders import OfficialPairFolder, read_jsonl  # graph.storage's, reached through data (DESIGN §2)
from geolink.data.pairs import PairShards, collate_pairs
from geolink.errors import ConfigError, DataError, MissingDependencyError, MissingInputError
from geolink.registry import create_model, nest_overrides
from geolink.runtime import (
    SAMPLE_SEED_STRIDE,
    autocast,
    epoch_seed,
    is_main_process,
    param_groups,
    rank_seed,
    resolve_precision,
)
from geolink.train.checkpoint import apply_checkpoint, complete_checkpoints, read_checkpoint, save_checkpoint
from geolink.train.config import RESUMABLE_CHANGES, TrainConfig
from geolink.train.distributed import (
    DistributedContext,
    TorchDistributed,
    all_mean,
    init_distributed,
    shutdown_distributed,
)

LOSS_TERMS = ("loss", "loss_mae", "loss_contrastive", "loss_consistency")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite (a training failure, not a user input error); the message names the step, the
    loss terms and the samples."""


class StreamPositions(Sampler[list[int]]):
    """Yields, for each micro-step from ``start_step`` on, the stream positions this rank reads.

    Position ``p`` is sample ``permutation_e[p mod N]`` of epoch ``e = p // N``, the permutation seeded by
    ``(seed, e)``; micro-step ``m`` of the run covers positions ``[m·G, (m+1)·G)`` with ``G = batch × world``,
    rank ``r`` the slice ``[m·G + r·batch, m·G + (r+1)·batch)``.
    """

    def __init__(self, batch_size: int, rank: int, world_size: int, start_micro_step: int, end_micro_step: int) -> None:
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.start, self.end = start_micro_step, end_micro_step

    def __iter__(self) -> Iterator[list[int]]:
        for micro_step in range(self.start, self.end):
            first = micro_step * self.batch_size * self.world_size + self.rank * self.batch_size
            yield list(range(first, first + self.batch_size))

    def __len__(self) -> int:
        return self.end - self.start


class StreamDataset(Dataset):
    """Maps a stream position to ``(image, graph, position)`` of the underlying dataset (see
    :class:`StreamPositions`)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self._permutations: dict[int, torch.Tensor] = {}

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._permutations = {epoch: torch.randperm(len(self.dataset), generator=generator)}
        return int(self._permutations[epoch][offset])

    def __getitem__(self, position: int):
        index = self.index(position)
        # pair shards take an augmentation draw: each visit of a sample gets its own, seeded by the position
        image, graph = self.dataset[index, position] if isinstance(self.dataset, PairShards) else self.dataset[index]
        return image, graph, position


def collate_stream(items):
    images, graphs = collate_pairs([(image, graph) for image, graph, _ in items])
    return images, graphs, torch.tensor([position for _, _, position in items], dtype=torch.long)


def open_dataset(spec: str) -> Dataset:
    """The training pairs named by ``TrainConfig.data``: ``bundled`` (the real pairs shipped in
    ``geolink/assets/pairs``), a pair-dataset folder or URL (``index.json``, see :mod:`geolink.data.shards`), or the
    official UFZ layout (``img/`` + ``graph/``). Pair datasets get the default training augmentation (224 × 224 crops).

    Raises:
        MissingInputError: ``spec`` is neither ``bundled``, a URL nor an existing folder.
    """
    if spec == "bundled":
        return PairShards(Path(__file__).parents[1] / "assets" / "pairs", transform="train")
    if "://" in spec:
        return PairShards(spec, transform="train")
    path = Path(spec)
    if not path.is_dir():
        raise MissingInputError(f"data {spec!r} is not a folder (pass a pair dataset with index.json, the official "
                                "layout img/ + graph/, or 'bundled')")
    if (path / "index.json").is_file():
        return PairShards(path, transform="train")
    return OfficialPairFolder(path)


class StepLog:
    """Per-step records of the steps since the last flush, kept on the device until :meth:`flush`.

    The training step never waits for the device: its loss terms and gradient norm stay device tensors, and the
    stream positions of its samples (known on the host, from the sampler) are kept next to them. Every ``log_every``
    steps, before a checkpoint and at the end, :meth:`flush` moves the window to the host in one transfer (one
    collective across ranks), refuses a non-finite loss naming its step and samples, and returns the records.
    """

    def __init__(self, context: DistributedContext, dataset: StreamDataset) -> None:
        self.context, self.dataset = context, dataset
        self.reset()

    def reset(self) -> None:
        """Start a new window (its throughput is timed from now)."""
        self.steps: list[int] = []
        self.lrs: list[float] = []
        self.positions: list[list[int]] = []
        self.values: list[torch.Tensor] = []  # [len(LOSS_TERMS) + 1] per step: loss terms, grad norm
        self.tick = time.perf_counter()

    def add(self, step: int, lr: float, terms: torch.Tensor, grad_norm: torch.Tensor, positions: list[int]) -> None:
        """Record optimisation step ``step`` (0-based): ``terms`` its mean loss terms on this rank, its samples."""
        self.steps.append(step)
        self.lrs.append(lr)
        self.positions.append(positions)
        self.values.append(torch.cat([terms, grad_norm.detach().float().reshape(1).to(terms.device)]))

    def flush(self, samples_per_step: int) -> list[dict]:
        """The metrics records of the recorded steps (loss terms averaged over ranks), then start a new window.

        ``samples_per_s`` is measured over the window (the device work of a step is only waited for here).

        Raises:
            NonFiniteLossError: naming the first step of the window with a NaN or infinite loss term, its terms and
                this rank's dataset samples of that step.
        """
        if not self.steps:
            return []
        local = torch.stack(self.values).cpu()  # the one wait for the device in the window
        terms = all_mean(local[:, : len(LOSS_TERMS)].to(self.context.device), self.context).cpu()
        bad_steps = (~torch.isfinite(terms)).any(dim=1).nonzero().flatten().tolist()
        if bad_steps:
            index = bad_steps[0]
            bad = [k for k, value in zip(LOSS_TERMS, local[index].tolist()) if not math.isfinite(value)]
            samples = [self.dataset.index(p) for p in self.positions[index]]
            raise NonFiniteLossError(f"non-finite loss at step {self.steps[index]}: "
                                     f"{', '.join(bad) or '(on another rank)'} = "
                                     f"{local[index, : len(LOSS_TERMS)].tolist()}; "
                                     f"dataset samples {samples}. Lower the learning rate, use bf16 instead of fp16, "
                                     "or check those samples.")
        now = time.perf_counter()
        rate = samples_per_step * len(self.steps) / max(now - self.tick, 1e-9)
        records = [{"step": step + 1, **dict(zip(LOSS_TERMS, row)), "lr": lr, "grad_norm": norm,
                    "samples_per_s": rate}
                   for step, lr, row, norm in zip(self.steps, self.lrs, terms.tolist(), local[:, -1].tolist())]
        self.reset()
        return records


def ddp_ignored_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters the pretraining loss never reads with this architecture, which data parallelism must
    not wait for: the OSM encoder's type attention when ``type_weighting="sum"`` (the official ViT-L setting).

    Every other parameter takes part in every step, so DDP runs with ``find_unused_parameters=False``.
    """
    osm = getattr(model, "osm_encoder", None)
    if osm is not None and osm.type_weighting == "sum":
        prefix = next(name for name, module in model.named_modules() if module is osm.type_attention)
        return [f"{prefix}.{name}" for name, _ in osm.type_attention.named_parameters()]
    return []


def make_optimizer(model: torch.nn.Module, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.95) over :func:`~geolink.runtime.param_groups`; the fused CUDA kernel when every
    parameter is on a GPU (one kernel launch for the whole update), the default implementation otherwise."""
    groups = param_groups(model, weight_decay)
    fused = all(p.is_cuda for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), fused=fused or None)


# what a run writes into its out folder; ``overwrite`` moves these aside
RUN_ENTRIES = ("metrics.jsonl", "checkpoints", "final", "tensorboard")


def prepare_run_folder(config: TrainConfig, context: DistributedContext) -> None:
    """Never reuse a run folder silently: one that holds a run needs ``resume`` (continue it) or ``overwrite`` (move
    it to ``<out>/previous-<n>/`` and start again).

    Raises:
        ConfigError: ``config.out`` holds a run and neither ``resume`` nor ``overwrite`` is set.
    """
    existing = [name for name in RUN_ENTRIES if (config.out / name).exists()]
    if context.enabled:
        torch.distributed.barrier()  # every rank has looked before rank 0 moves anything
    if not existing or config.resume:
        return
    if not config.overwrite:
        raise ConfigError(f"out folder {config.out} already holds a run ({', '.join(existing)}); pass resume=True to "
                          "continue it, or overwrite=True to start again (the old run is moved to "
                          f"{config.out}/previous-<n>/), or choose another out folder")
    if context.is_main:
        taken = [int(p.name.removeprefix("previous-")) for p in config.out.glob("previous-*")
                 if p.name.removeprefix("previous-").isdigit()]
        aside = config.out / f"previous-{max(taken, default=0) + 1}"
        aside.mkdir()
        for name in existing:
            os.replace(config.out / name, aside / name)
        warnings.warn(f"overwrite=True: the previous run in {config.out} was moved to {aside}", UserWarning,
                      stacklevel=2)
    if context.enabled:
        torch.distributed.barrier()


def check_same_run(checkpoint: Path, state: dict, config: TrainConfig, context: DistributedContext) -> None:
    """Refuse to resume the run saved in ``checkpoint`` with settings that shape the run differently.

    Raises:
        ConfigError: a setting outside ``RESUMABLE_CHANGES`` or the world size differs.
    """
    saved, current = state["config"], config.to_dict()
    changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
    if changed or state["world_size"] != context.world_size:
        hint = (f"; max_steps sets the cosine learning-rate schedule of every step, so a resumed run keeps it "
                f"(resume with max_steps={saved.get('max_steps')}); to train longer, start a new run with "
                "overwrite=True or another out folder" if "max_steps" in changed else "")
        raise ConfigError(f"resume from {checkpoint} with a different run: {changed or 'world size'} changed "
                          f"(saved {[saved.get(k) for k in changed] or state['world_size']}){hint}; "
                          "use a new out folder for a different run")


def resume_state(config: TrainConfig, model, optimizer, scaler, context) -> int:
    """Load the newest complete, readable checkpoint of ``config.out`` when resuming; returns the step to start
    from. A damaged checkpoint (truncated weights, corrupt optimizer state) is skipped with a warning naming it.

    Raises:
        ConfigError: the checkpoint belongs to a run with other settings (see ``RESUMABLE_CHANGES``).
        DataError: there are checkpoints but none is readable.
    """
    folder = config.out / "checkpoints"
    damaged = []
    for checkpoint in complete_checkpoints(folder) if config.resume else []:
        try:
            content, problem = read_checkpoint(checkpoint, optimizer=True, rank=context.rank), None
        except DataError as error:
            content, problem = None, error
        readable = torch.tensor([float(problem is None)], device=context.device)
        if all_mean(readable, context).item() < 1:  # every rank resumes from the same checkpoint
            warnings.warn(f"{problem or f'checkpoint {checkpoint} is damaged on another rank'}; trying the previous "
                          "checkpoint", UserWarning, stacklevel=2)
            damaged.append(checkpoint.name)
            continue
        check_same_run(checkpoint, content["state"], config, context)
        state = apply_checkpoint(content, checkpoint, model, optimizer)
        scaler.load_state_dict(state["scaler"])
        if damaged:
            warnings.warn(f"resuming from {checkpoint} (damaged: {', '.join(damaged)})", UserWarning, stacklevel=2)
        return int(state["step"])
    if damaged:
        raise DataError(f"no checkpoint in {folder} can be read (damaged: {', '.join(damaged)}); restore one, or "
                        "start again with overwrite=True instead of resume=True (the old run is moved aside)")
    return 0


def tensorboard_writer(run_dir: Path):
    """A TensorBoard writer logging under ``<run_dir>/tensorboard``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise MissingDependencyError("tensorboard=True needs the tensorboard package: pip install tensorboard"
                                     ) from error
    return SummaryWriter(str(run_dir / "tensorboard"))


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric records after ``step`` (steps a killed run logged after its last checkpoint are redone), and a
    torn last line (a kill in the middle of a write, dropped with a warning by
    :func:`~geolink.graph.storage.read_jsonl`); the file is replaced atomically.

    Raises:
        DataError: a line other than the last is not a JSON record.
    """
    if not path.is_file():
        return
    kept = [record for record in read_jsonl(path, "metrics file")
            if isinstance(record, dict) and record.get("step", math.inf) <= step]
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text("".join(json.dumps(record) + "\n" for record in kept))
    os.replace(staging, path)


def train(config: TrainConfig) -> Path:
    """Run (or resume) pretraining; returns the folder of the final ``save_pretrained`` model."""
    context = init_distributed(config.device)
    run_dir = config.out
    prepare_run_folder(config, context)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = create_model(config.arch, **nest_overrides(config.overrides)).to(context.device).train()
    model.set_grad_checkpointing(config.grad_checkpointing)
    optimizer = make_optimizer(model, config.weight_decay)
    dtype = resolve_precision(config.precision, context.device)
    scaler = torch.amp.GradScaler(context.device.type, enabled=dtype == torch.float16)
    torch.manual_seed(rank_seed(config.seed, context.rank))  # this rank's dropout stream; a resume restores its state
    start = resume_state(config, model, optimizer, scaler, context)
    if context.is_main:
        keep_metrics_until(run_dir / "metrics.jsonl", start)
    data = StreamDataset(open_dataset(config.data), config.seed)
    sampler = StreamPositions(config.batch_size, context.rank, context.world_size, start * config.accum_steps,
                              config.max_steps * config.accum_steps)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate_stream, num_workers=config.num_workers,
                        generator=torch.Generator().manual_seed(config.seed))  # leaves the global RNG alone
    engine = model
    if context.enabled:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ddp_ignored_parameters(model))
        engine = DistributedDataParallel(model, find_unused_parameters=False)
    if config.compile:
        engine = torch.compile(engine)
    cross_rank = TorchDistributed(context) if context.enabled else None
    metrics = open(run_dir / "metrics.jsonl", "a") if context.is_main else None  # noqa: SIM115 (closed below)
    board = tensorboard_writer(run_dir) if context.is_main and config.tensorboard else None
    progress = tqdm(total=config.max_steps, initial=start, disable=not context.is_main, desc="pretrain")
    batches, log = iter(loader), StepLog(context, data)
    for step in range(start, config.max_steps):
        lr = config.lr_at(step, context.world_size)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals = torch.zeros(len(LOSS_TERMS), device=context.device)
        step_positions: list[int] = []
        for micro in range(config.accum_steps):
            images, graphs, positions = next(batches)
            images, graphs = images.to(context.device, non_blocking=True), graphs.to(context.device)
            sync = engine.no_sync() if context.enabled and micro < config.accum_steps - 1 else nullcontext()
            with sync, autocast(context.device, dtype):
                # the datasets validate what they decode, so the step skips the models' input checks (host syncs)
                out = engine(images, graphs, sample_seeds=positions + config.seed * SAMPLE_SEED_STRIDE,
                             cross_rank=cross_rank, validate=False)
            with sync:
                scaler.scale(out["loss"] / config.accum_steps).backward()
            # no host sync in the step: the terms stay on the device until the log window is flushed
            totals += torch.stack([out[k].detach().float() for k in LOSS_TERMS]) / config.accum_steps
            step_positions += positions.tolist()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        log.add(step, lr, totals, grad_norm, step_positions)
        progress.update(1)
        saving = (step + 1) % config.save_every == 0 or step + 1 == config.max_steps
        if (step + 1) % config.log_every == 0 or saving:
            # a non-finite loss is refused here, before any checkpoint could store its weights
            records = log.flush(config.global_batch(context.world_size))
            for record in records:
                if metrics:
                    metrics.write(json.dumps(record) + "\n")
                if board:
                    for key, value in record.items():
                        if key != "step":
                            board.add_scalar(f"pretrain/{key}", value, record["step"])
            if metrics:
                metrics.flush()
            record = records[-1]
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.1f}")
        if saving:
            save_checkpoint(run_dir / "checkpoints", step + 1, model, optimizer, scaler.state_dict(), config.to_dict(),
                            context.rank, context.world_size, config.keep_checkpoints)
    progress.close()
    final = run_dir / "final"
    if context.is_main:
        metrics.close()
        if board:
            board.close()
        model.eval().save_pretrained(final)
        if config.push_to_hub:
            model.push_to_hub(config.push_to_hub)
    shutdown_distributed()
    return final


def run(config: TrainConfig) -> int:
    """Train with ``config`` and report where the results are; returns the exit code."""
    config.out.mkdir(parents=True, exist_ok=True)
    final = train(config)
    if is_main_process():
        print(f"metrics: {config.out / 'metrics.jsonl'}\nfinal model: {final}")
    return 0
