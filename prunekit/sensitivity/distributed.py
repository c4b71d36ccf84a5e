"""The scan under torch.distributed: who this process is, and summing statistics over all of them.

prunekit never creates a process group: inside one the caller (or ``torchrun``
and the CLI) made, a scan shards its work by rank; outside any, it is the
whole job. Collectives run on float64 tensors, on the device the backend needs
(NCCL: this rank's CUDA device; gloo: the CPU).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["all_reduce_sum", "is_main_process", "rank_and_world"]


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` outside one."""
    if not _initialized():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main_process() -> bool:
    """True on rank 0, and outside any process group: the process that writes, prints and shows progress."""
    return rank_and_world()[0] == 0


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(local: Optional[Tensor]) -> Optional[Tensor]:
    """The element-wise sum of every rank's ``local``, flattened (float64, CPU); ``None`` where every rank had none.

    A rank with no data (more ranks than batches) passes ``None``; the length is
    agreed on first, so every rank joins the same collectives.
    """
    if not _initialized() or torch.distributed.get_world_size() == 1:
        return None if local is None else local.detach().double().reshape(-1).cpu()
    device = _collective_device()
    size = torch.tensor([-1 if local is None else local.numel()], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
    count = int(size.item())
    if count < 0:
        return None
    values = torch.zeros(count, dtype=torch.float64, device=device)
    if local is not None:
        values += local.detach().double().reshape(-1).to(device)
    torch.distributed.all_reduce(values)
    return values.cpu()
