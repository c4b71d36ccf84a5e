"""What every command run shares: status lines (rank 0, not with ``--quiet``) and the torchrun process group."""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

import click

from prunekit._lazy import lazy_module

torch = lazy_module("torch")  # imported when a command runs, not for -h or an argument error

__all__ = ["DEFAULT_TIMEOUT", "process_group", "status"]


def status(quiet: bool, message: str) -> None:
    """A status line on stderr (rank 0 only; none with ``--quiet``)."""
    from prunekit.sensitivity.distributed import is_main_process

    if not quiet and is_main_process():
        click.echo(message, err=True)


#: Seconds a rank waits for the others in one collective before failing (torch's default is 30 minutes).
DEFAULT_TIMEOUT = 600


@contextlib.contextmanager
def process_group(device: "torch.device", timeout: float = DEFAULT_TIMEOUT) -> Iterator["torch.device"]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join its process group for the command, and leave it after.

    The ``env://`` variables torchrun sets say where to meet; CPU ranks use gloo,
    CUDA ranks NCCL on ``cuda:LOCAL_RANK``. A group the caller made is used as is.
    A rank that stops answering (killed, stopped) fails the others after ``timeout`` seconds.
    The group is gone when the block ends (its gloo threads joined), whatever the
    command imported meanwhile (see :func:`~prunekit.sensitivity.distributed.unbind_group_defaults`).
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        yield device
        return
    backend = "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(device)
        backend = "nccl"
    from prunekit.sensitivity.distributed import unbind_group_defaults

    unbind_group_defaults()  # imported before the group exists, torch binds no group as a default
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()
