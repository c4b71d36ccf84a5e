"""State_dict files: read safely, checked against a model, loaded.

Files are read with ``torch.load(..., weights_only=True)`` (or as prunekit's sparse
format, recognised by its magic bytes); a ``{"state_dict": ...}`` wrapper is
unwrapped, a ``module.`` prefix (DataParallel) stripped, and pruning
reparametrizations left by ``torch.nn.utils.prune`` (``weight_orig`` +
``weight_mask``) folded into ``weight = weight_orig * weight_mask``, so a state_dict
saved from a pruned model loads into a plain one. A mismatch lists the first few
missing, unexpected and misshapen keys.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from prunekit.io.files import PathLike
from prunekit.io.sparse import is_sparse_file, load_sparse

__all__ = ["PickledObjectError", "load_state", "load_weights", "read_torch_file", "sparse_limit"]

_SHOW = 5  # keys listed per kind in a state_dict mismatch message


def read_torch_file(path: Path, what: str) -> Any:
    """``torch.load`` with ``weights_only=True``, turning every failure into an error naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch words a damaged or non-torch file ("Unsupported operand") the same
        # way as a real pickled model: only a named global means the latter.
        found = _unsafe_globals(path, err)
        if found:
            detail = f" (it pickles {found[0]})"
            raise PickledObjectError(
                f"{what} {str(path)!r} holds pickled Python objects{detail} that "
                "torch.load(weights_only=True) refuses"
            ) from None
        # torch's own text here advises weights_only=False, the wrong advice for
        # a file that is damaged or not a checkpoint at all.
        raise ValueError(
            f"{what} {str(path)!r} is not a readable PyTorch checkpoint (damaged, or another kind of file); "
            "pass a file written by torch.save or prunekit"
        ) from None
    except Exception as err:  # zip/pickle readers raise RuntimeError, KeyError, EOFError, ...
        raise ValueError(
            f"{what} {str(path)!r} is not a readable PyTorch file ({type(err).__name__}: {err})"
        ) from None


def _unsafe_globals(path: Path, err: BaseException) -> List[str]:
    """The Python objects (``module.name``) a torch file pickles beyond plain tensors; [] for a damaged file.

    torch >= 2.5 answers directly (``get_unsafe_globals_in_checkpoint``); older torch only
    says so in the text of its error, which is read as the fallback.
    """
    asker = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if asker is not None:
        try:
            return list(asker(path))
        except Exception:  # not a zip checkpoint (a legacy or damaged file): read the error instead
            pass
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return [found.group(1)] if "weights only load failed" in str(err).lower() and found else []


class PickledObjectError(ValueError):
    """A torch file needs full unpickling (``weights_only=False``) to be read."""


def _as_state_dict(obj: Any, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(
            f"{str(path)!r} does not hold a state_dict (a dict of tensors); it holds {type(obj).__name__}"
        )
    bad = [key for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{str(path)!r} is not a state_dict: {len(bad)} entries are not tensors "
            f"(e.g. {', '.join(map(repr, bad[:_SHOW]))})"
        )
    return dict(obj)


def _adapt_keys(state: Dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip a DataParallel ``module.`` prefix and fold ``*_orig * *_mask`` pairs the model does not have."""
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module."):]: v for k, v in state.items()}
    folded = dict(state)
    for key in list(state):
        if not key.endswith("_orig") or key in expected:
            continue
        base = key[: -len("_orig")]
        mask = state.get(base + "_mask")
        if mask is not None and base not in state:
            folded[base] = state[key] * mask
            del folded[key], folded[base + "_mask"]
    # BatchNorm fills in a missing counter itself in older state_dicts; do the same.
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in folded:
            folded[key] = torch.zeros_like(value)
    return folded


def _mismatch_message(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Optional[str]:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    parts = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}")
    return "; ".join(parts) or None


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a state_dict file into ``model`` strictly (safe: ``weights_only=True``) and return the model.

    Accepts a plain state_dict, a ``{"state_dict": ...}`` wrapper (such as a prunekit
    checkpoint), a ``module.`` prefix, and ``weight_orig``/``weight_mask`` pairs from
    ``torch.nn.utils.prune`` (folded to ``weight_orig * weight_mask``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state_dict, or its keys/shapes do not match
            ``model`` (the message lists the first few of each).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3))
        >>> torch.save(model.state_dict(), "w.pt")
        >>> load_weights(model, "w.pt")
        Sequential(
          (0): Conv2d(1, 2, kernel_size=(3, 3), stride=(1, 1))
        )
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"weights file {str(target)!r} is a folder; name the state_dict file inside it")
    if not target.is_file():
        raise FileNotFoundError(f"weights file {str(target)!r} not found")
    if is_sparse_file(target):
        state = load_sparse(target, max_bytes=sparse_limit(model))
        return load_state(model, dict(state), target)
    try:
        obj = read_torch_file(target, "weights file")
    except PickledObjectError as err:
        raise ValueError(
            f"{err}; --weights needs a state_dict (torch.save(model.state_dict(), path)). "
            "A whole pickled model can be loaded as --model PATH --trust-checkpoint if you trust it"
        ) from None
    return load_state(model, obj, target)


def load_state(model: nn.Module, obj: Any, path: Path) -> nn.Module:
    expected = model.state_dict()
    state = _adapt_keys(_as_state_dict(obj, path), expected)
    problem = _mismatch_message(state, expected)
    if problem is not None:
        raise ValueError(
            f"weights {str(path)!r} do not fit {type(model).__name__}: {problem}. "
            "Check that the weights were saved from this architecture (e.g. vgg16 weights do not fit vgg19)"
        )
    model.load_state_dict(state, strict=True)
    return model



def sparse_limit(model: nn.Module) -> int:
    """The most bytes a sparse file loaded into ``model`` may decode: the model's own state, plus slack for masks."""
    return 2 * sum(t.numel() * t.element_size() for t in model.state_dict().values()) + (1 << 20)


def load_shipped_digits_weights(model: nn.Module, path: Path, num_classes: int, rebuild: str) -> nn.Module:
    """Load the trained digits weights shipped in ``path`` into ``model`` (10 classes); ``rebuild`` is the command that writes them.

    Raises:
        ValueError: ``num_classes`` is not 10.
        FileNotFoundError: the file is missing (the message gives ``rebuild``).
    """
    if num_classes != 10:
        raise ValueError(f"the shipped digits weights have 10 classes, not num_classes={num_classes}")
    if not path.is_file():
        raise FileNotFoundError(f"shipped weights {str(path)!r} not found; reinstall prunekit or regenerate them with: {rebuild}")
    return load_weights(model, path)
