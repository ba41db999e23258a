"""`mace erase` and `mace cache` over several processes, with torch.distributed.

``torchrun --nproc-per-node N -m mace erase CONFIG`` (or ``accelerate launch``, which sets the
same environment variables) starts N processes, the ranks. Each does its share of what is
independent; the d x d statistics of the closed-form stages are summed over ranks, rank 0
solves and writes, the others wait and read what it wrote when they need it:

    prepare   concepts split over ranks, each generates its own concepts' images and masks
    refine    prompt pairs split over ranks; C_oo, C_no summed (all_reduce); rank 0 solves, saves
    train     concepts split over ranks, each trains its concepts batched as in one process
    fuse      (concept, prompt batch) units split over ranks; sum C_i and the LoRA term summed;
              rank 0 solves and saves
    report    rank 0
    cache     prompts split over ranks, each with a partial file of its own; rank 0 writes

A share is a contiguous block of the items in their order, by global rank, so several nodes
work as one (the local rank only picks the CUDA device). The backend is gloo on the CPU and
nccl on CUDA. Without torchrun's environment (or with one process) nothing here initialises
torch.distributed and every helper is the single-process identity.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Ranks wait for each other's share (a rank resuming with little left waits for the others'
# LoRA training), so a collective may wait for hours before the others arrive.
TIMEOUT = timedelta(hours=24)


class RankFailedError(RuntimeError):
    """Rank 0 failed in work the other ranks were waiting for."""


def launched() -> bool:
    """This process is one of several that torchrun (or accelerate launch) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """A process group of more than one rank is initialised: collectives take place."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """The global rank: the process group's, else torchrun's ``RANK``, else 0."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of ranks: the process group's, else torchrun's ``WORLD_SIZE``, else 1."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 (also the only process of a single-process run): the rank that solves and writes."""
    return rank() == 0


def local_device(device: str | torch.device | None) -> str | torch.device | None:
    """The device of this rank: under torchrun a CUDA device becomes ``cuda:LOCAL_RANK``;
    anything else (and everything in a single-process run) is returned as given."""
    if device is None or not launched() or torch.device(device).type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Initialise the process group from torchrun's environment (``env://``) if this process is
    one of several and none exists yet; True when a process group of several ranks is ready.

    gloo when ``device`` is a CPU (or None), nccl on CUDA (each rank on ``cuda:LOCAL_RANK``).
    The group lives until the process exits, so later commands in the same process use it
    (a destroyed group cannot be initialised again from the same rendezvous).
    """
    if not launched() or dist.is_initialized():
        return is_distributed()
    kwargs: dict[str, Any] = {}
    if device is not None and torch.device(device).type == "cuda":
        backend = "nccl"
        kwargs["device_id"] = local_device("cuda")
        torch.cuda.set_device(kwargs["device_id"])
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=TIMEOUT, **kwargs)
    atexit.register(_destroy)
    return is_distributed()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: a contiguous block; the blocks in rank order cover every
    item once and differ in size by at most one. All of ``items`` in a single-process run."""
    items = list(items)
    if not is_distributed():
        return items
    n, size, r = len(items), world_size(), rank()
    return items[r * n // size:(r + 1) * n // size]


def _communication_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, on every rank, on ``tensor``'s device (in place when
    that is the backend's device). ``tensor`` itself in a single-process run."""
    if not is_distributed():
        return tensor
    device = _communication_device()
    moved = tensor if tensor.device == device else tensor.to(device)
    dist.all_reduce(moved)
    return moved if moved is tensor else moved.to(tensor.device)


def sum_over_ranks(value: int) -> int:
    """The sum of an integer (a count) over ranks; also a point where every rank has arrived."""
    return int(all_reduce_sum(torch.tensor([value], dtype=torch.int64)).item())


def combine_statistics(stats) -> bool:
    """Sum a closed-form statistics object (``closed_form.RefinementStatistics``,
    ``FusionStatistics`` or the reference paths' accumulators) over ranks, in place; True on
    the rank that solves (rank 0, the only one in a single-process run)."""
    if is_distributed():
        stats.reduce_sums(all_reduce_sum)
    return is_main()


def agree(value: T) -> T:
    """Rank 0's ``value`` on every rank: decisions that choose which collectives follow (is a
    stage done?) must be the same on all ranks."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_dicts(part: dict) -> dict:
    """Every rank's ``part`` merged in rank order (shards are contiguous, so this is the
    order of the items); ``part`` in a single-process run."""
    if not is_distributed():
        return dict(part)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, part)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 while the other ranks wait (a barrier): its result on rank 0, None
    elsewhere. An exception on rank 0 is raised there and, as ``RankFailedError``, on every
    other rank, so none waits forever."""
    if not is_distributed():
        return fn()
    result, failure = None, None
    if is_main():
        try:
            result = fn()
        except Exception as err:  # raised again below, after the others know
            failure = err
    message = agree(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if message is not None:
        raise RankFailedError(f"rank 0 failed: {message}")
    return result


def barrier() -> None:
    """Wait until every rank is here (nothing in a single-process run)."""
    if is_distributed():
        dist.barrier()


def show_progress(progress: bool) -> bool:
    """Progress bars only on rank 0 (one bar, not one per rank)."""
    return progress and is_main()


def print_summary(line: str) -> None:
    """Print a command's one-line summary once: on rank 0 (torchrun's ``RANK`` when no
    process group was initialised)."""
    if is_main():
        print(line, flush=True)
