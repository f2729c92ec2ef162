"""Training over several processes: the global model under `torchrun`, one process per core or GPU.

torchrun starts the processes and tells each its place (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT); `Group.from_env` joins them into one process group: gloo on CPU, NCCL with one GPU per
process. Every process reads the data and holds the same model (DDP broadcasts rank 0's weights once,
then averages the gradients at every step). Each global batch of `batch_size` windows, drawn from the
same seeded permutation everywhere, is dealt out rank by rank (window i to rank i mod world), so the
ranks see disjoint shards, take the same number of steps, and the averaged gradient is that of the
whole batch, as in one process. Validation is sharded the same way and its sums all-reduced, so every
rank computes the same loss and all stop together. Outside torchrun (WORLD_SIZE unset) the group is one
process and every operation here is the identity.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

T = TypeVar("T")


def lead_process() -> bool:
    """True outside torchrun and on its rank 0: the one process that prints and publishes."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    """Processes in this torchrun job (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class _Replicated(DistributedDataParallel):
    """DDP that still answers the forecaster's own attributes (cfg, zero_state, loss), so the training
    loop takes the wrapped model where it takes a plain one; calls go through DDP's forward."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


class Group:
    """This process's place among the training processes, and the few collectives training needs."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None, owned: bool = False) -> None:
        self.rank, self.world = rank, world
        self.device = device or torch.device("cpu")
        self.owned = owned  # this object set the process group up, and closes it
        self.seen = 0  # training windows this process stepped on (its shards, every epoch)

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, timeout_s: float = 1800.0) -> Group:
        """The group torchrun started (one process without it). A process group set up by the caller
        (e.g. a test's, with a file rendezvous) is joined as it is."""
        if not dist.is_initialized() and world_size() <= 1:
            return cls()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        owned = not dist.is_initialized()
        if owned:
            if cuda:
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        elif dist.get_backend() != "nccl":
            device = torch.device("cpu")
        return cls(dist.get_rank(), dist.get_world_size(), device, owned)

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            # every rank tears the group down together: a rank that destroyed it while another (the lead,
            # still exporting) held its connections was once aborted at exit ("terminate called without an
            # active exception", SIGABRT) on a loaded 2-core machine
            if self.world > 1:
                dist.barrier()
            dist.destroy_process_group()

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model for the training steps: itself in one process, under DDP in several (which starts
        every rank from rank 0's weights). The scaler buffers never change, so they are not re-sent."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return _Replicated(model, device_ids=ids, forward_sync_buffers=False)

    def split(self, idx: Tensor) -> tuple[Tensor, float]:
        """This rank's share of a global batch, and the factor on its mean loss that makes DDP's average
        over the ranks the gradient of the whole batch's mean: (share size x world) / batch size. A rank
        left without a window (a last batch smaller than the world) steps on one window with factor 0."""
        mine = idx[self.rank :: self.world]
        if len(mine) == 0:
            return idx[:1], 0.0
        self.seen += len(mine)
        return mine, len(mine) * self.world / len(idx)

    def shard(self, n: int) -> Tensor:
        """Indices of this rank's share of n windows (validation)."""
        return torch.arange(self.rank, n, self.world)

    def place(self, *tensors: Tensor | None) -> tuple[Any, ...]:
        """The tensors on this process's device (None stays None)."""
        return tuple(None if t is None else t.to(self.device, non_blocking=True) for t in tensors)

    def sum(self, *values: float) -> list[float]:
        """The sums over the ranks (float64), the same on every rank."""
        if self.world == 1:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (the time budget: each rank has its own clock)."""
        return flag if self.world == 1 else self.sum(float(flag))[0] > 0

    def broadcast(self, obj: T) -> T:
        """Rank 0's object on every rank (what rank 0 alone computed, or decided against a clock)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]  # type: ignore[return-value]

    def gather(self, obj: T) -> list[T]:
        """Every rank's object, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
