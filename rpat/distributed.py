"""Data-parallel training: one cell on N processes whose result equals one process's (docs/distributed.md).

A training job with ``resources.processes: N`` runs N ranks (``rpat train --processes N``, rpat/launch.py;
or ``torchrun``, or ``srun`` with one task per rank). Each rank reads its place from the environment
(:func:`world_from_env`) and trains on its share of every *global* batch. What makes the result depend on the
seed and not on N:

- **Random draws.** Every rank draws every random number of the global batch (its order, augmentations,
  CutMix, the attacks' random starts) from generators in the same state, then keeps its own rows
  (:class:`Shard`, :func:`draw`). The generators never diverge, so a state saved by rank 0 is every rank's.
- **BatchNorm.** Statistics of every train-mode forward are those of the global batch (:func:`sync_batchnorm`:
  torch's ``SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` on the CPU, where torch's refuses to run). That
  covers the loss's forwards, the attack's forwards when its BatchNorm policy is ``train``, and ReBAT's
  clean re-forward, so the running statistics follow one process's rule: one update per train-mode
  forward, with the global batch's mean and unbiased variance.
- **Gradients.** Each rank's loss is a mean over its rows; scaled by ``world x rows / global rows``
  (:meth:`Shard.loss_scale`), DDP's gradient average is the global batch's mean gradient. AWP's direction,
  computed on a proxy outside DDP, is reduced the same way (:func:`mean_over_ranks`).
- **Averages and teachers** (EMA, SWA, ReBAT's teacher) update from identical weights, so they are identical.

Only rank 0 writes files and talks to MLflow; loss sums are reduced over ranks; a stop signal on any rank
becomes every rank's at the same step (:func:`agree`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from rpat.processes import DistributedSetupError, World, bounds

def rank_device(world: World, device: torch.device) -> torch.device:
    """Rank r of a node uses GPU r (``LOCAL_RANK``); on the CPU every rank shares the device."""
    if device.type != "cuda" or not world.distributed:
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise DistributedSetupError(
            f"rank {world.rank} is local rank {world.local_rank} but this node shows {torch.cuda.device_count()} "
            "GPU(s); run at most one process per GPU (resources.processes / resources.nodes <= GPUs per node)")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


_CONTROL = None  # a gloo group for CPU flags (stop signals), so agreeing never synchronises a GPU stream


def init(world: World, device: torch.device, timeout_s: float = 1800) -> None:
    """Join the job's process group (NCCL on GPUs, gloo on the CPU); a no-op for one process."""
    global _CONTROL
    if not world.distributed or dist.is_initialized():
        return
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise DistributedSetupError(f"rank {world.rank} of {world.size}: {key} is not set, so the ranks cannot "
                                        "meet; launch with `rpat train --processes N`, torchrun or rpat's srun launch")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=timedelta(seconds=timeout_s),
                            **kwargs)
    _CONTROL = dist.new_group(backend="gloo") if backend != "gloo" else None


def shutdown() -> None:
    global _CONTROL
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier(group=_CONTROL)


# ---------------------------------------------------------------------------------------------
# This rank's rows of a global batch


@dataclass(frozen=True)
class Shard:
    """The rows of one global batch a rank trains on: ``rows`` index the global batch of ``total`` rows
    (for ``views`` > 1, the same images' rows in every view block, so a view pair stays on one rank)."""

    rows: torch.Tensor
    total: int
    size: int

    @classmethod
    def of(cls, total: int, views: int, world: World, device: torch.device | str = "cpu") -> "Shard":
        per_view = total // views
        lo, hi = bounds(per_view, world.rank, world.size)
        rows = torch.cat([torch.arange(v * per_view + lo, v * per_view + hi) for v in range(views)])
        return cls(rows.to(device), total, world.size)

    @property
    def weight(self) -> float:
        """This rank's share of the global batch's mean."""
        return len(self.rows) / self.total

    @property
    def loss_scale(self) -> float:
        """Multiplies this rank's mean loss so that DDP's gradient average (sum / world) is the global mean's."""
        return self.size * len(self.rows) / self.total


_STEP: Shard | None = None  # the shard of the training step in progress (random draws follow it)


@contextlib.contextmanager
def step(shard: Shard | None) -> Iterator[None]:
    """Within this block, :func:`draw` and :func:`mean_over_ranks` act for ``shard``'s rows."""
    global _STEP
    previous, _STEP = _STEP, shard
    try:
        yield
    finally:
        _STEP = previous


def loss_scale() -> float:
    """What this rank's mean loss is multiplied by before backward (1 outside a distributed step)."""
    return _STEP.loss_scale if _STEP is not None else 1.0


