"""The scan under torch.distributed: who this process is, and summing statistics over all of them.

prunekit never creates a process group: inside one the caller (or ``torchrun``
and the CLI) made, a scan shards its work by rank; outside any, it is the
whole job. Collectives run on float64 tensors, on the device the backend needs
(NCCL: this rank's CUDA device; gloo: the CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Tuple

from prunekit._lazy import lazy_module
from prunekit.messages import one_line

if TYPE_CHECKING:
    from torch import Tensor

torch = lazy_module("torch")  # the CLI reads its files through here before it needs torch

__all__ = ["all_reduce_sum", "is_main_process", "rank_and_world", "read_json_on_rank0", "unbind_group_defaults"]


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


def read_json_on_rank0(path: Any) -> Any:
    """The JSON in ``path`` as rank 0 reads it, on every rank (None: no such file); each file is read once.

    A file rank 0 cannot read (not JSON, too large, not a file) raises the same ``ValueError`` on every rank.
    """
    import os

    from prunekit.io.files import read_json

    box: list = [None]
    if is_main_process():
        try:
            box = [("ok", read_json(path) if os.path.lexists(path) else None)]
        except (ValueError, OSError) as err:
            box = [("error", one_line(str(err)))]
    if rank_and_world()[1] > 1:
        torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ValueError(value)
    return value


def unbind_group_defaults() -> None:
    """Import ``torch.distributed.nn`` and make its functions' ``group`` defaults ``None``, not the live group.

    ``torch.distributed.nn.functional`` binds ``group=group.WORLD`` when it is
    imported, and ``torch._dynamo`` imports it (fake tensors, ``torch.export``,
    ``torch.compile``). Imported inside a process group, those defaults keep the
    group alive past ``destroy_process_group()``: its gloo worker threads still
    run when Python shuts down, and one that frees a collective's tensors then
    takes the GIL and aborts the process ("terminate called without an active
    exception", SIGABRT), so torchrun reports a finished job as failed.
    ``None`` means the default group to those functions, so nothing else
    changes. Call it before anything that may import ``torch._dynamo``.

    Example:
        >>> unbind_group_defaults()
        >>> import torch.distributed.nn.functional as functional
        >>> functional.all_reduce.__defaults__[-1] is None
        True
    """
    import torch.distributed.nn.functional as functional

    world = torch.distributed.group.WORLD if _initialized() else None
    if world is None:
        return
    for value in vars(functional).values():
        defaults = getattr(value, "__defaults__", None)
        if defaults and any(default is world for default in defaults):
            value.__defaults__ = tuple(None if default is world else default for default in defaults)
