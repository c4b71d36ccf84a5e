"""A checkpoint on the command line: loading a command's CHECKPOINT argument, and the spec a saved model records."""

from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING, Optional

from prunekit._lazy import lazy_module

if TYPE_CHECKING:
    from torch import nn

torch = lazy_module("torch")  # imported when a command runs, not for -h or an argument error

__all__ = ["architecture", "compacted_architecture", "load_checkpoint_argument"]


def architecture(spec: str) -> str:
    """The spec that rebuilds ``spec``'s architecture, for ``save_checkpoint``."""
    from prunekit.io.sparse import is_sparse_file, read_sparse_header
    from prunekit.models.zoo import is_factory_spec, is_model_name

    if is_model_name(spec) or is_factory_spec(spec):
        return spec.strip()
    if is_sparse_file(spec):
        arch = read_sparse_header(spec).get("arch")
    else:
        obj = None
        # Memory-mapped first: only the "arch" string is read, not the (already loaded) weights again;
        # a legacy (non-zip) file cannot be mapped and is read whole.
        for mmap in (True, False):
            try:
                obj = torch.load(spec, map_location="cpu", weights_only=True, mmap=mmap)
                break
            except Exception:
                continue
        arch = obj.get("arch") if isinstance(obj, dict) else None
    if isinstance(arch, str):
        return arch
    raise ValueError(
        f"--model {spec} does not record its architecture (a pickled model), so the pruned model "
        "cannot be saved as a prunekit checkpoint; pass --model as a VGG name or "
        "package.module:factory with --weights PATH"
    )


def compacted_architecture(path: str) -> Optional[str]:
    """The architecture a compacted checkpoint (:mod:`prunekit.io.compacted`) came from; None for any other input."""
    from prunekit.io.compacted import is_compacted_checkpoint
    from prunekit.io.sparse import is_sparse_file

    if not os.path.isfile(path) or is_sparse_file(path):
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a file this reads: the loader says why
        return None
    arch = obj.get("arch") if is_compacted_checkpoint(obj) else None
    return arch if isinstance(arch, str) else None


def load_checkpoint_argument(command: str, checkpoint: str, weights: Optional[str], trust_checkpoint: bool) -> nn.Module:
    """Load a command's CHECKPOINT argument (a file, or a model spec with ``--weights``).

    The library words its hints for ``--model``/``--weights``; here the model is the
    positional CHECKPOINT, so the hint says so.
    """
    from prunekit.models.zoo import RecordedFactoryError, load_model

    try:
        return load_model(checkpoint, weights, trust_checkpoint=trust_checkpoint, progress=False,
                          factory_folder=os.getcwd())
    except RecordedFactoryError as err:
        raise ValueError(
            f"checkpoint {err.path} asks to build its model with {err.arch}, which imports and runs code named by "
            f"the file; pass --trust-checkpoint if you trust it, or type the architecture yourself: prunekit "
            f"{command} {err.arch} --weights {shlex.quote(err.path)}"
        ) from None
    except ValueError as err:
        message = str(err)
        if "as --model and the file as --weights" not in message:
            raise
        head = message.split("; pass the architecture")[0]
        raise ValueError(
            f"{head}; pass the architecture as CHECKPOINT and the file as --weights, e.g. "
            f"prunekit {command} vgg16 --weights {checkpoint}"
        ) from None