def draw(fn: Callable, shape: Sequence[int], **kwargs) -> torch.Tensor:
    """``fn(shape, **kwargs)`` (torch.rand, torch.randn, ...) as one process draws it: inside a training step of a
    distributed run, the draw for the whole global batch, of which this rank keeps its rows."""
    if _STEP is None:
        return fn(tuple(shape), **kwargs)
    if shape[0] != len(_STEP.rows):
        raise RuntimeError(f"a random draw for {shape[0]} rows inside a step whose shard holds {len(_STEP.rows)}: "
                           "draws must be shaped like the step's batch to be split over ranks")
    full = fn((_STEP.total, *shape[1:]), **kwargs)
    rows = _STEP.rows if _STEP.rows.device == full.device else _STEP.rows.to(full.device)
    return full.index_select(0, rows)


def mean_over_ranks(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The global batch's mean gradient from each rank's mean gradient (``None``: zeros like ``like``):
    sum over ranks of weight x gradient, in one all-reduce."""
    filled = [t if t is not None else torch.zeros_like(w) for t, w in zip(tensors, like)]
    if _STEP is None or not active():
        return filled
    flat = torch.cat([t.reshape(-1) for t in filled]).mul_(_STEP.weight)
    dist.all_reduce(flat)
    out, at = [], 0
    for t in filled:
        out.append(flat[at:at + t.numel()].view_as(t))
        at += t.numel()
    return out


class ShardedBatches:
    """A loader's global batches, cut to this rank's rows: same length, order and draws as the loader itself."""

    def __init__(self, batches, views: int, world: World):
        self.inner, self.views, self.world = batches, views, world
        self.device = batches.x.device  # rows held where the batches are: no copy per step
        self._shards: dict[int, Shard] = {}  # by the global batch's rows: the full batch and the last one

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def examples(self) -> int:
        return self.inner.examples

    def new_order(self):
        return self.inner.new_order()

    def shard(self, total: int) -> Shard:
        if total not in self._shards:
            self._shards[total] = Shard.of(total, self.views, self.world, self.device)
        return self._shards[total]

    def iterate(self, order, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, Shard]]:
        for x, y in self.inner.iterate(order, start):
            s = self.shard(len(y))
            yield x.index_select(0, s.rows), y.index_select(0, s.rows), s


# ---------------------------------------------------------------------------------------------
# Reductions of what every rank accumulated


def sum_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each named scalar summed over ranks (one all-reduce)."""
    if not active() or not values:
        return values
    keys = sorted(values)
    flat = torch.stack([values[k].reshape(()) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat.unbind()))


def first_bad_step(bad_step: torch.Tensor) -> torch.Tensor:
    """The earliest step any rank saw a non-finite loss at (-1: none)."""
    if not active():
        return bad_step
    big = torch.iinfo(bad_step.dtype).max
    t = torch.where(bad_step < 0, torch.full_like(bad_step, big), bad_step).clone()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return torch.where(t == big, torch.full_like(t, -1), t)


def agree(flag: bool) -> bool:
    """True on every rank when it is true on any (a stop signal reaches the ranks at different steps)."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL)
    return bool(t.item())


# ---------------------------------------------------------------------------------------------
# BatchNorm over the global batch


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the incoming gradients over ranks too: d(sum_r L_r)/d(local input)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode statistics are the global batch's, on any device (torch's SyncBatchNorm
    runs on GPUs only). Mean, then the biased variance sum((x - mean)^2) / n for normalising, each one
    differentiable all-reduce; running statistics as ``nn.BatchNorm2d``: momentum (or the cumulative
    average when it is None) with the unbiased variance x n / (n - 1). Eval mode and one process: plain BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = (0, 2, 3)
        if x.dtype in (torch.bfloat16, torch.float16):  # statistics in float32, as BatchNorm under autocast
            x = x.float()
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        totals = _SumOverRanks.apply(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = x - mean[None, :, None, None]
        var = _SumOverRanks.apply(centred.pow(2).sum(dims)) / n
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        out = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - m).add_(mean, alpha=m)
        self.running_var.mul_(1 - m).add_(var * n / (n - 1), alpha=m)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``model`` computing global-batch statistics (weights and buffers kept)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                 child.track_running_stats, device=device, dtype=_dtype_of(child))
            bn.load_state_dict(child.state_dict())
            setattr(model, name, bn)
        else:
            sync_batchnorm(child, device)
    return model


def _dtype_of(module: nn.Module) -> torch.dtype:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()
