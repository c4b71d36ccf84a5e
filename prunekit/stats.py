"""Per-channel activation statistics of conv layers: how strongly and how often each channel fires.

For every conv layer (and every ``nn.Linear`` named) the response is read at the end of its conv block (after
the activation, see :func:`prunekit.layers.conv_block`) and summarised per
channel: the mean per-image l2 norm (``l2``), the fraction of images in which
the channel fires at all (``l0``) and the images x channels firing map
(``per_image_l0``), the "channel response per image" picture of *Compact Image
Style Transfer: Channel Pruning on a Single Training of Network* (Sensors 2022).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit._rollback import restore_training, training_flags
from prunekit.io.files import PathLike, read_json, write_json
from prunekit.layers import CHANNEL_LAYER_TYPES, conv_block, output_channels, resolve_layers
from prunekit.defaults import CRITERIA, check_criterion
from prunekit.plotting import new_figure, save_png
from prunekit.progress import progress_bar
from prunekit.layers import model_device

__all__ = [
    "CRITERIA",
    "ChannelStats",
    "collect_channel_stats",
    "load_channel_stats",
    "plot_channel_magnitudes",
    "plot_channel_response",
    "save_channel_stats",
]

#: Names accepted by :meth:`ChannelStats.score`.


@dataclass
class ChannelStats:
    """Activation statistics of one conv layer's ``C`` output channels over ``N`` images.

    Attributes:
        l2: float32 ``[C]``, mean over images of the l2 norm of the channel's response map.
        l0: float32 ``[C]`` in ``[0, 1]``, fraction of images in which the channel fires
            (its response map is not all zero).
        per_image_l0: uint8 ``[N, C]`` of 0/1, 1 where channel ``c`` fires on image ``n``
            (a bool tensor is accepted and stored as uint8).
        num_images: ``N``.

    Example:
        >>> stats = ChannelStats(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]),
        ...                      torch.tensor([[1, 0]], dtype=torch.uint8), 1)
        >>> stats.score("l0").tolist()
        [1.0, 0.0]
    """

    l2: Tensor
    l0: Tensor
    per_image_l0: Tensor
    num_images: int

    def __post_init__(self) -> None:
        for field in ("l2", "l0", "per_image_l0"):
            if not isinstance(getattr(self, field), Tensor):
                raise TypeError(
                    f"ChannelStats.{field} must be a torch.Tensor, "
                    f"got {type(getattr(self, field)).__name__}"
                )
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int):
            raise TypeError(f"num_images must be an int, got {self.num_images!r}")
        if self.num_images < 1:
            raise ValueError(f"num_images={self.num_images} must be >= 1")
        if self.l2.ndim != 1 or self.l0.shape != self.l2.shape:
            raise ValueError(
                f"l2 and l0 must be 1-D tensors of the same length [C], "
                f"got shapes {tuple(self.l2.shape)} and {tuple(self.l0.shape)}"
            )
        if tuple(self.per_image_l0.shape) != (self.num_images, self.l2.numel()):
            raise ValueError(
                f"per_image_l0 must have shape [num_images, C] = "
                f"[{self.num_images}, {self.l2.numel()}], got {tuple(self.per_image_l0.shape)}"
            )
        self.l2 = self.l2.detach().to(torch.float32)
        self.l0 = self.l0.detach().to(torch.float32)
        self.per_image_l0 = self.per_image_l0.detach().to(torch.uint8)

    def __repr__(self) -> str:
        never = int((self.l0 == 0).sum())
        return (
            f"ChannelStats(num_images={self.num_images}, num_channels={self.num_channels}, "
            f"never_fire={never}, mean_l2={self.l2.mean().item():.4g})"
        )

    @property
    def num_channels(self) -> int:
        """Number of channels ``C``."""
        return self.l2.numel()

    def score(self, criterion: str = "l2") -> Tensor:
        """Return the per-channel importance ``[C]`` for ``criterion``; low means prunable.

        Args:
            criterion: "l2" (mean response norm) or "l0" (firing frequency).

        Raises:
            ValueError: unknown criterion.
        """
        return (self.l2 if check_criterion(criterion) == "l2" else self.l0).clone()

    def to_dict(self) -> Dict[str, Any]:
        """Plain-Python form (lists and ints) for JSON; :meth:`from_dict` reverses it."""
        return {
            "num_images": self.num_images,
            "l2": self.l2.tolist(),
            "l0": self.l0.tolist(),
            "per_image_l0": self.per_image_l0.tolist(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ChannelStats":
        """Rebuild stats from :meth:`to_dict` output.

        Raises:
            KeyError: a field is missing.
            ValueError: the fields have inconsistent shapes.
        """
        missing = [key for key in ("num_images", "l2", "l0", "per_image_l0") if key not in data]
        if missing:
            raise KeyError(
                f"channel stats are missing {', '.join(missing)}; "
                "expected the output of ChannelStats.to_dict()"
            )
        num_images = int(data["num_images"])
        num_channels = len(data["l2"])
        per_image = torch.tensor(data["per_image_l0"], dtype=torch.uint8)
        if per_image.numel() == 0:
            per_image = per_image.reshape(num_images, num_channels)
        return cls(
            l2=torch.tensor(data["l2"], dtype=torch.float32),
            l0=torch.tensor(data["l0"], dtype=torch.float32),
            per_image_l0=per_image,
            num_images=num_images,
        )


class _LayerAccumulator:
    """Running sums for one conv layer, fed by a forward hook."""

    def __init__(self, name: str, num_channels: int, channels_last: bool = False) -> None:
        self.name = name
        self.num_channels = num_channels
        self.channels_last = channels_last
        self.l2_sum = torch.zeros(num_channels, dtype=torch.float64)
        self.fire_count = torch.zeros(num_channels, dtype=torch.int64)
        self.per_image: List[Tensor] = []
        self.num_images = 0
        self.calls = 0

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        # Measured inside the hook, before any later in-place op (e.g. a
        # ReLU(inplace=True) after a conv) can overwrite the tensor.
        self.calls += 1
        if not isinstance(output, Tensor):
            raise TypeError(
                f"the output of {self.name!r} is a {type(output).__name__}, not a Tensor; "
                "collect_channel_stats needs a [N, C, H, W] tensor response"
            )
        if self.channels_last:  # an nn.Linear: [N, ..., C], every position of an image counts
            if output.ndim < 2 or output.shape[-1] != self.num_channels:
                raise ValueError(
                    f"expected a batched [N, ..., {self.num_channels}] response for the Linear {self.name!r}, "
                    f"got shape {tuple(output.shape)}; pass batched inputs"
                )
            flat = output.detach().reshape(output.shape[0], -1, self.num_channels).transpose(1, 2)
        elif output.ndim != 4 or output.shape[1] != self.num_channels:
            raise ValueError(
                f"expected a batched [N, {self.num_channels}, H, W] response for {self.name!r}, "
                f"got shape {tuple(output.shape)}; pass batched [N, C, H, W] inputs"
            )
        else:
            flat = output.detach().flatten(2)
        norms = torch.linalg.vector_norm(flat.double(), dim=2)
        fires = (flat != 0).any(dim=2)
        self.l2_sum += norms.sum(dim=0).cpu()
        self.fire_count += fires.sum(dim=0).cpu()
        self.per_image.append(fires.to(torch.uint8).cpu())
        self.num_images += flat.shape[0]

    def result(self) -> ChannelStats:
        return ChannelStats(
            l2=(self.l2_sum / self.num_images).float(),
            l0=(self.fire_count.double() / self.num_images).float(),
            per_image_l0=torch.cat(self.per_image),
            num_images=self.num_images,
        )


class _InProjection:
    """An attention's response: its query, key and value projections of the query it is given, [N, ..., 3 * E]."""

    def __init__(self, accumulator: _LayerAccumulator) -> None:
        self.accumulator = accumulator

    def __call__(self, module: nn.Module, args: Any, kwargs: Dict[str, Any], output: Any) -> None:
        query = args[0] if args else kwargs.get("query")
        if not isinstance(query, Tensor):
            raise TypeError(f"the attention {self.accumulator.name!r} was called without a query tensor")
        if query.dim() == 3 and not module.batch_first:
            query = query.transpose(0, 1)  # [L, N, E] -> [N, L, E]: each image's tokens together
        self.accumulator(module, args, F.linear(query, module.in_proj_weight, module.in_proj_bias))


