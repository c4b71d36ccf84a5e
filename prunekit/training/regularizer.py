"""A training-time penalty that drives whole channels of chosen layers to zero before pruning."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn

from prunekit.layers import conv_block, record_outputs, resolve_layers
from prunekit.training.losses import channel_loss, uncorrelation_loss, xor_loss

__all__ = ["ChannelRegularizer"]

_MAX_LISTED = 40


def _check_weight(name: str, value: float) -> float:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not valid or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite number >= 0 (0 disables the term)")
    return float(value)


def _listing(names: List[str]) -> str:
    shown = ", ".join(repr(name) if name == "" else name for name in names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... ({len(names) - _MAX_LISTED} more)"
    return shown


class ChannelRegularizer:
    """Weighted channel, xor and uncorrelation losses on the outputs of named layers.

    Forward hooks keep the latest output of each hooked module (any module,
    e.g. a ReLU after a conv or a whole encoder); :meth:`loss` turns them into

    ``sum over layers of channel_weight * channel_loss + xor_weight * xor_loss
    + uncorrelation_weight * uncorrelation_loss``

    (see :mod:`prunekit.training.losses`). Only the most recent forward is kept: a
    forward of ``model`` itself drops everything stored before, so tensors of
    older batches are never kept alive. If a hooked output is later modified in
    place (e.g. a conv followed by ``ReLU(inplace=True)``), the loss sees the
    modified values; hook the activation to make that explicit.

    Args:
        model: the model being trained.
        layers: module names (as in ``model.named_modules()``); ``None`` hooks the
            output module of every conv block (:func:`prunekit.layers.conv_block`).
        channel_weight: weight of :func:`~prunekit.training.losses.channel_loss`, >= 0.
        xor_weight: weight of :func:`~prunekit.training.losses.xor_loss`, >= 0.
        uncorrelation_weight: weight of :func:`~prunekit.training.losses.uncorrelation_loss`, >= 0.
        eps: the soft indicator's ``eps`` (> 0).

    Raises:
        KeyError: a layer name is not a module of ``model`` (the message lists valid names).
        ValueError: empty or repeated layer names, a negative weight, ``eps`` <= 0.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 3, 3))
        >>> optimizer = torch.optim.Adam(model.parameters())
        >>> with ChannelRegularizer(model, ["1"], channel_weight=1.0, xor_weight=1.0) as reg:
        ...     for _ in range(2):
        ...         images = torch.rand(4, 3, 16, 16)
        ...         task = model(images).pow(2).mean()
        ...         optimizer.zero_grad()
        ...         (task + reg.loss()).backward()
        ...         optimizer.step()
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Optional[Union[str, Iterable[str]]],
        channel_weight: float,
        xor_weight: float,
        uncorrelation_weight: float = 0.0,
        eps: float = 1e-5,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
        self.channel_weight = _check_weight("channel_weight", channel_weight)
        self.xor_weight = _check_weight("xor_weight", xor_weight)
        self.uncorrelation_weight = _check_weight("uncorrelation_weight", uncorrelation_weight)
        valid = isinstance(eps, (int, float)) and not isinstance(eps, bool)
        if not valid or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps={eps!r} must be a finite number > 0 (e.g. 1e-5)")
        self.eps = float(eps)
        self.layers = self._resolve(model, layers)
        self._outputs: Dict[str, Any] = {}
        self._handles: List[Any] = []
        self._removed = False
        try:
            # A new forward of the whole model starts a new batch: drop the old outputs.
            self._handles.append(model.register_forward_pre_hook(self._start_forward))
            self._handles += record_outputs(model, self.layers, self._outputs)  # the live tensors: the loss trains them
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _resolve(model: nn.Module, layers: Optional[Union[str, Iterable[str]]]) -> List[str]:
        if layers is None:
            return list(
                dict.fromkeys(conv_block(model, name).output_name for name in resolve_layers(model))
            )
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names:
            raise ValueError(
                "layers is empty; name at least one module, or pass None for every conv block"
            )
        modules = [name for name, _ in model.named_modules()]
        known = set(modules)
        seen = set()
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"layer names must be strings, got {name!r}")
            if name not in known:
                raise KeyError(f"unknown layer {name!r}; modules are: {_listing(modules)}")
            if name in seen:
                raise ValueError(f"layer {name!r} is named twice; name each layer once")
            seen.add(name)
        return names

    def _start_forward(self, module: nn.Module, inputs: Any) -> None:
        self._outputs.clear()

    def _features(self) -> Dict[str, Tensor]:
        if self._removed:
            raise RuntimeError("this ChannelRegularizer's hooks were removed; create a new one")
        if not self._outputs:
            raise RuntimeError(
                "no layer output recorded; run a forward pass of the model before calling loss()"
            )
        missing = [name for name in self.layers if name not in self._outputs]
        if missing:
            raise RuntimeError(
                f"layers {', '.join(missing)} did not run in the last forward pass; "
                "hook only layers the forward uses"
            )
        for name in self.layers:
            if not isinstance(self._outputs[name], Tensor):
                raise TypeError(
                    f"the output of {name!r} is a {type(self._outputs[name]).__name__}; "
                    "hook a module that returns a [B, C, H, W] or [B, C, L] tensor"
                )
        return {name: self._outputs[name] for name in self.layers}

    def loss(self) -> Tensor:
        """Weighted sum of the losses over the hooked layers, for the most recent forward.

        Terms with weight 0 are not computed. With every weight 0 the result is a
        zero attached to the graph.

        Raises:
            RuntimeError: no forward pass was recorded, or the hooks were removed.
        """
        features = self._features()
        total: Optional[Tensor] = None
        for feature in features.values():
            for weight, term in (
                (self.channel_weight, lambda f: channel_loss(f, self.eps)),
                (self.xor_weight, lambda f: xor_loss(f, self.eps)),
                (self.uncorrelation_weight, uncorrelation_loss),
            ):
                if weight > 0:
                    value = weight * term(feature)
                    total = value if total is None else total + value
        if total is None:
            total = next(iter(features.values())).sum() * 0.0
        return total

    def terms(self) -> Dict[str, float]:
        """Unweighted loss values per layer plus the weighted ``"total"``, as floats for logging.

        Keys are ``"channel/<layer>"``, ``"xor/<layer>"``, ``"uncorrelation/<layer>"``
        and ``"total"``. Every term is computed, whatever its weight; the
        uncorrelation term costs ``O(B * C^2 * H * W)``.
        """
        features = self._features()
        values: Dict[str, float] = {}
        total = 0.0
        with torch.no_grad():
            for name, feature in features.items():
                channel = channel_loss(feature, self.eps).item()
                xor = xor_loss(feature, self.eps).item()
                uncorrelation = uncorrelation_loss(feature).item()
                values[f"channel/{name}"] = channel
                values[f"xor/{name}"] = xor
                values[f"uncorrelation/{name}"] = uncorrelation
                total += (
                    self.channel_weight * channel
                    + self.xor_weight * xor
                    + self.uncorrelation_weight * uncorrelation
                )
        values["total"] = total
        return values

    def clear(self) -> None:
        """Drop the stored outputs (and the graph they hold) until the next forward."""
        self._outputs.clear()

    def remove(self) -> None:
        """Remove every hook and drop the stored outputs; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._outputs.clear()
        self._removed = True

    def __enter__(self) -> "ChannelRegularizer":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={self.layers}, channel_weight={self.channel_weight}, "
            f"xor_weight={self.xor_weight}, uncorrelation_weight={self.uncorrelation_weight}, "
            f"eps={self.eps})"
        )
