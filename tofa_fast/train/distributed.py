"""Multi-process training under ``torchrun`` (torch.distributed), SPEC §7 "scale-out".

How a step is split over R ranks:

* every rank draws the *same* subnets (the step's RNG is seeded by (seed, epoch), identical on all
  ranks — no communication needed);
* the global batch (``batch_size`` labelled + ``mu × batch_size`` unlabelled images, the same
  global index lists on every rank) is cut into R equal contiguous shards, one per rank;
* each rank back-propagates its shard through every subnet of the step, then the gradients are
  averaged with one all-reduce per step (flat buffer) before the optimizer step.

Every loss term is a mean over its batch, so the averaged gradient is the gradient of the global-
batch loss whenever the forward of one sample does not depend on the others of its batch. That
holds with frozen batch norm (``freeze_bn``) and no dropout/drop-connect: then R processes compute
the same weights as one process with the same global batch, up to float summation order (tested
in tests/test_train_distributed.py). With batch norm in training mode each rank normalises with its
shard's statistics (DDP without SyncBatchNorm does the same), so a run matches a single process
only statistically. In every configuration all ranks hold bit-identical weights (same averaged
gradient, same optimizer step); BN running statistics are averaged over ranks after each epoch.

Why not ``DistributedDataParallel``: a TOFA step runs up to four forward/backward passes through
different subnets of one module, with parameters (deeper layers) unused by some. DDP would need
``no_sync`` for all but the last pass and ``find_unused_parameters``; one explicit all-reduce of
the accumulated gradients after the last pass is simpler and moves the same bytes.

Only rank 0 writes (checkpoints, logs, palette); a resumed run loads the checkpoint on rank 0 and
broadcasts it, so ``--out`` need not be on a shared file system.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env(device: str | None) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else a single process.

    Returns the context and the device this rank trains on: ``cuda:LOCAL_RANK`` with NCCL when CUDA is
    available and ``device`` does not say otherwise, else the CPU with gloo.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        if device is not None and device != "cpu":
            raise ValueError(f"device {device!r} is not available on rank {rank}")
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if dist.get_world_size() != world:
        raise ValueError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return DistContext(rank, world, local_rank), dev


def shard(indices: list, ctx: DistContext) -> list:
    """This rank's contiguous share of a global batch (the global batch size must divide evenly)."""
    if not ctx.enabled:
        return indices
    per_rank = len(indices) // ctx.world_size
    return indices[ctx.rank * per_rank : (ctx.rank + 1) * per_rank]


def check_divisible(batch_size: int, ctx: DistContext) -> None:
    if ctx.enabled and batch_size % ctx.world_size:
        raise ValueError(
            f"batch_size ({batch_size}) is the global batch and must be divisible by the number of processes "
            f"({ctx.world_size})"
        )


def _all_reduce_mean(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    """Replace each tensor by its mean over ranks, in one all-reduce of a flat buffer."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(parameters: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """All-reduce the mean of the gradients.

    Parameters without a gradient (layers no subnet of this step used) are the same on every rank,
    because every rank trains the same subnets; they stay ``None`` so the optimizer skips them as in
    a single process."""
    if ctx.enabled:
        _all_reduce_mean([p.grad for p in parameters if p.grad is not None], ctx)


def average_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Average floating-point buffers (BN running statistics) over ranks, so all ranks agree."""
    if ctx.enabled:
        _all_reduce_mean([b for b in module.buffers() if b.is_floating_point()], ctx)


def _collective_device() -> torch.device:
    """Where small host values travel for a collective: NCCL only moves CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_scalars(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Mean of per-rank scalars (logged losses) over ranks; keys must match on every rank."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist())}


def all_reduce_max(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The element-wise maximum of a small CPU tensor over ranks (a CPU tensor)."""
    if not ctx.enabled:
        return values
    t = values.to(_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    box: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(box, obj)
    return box


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
