"""Fingerprints of a model's weights and of evaluation data: what a saved scan or fit was measured on.

A partial scan (``scan.json``) or plan fit (``fit.json``) is resumed only when the
weights and the data are the ones it was measured on: options alone cannot tell
that a weights file was overwritten between two runs.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = ["data_fingerprint", "model_fingerprint"]


def _update(digest: "hashlib._Hash", tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def model_fingerprint(model: nn.Module) -> str:
    """A SHA-256 digest (hex, 16 characters) of the model's state_dict: names, dtypes, shapes and bytes.

    Example:
        >>> a = nn.Linear(2, 2)
        >>> model_fingerprint(a) == model_fingerprint(a), len(model_fingerprint(a))
        (True, 16)
    """
    return _digest_items(model.state_dict())


def data_fingerprint(batches: Iterable[Any]) -> str:
    """A SHA-256 digest (hex, 16 characters) of every tensor in ``batches`` (inputs and labels), in order.

    Example:
        >>> x = torch.zeros(2, 3)
        >>> data_fingerprint([x]) == data_fingerprint([x.clone()]) != data_fingerprint([x + 1])
        True
    """
    digest = hashlib.sha256()
    for batch in batches:
        items = batch if isinstance(batch, (tuple, list)) else (batch,)
        for item in items:
            if isinstance(item, torch.Tensor):
                _update(digest, item)
            else:
                digest.update(repr(item).encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def _digest_items(items: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in items.items():
        digest.update(name.encode())
        _update(digest, tensor)
    return digest.hexdigest()[:16]
