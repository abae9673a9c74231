"""Data-parallel training under ``torchrun``: the process group, each rank's device, batch norm
over the global batch, and the reductions the trainer needs.

``torchrun --nproc_per_node N -m modalstore train CONFIG`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; ``process_group`` joins them (gloo on CPU, NCCL on
CUDA) and every rank trains on ``cuda:LOCAL_RANK`` (or the CPU). Without those variables, or
with ``WORLD_SIZE=1``, nothing is initialised and training is the plain single-process loop.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from features.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place: global rank, number of processes, rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def env_world() -> World:
    """The world torchrun describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (default: one process)."""
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        raw = os.environ.get(name, str(default))
        try:
            values[name] = int(raw)
        except ValueError:
            raise ConfigError(
                f"environment variable {name}={raw!r} is not an integer (set by torchrun)"
            ) from None
    world = World(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise ConfigError(f"RANK={world.rank} with WORLD_SIZE={world.size}: need 0 <= RANK < WORLD_SIZE")
    return world


def current_world() -> World:
    """The initialised process group's world, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), env_world().local_rank)
    return World()


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join torchrun's processes for the duration (when ``WORLD_SIZE > 1``), then leave.

    ``device``: the configured one; CUDA selects NCCL and ``cuda:LOCAL_RANK``, anything else
    gloo. A group initialised by the caller is used as it is and left alone.
    """
    if dist.is_available() and dist.is_initialized():
        yield current_world()
        return
    world = env_world()
    if not world.distributed:
        yield world
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield world
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """A CUDA device becomes ``cuda:LOCAL_RANK`` when distributed: one GPU per process."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


class _AllSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks (every rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch across all ranks.

    ``nn.SyncBatchNorm`` does this on CUDA only; this one reduces (sum, sum of squared
    deviations, count) with autograd-aware all-reduces, so it works on gloo and CPU too and
    gives the single-process result for the concatenated batch. A global batch of one
    sample normalises with the running statistics (like ``encoders.Standardize``).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(
                f"GlobalBatchNorm: expected (batch, features, ...) input, got shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return self._local(x)
        dims = [0, *range(2, x.dim())]  # every axis but the features'
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
        xf = x.float()
        total = _AllSum.apply(torch.cat([xf.sum(dims), count]))  # (features + 1,)
        n = total[-1]
        if n.item() < 2:
            return self._fallback(x)
        mean = total[:-1] / n
        sq = _AllSum.apply(((xf - mean.view(shape)) ** 2).sum(dims))
        var = sq / n  # biased, used to normalise; the running estimate is unbiased
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1))
        y = (xf - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2:
            return self._fallback(x)
        return super().forward(x)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Every batch-norm layer of ``module`` replaced by a ``GlobalBatchNorm`` with its state.

    Parameter and buffer names are unchanged, so state dicts load either way.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            global_batchnorm(child)
    return module


def sum_across(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (the values themselves on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_predictions(result: dict) -> dict:
    """``evaluate.predict`` results of every rank merged, each key once (padding dropped)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return result
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, result)
    seen: set[str] = set()
    keep = []  # per rank: indices of the keys not seen on an earlier rank or index
    for part in parts:
        idx = [i for i, key in enumerate(part["keys"]) if not (key in seen or seen.add(key))]
        keep.append(torch.tensor(idx, dtype=torch.long))
    merged = {"keys": [part["keys"][i] for part, idx in zip(parts, keep, strict=True) for i in idx.tolist()]}
    for name, value in result.items():
        if isinstance(value, torch.Tensor):
            merged[name] = torch.cat([part[name][idx] for part, idx in zip(parts, keep, strict=True)])
    return merged


def broadcast(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
