"""Process-group setup for single-process, multi-GPU and multi-node runs launched with ``torchrun``.

Rank, world size, local rank and device come from :mod:`geolink.runtime` (``torchrun``'s ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; without them the run is a single process).
:class:`TorchDistributed` implements the collectives the pretraining losses need
(``geolink.models.pretrain.CrossRank``): an all-gather that keeps the local slice's gradient, and an all-reduce sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from geolink.runtime import local_rank, rank_and_world, resolve_device


@dataclass
class DistributedContext:
    """Where this process sits in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistributedContext:
    """Join the process group when launched by ``torchrun`` (NCCL on GPUs, Gloo on CPUs) and pick the device.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or None (CUDA when available); a CUDA device without an index
            is this process's local GPU.
    """
    rank, world_size = rank_and_world()
    local = local_rank()
    target = resolve_device(device)
    if target.type == "cuda":
        target = torch.device("cuda", local if target.index is None else target.index)
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local, device=target)


def shutdown_distributed() -> None:
    """Leave the process group (no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class TorchDistributed:
    """``CrossRank`` collectives on the default ``torch.distributed`` process group."""

    def __init__(self, context: DistributedContext) -> None:
        self.rank = context.rank
        self.world_size = context.world_size

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` per rank -> ``[world_size · B, ...]`` in rank order; gradients flow to every rank's slice."""
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous()), dim=0)

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (returns a new tensor, no gradient)."""
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total


def all_mean(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Average a tensor of metrics over ranks (identity for one process)."""
    if not context.enabled:
        return values
    total = values.detach().clone()
    dist.all_reduce(total)
    return total / context.world_size