def _batch_input(batch: Any, index: int) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    kind = "dict" if isinstance(batch, Mapping) else type(batch).__name__
    raise TypeError(
        f"batch {index} is a {kind}; data must yield input tensors or (input, target, ...) "
        "tuples/lists whose first element is the input tensor"
    )


def collect_channel_stats(
    model: nn.Module,
    data: Iterable[Any],
    layers: Optional[Iterable[str]] = None,
    max_batches: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
) -> "OrderedDict[str, ChannelStats]":
    """Run ``data`` through ``model`` and measure each conv layer's per-channel response.

    The response is read at the conv block's output module
    (:func:`prunekit.layers.conv_block`): the activation after the conv, else
    its BatchNorm, else the conv itself. Where no activation module follows
    the conv inside an ``nn.Sequential`` (e.g. ``F.relu`` in a custom
    ``forward``), the raw block output is measured. The model runs in eval
    mode under ``torch.no_grad()``; the train/eval flag of every submodule is
    restored and the hooks removed afterwards, also on error. Only running
    sums and the small ``[N, C]`` firing map are kept, not activations.

    Args:
        model: any module containing ``Conv2d`` layers; it is not moved.
        data: iterable of batches: tensors, or tuples/lists whose first element is the input.
        layers: conv (or ``nn.Linear``) layer names to measure; ``None`` measures every conv. A
            Linear's response is ``[N, ..., C]`` (channels last): each image's norm runs over
            every position (token, pixel) of its channel. An ``nn.MultiheadAttention``'s response is
            its query, key and value projections of its query, ``[N, tokens, 3 * embed_dim]``: a head
            responds through its rows.
        max_batches: stop after this many batches (``None``: all of ``data``).
        device: where inputs are sent; defaults to the device of the model's parameters.
        progress: show a progress bar on stderr.

    Returns:
        ``OrderedDict`` conv name -> :class:`ChannelStats`, in conv order.

    Raises:
        KeyError: a name in ``layers`` is not a conv layer (the message lists them).
        TypeError: a batch is not a tensor or (input, ...) tuple/list.
        ValueError: ``data`` is empty or ``max_batches`` < 1.
        RuntimeError: a measured module did not run exactly once per batch.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> stats = collect_channel_stats(model, [torch.randn(2, 3, 8, 8)])
        >>> stats["0"].l0.shape
        torch.Size([4])
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches={max_batches!r} must be an int >= 1 or None")
    convs = resolve_layers(model, layers, CHANNEL_LAYER_TYPES, default_types=(nn.Conv2d,))
    device = torch.device(device) if device is not None else model_device(model)

    accumulators = OrderedDict(
        (name, _LayerAccumulator(name, output_channels(layer), not isinstance(layer, nn.Conv2d)))
        for name, layer in convs.items()
    )
    flags = training_flags(model)
    handles = []
    try:
        for name, acc in accumulators.items():
            if isinstance(convs[name], nn.MultiheadAttention):
                handles.append(convs[name].register_forward_hook(_InProjection(acc), with_kwargs=True))
            else:
                handles.append(conv_block(model, name).output_module.register_forward_hook(acc))
        model.eval()
        length = max_batches
        if length is None and hasattr(data, "__len__"):
            length = len(data)  # type: ignore[arg-type]
        elif length is not None and hasattr(data, "__len__"):
            length = min(length, len(data))  # type: ignore[arg-type]
        num_batches = 0
        with torch.no_grad(), progress_bar(length or 0, "collecting channel stats", progress) as tick:
            for index, batch in enumerate(data):
                if max_batches is not None and index >= max_batches:
                    break
                inputs = _batch_input(batch, index).to(device)
                for acc in accumulators.values():
                    acc.calls = 0
                model(inputs)
                for acc in accumulators.values():
                    if acc.calls != 1:
                        raise RuntimeError(
                            f"the response module of {acc.name!r} ran {acc.calls} times in one "
                            "forward pass; each measured conv block must run exactly once per "
                            "batch (give shared activation modules one instance per conv, or "
                            "pass layers= to skip this one)"
                        )
                num_batches += 1
                tick()
    finally:
        for handle in handles:
            handle.remove()
        restore_training(flags)
    if num_batches == 0:
        raise ValueError("data yielded no batches; pass at least one batch of inputs")
    return OrderedDict((name, acc.result()) for name, acc in accumulators.items())


def save_channel_stats(stats: Mapping[str, ChannelStats], path: PathLike) -> None:
    """Write ``{layer: ChannelStats}`` to ``path`` as JSON, atomically.

    Read it back with :func:`load_channel_stats`.
    """
    write_json(path, {"channel_stats": {name: s.to_dict() for name, s in stats.items()}})


def load_channel_stats(path: PathLike) -> "OrderedDict[str, ChannelStats]":
    """Read stats written by :func:`save_channel_stats`.

    Raises:
        ValueError: the file is not a channel stats file.
    """
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get("channel_stats"), dict):
        raise ValueError(
            f"{str(path)!r} is not a channel stats file (no 'channel_stats' object); "
            "write it with prunekit.stats.save_channel_stats"
        )
    return OrderedDict(
        (name, ChannelStats.from_dict(entry)) for name, entry in content["channel_stats"].items()
    )



def plot_channel_response(
    stats: ChannelStats, path: PathLike, title: Optional[str] = None
) -> None:
    """Write the images x channels firing map of ``stats`` as a PNG (white: fires, black: never).

    Raises:
        ImportError: matplotlib is not installed.
    """
    fig = new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    ax.imshow(
        stats.per_image_l0.numpy(),
        cmap="gray",
        vmin=0,
        vmax=1,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_xlabel("channel")
    ax.set_ylabel("image")
    dead = int((stats.l0 == 0).sum())
    ax.set_title(
        title
        or f"channel response per image ({dead}/{stats.num_channels} channels never fire)"
    )
    save_png(fig, path)


def plot_channel_magnitudes(
    stats_by_label: Mapping[str, ChannelStats], path: PathLike, title: Optional[str] = None
) -> None:
    """Write a PNG of each label's per-channel ``l2``, sorted decreasingly, one line per label.

    Useful to compare a layer trained with and without the channel regularizer.

    Raises:
        ValueError: ``stats_by_label`` is empty.
        ImportError: matplotlib is not installed.
    """
    if not stats_by_label:
        raise ValueError("stats_by_label is empty; pass at least one {label: ChannelStats}")
    fig = new_figure(6.4, 4.0)
    ax = fig.add_subplot()
    for label, stats in stats_by_label.items():
        values = torch.sort(stats.l2, descending=True).values
        ax.plot(range(1, values.numel() + 1), values.numpy(), label=str(label))
    ax.set_xlabel("channel rank")
    ax.set_ylabel("mean l2 norm of response")
    ax.set_title(title or "channel magnitudes, sorted")
    ax.legend()
    save_png(fig, path)
