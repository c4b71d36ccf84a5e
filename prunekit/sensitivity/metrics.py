"""Built-in scan metrics: output distortion against the dense model, and classification accuracy.

``scan`` accepts any ``evaluate(model) -> float``. The metrics here are
:class:`ForwardMetric` objects: besides being callable, they say which inputs
they feed the model and how a score follows from the outputs, so the scanner
can run only the layers after the pruned one (see ``prunekit.sensitivity.scanner``)
and get the same score as a full forward.
"""

from __future__ import annotations

import abc
import contextlib
import math
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from prunekit._rollback import eval_mode
from prunekit.layers import captured_outputs, get_module, model_device

from prunekit.measure.error import relative_distance, relative_error  # noqa: F401  (part of this module's API)

__all__ = [
    "Accuracy",
    "ForwardMetric",
    "MODEL_OUTPUT",
    "OutputDistortion",
    "ZeroOutputWarning",
    "model_device",
    "output_tensor",
    "relative_distance",
    "relative_error",
]

#: Key of the model's own output in the ``outputs`` mapping a metric receives.
MODEL_OUTPUT = ""


class ForwardMetric(abc.ABC):
    """A score computed from the model's outputs on fixed batches.

    Subclasses give the batches (:meth:`batches`), a per-batch additive statistic
    (:meth:`batch_statistics`) and the final reduction (:meth:`reduce`). Calling
    the metric runs full forwards; ``scan`` may instead feed the same
    statistics from a partial forward, which is why scores must depend only on
    the outputs named in :attr:`capture`.

    Attributes:
        name: short name shown in tables and files (``"accuracy"``).
        higher_is_better: the direction of the score.
        capture: module names whose outputs the score reads; ``""`` is the model output.
    """

    name: str = "score"
    higher_is_better: bool = True
    capture: Tuple[str, ...] = (MODEL_OUTPUT,)

    def prepare(self, model: nn.Module) -> None:
        """Called by ``scan`` on the dense model before any pruning (e.g. to record references)."""

    def num_batches(self) -> Optional[int]:
        """How many batches :meth:`batches` yields, when known without running them (a settling scan needs it)."""
        return None

    @abc.abstractmethod
    def batches(self, device: torch.device) -> Iterator[Tuple[Tensor, Any]]:
        """Yield ``(model input on device, target)``: the same batches, in the same order, every time."""

    @abc.abstractmethod
    def batch_statistics(self, outputs: Mapping[str, Tensor], target: Any) -> Tensor:
        """Return a 1-D float64 tensor of sums for one batch; totals over batches go to :meth:`reduce`.

        ``outputs`` maps the names of :attr:`capture` to their outputs for this
        batch. A name may be absent: its output then equals the dense model's
        (the pruned layer comes after it), which a metric must treat as such.
        """

    @abc.abstractmethod
    def reduce(self, totals: Tensor) -> float:
        """Turn the summed statistics of all batches into the score."""

    def best_final_score(self, partial: Tensor) -> Optional[float]:
        """The best score all batches together can still give, from the summed statistics of those seen so far.

        Not an estimate: a bound that holds whatever the batches left hold. A plan fit stops a
        trial as soon as even this bound breaks the tolerance (the verdict is then certain).
        ``None`` where the metric cannot bound it (the default).
        """
        return None

    def statistics(self, model: nn.Module, shard: Tuple[int, int] = (0, 1)) -> Optional[Tensor]:
        """Summed :meth:`batch_statistics` of full forwards over one shard of the batches (None: no batch).

        Args:
            shard: ``(index, count)``: batch ``b`` is used when ``b % count == index``
                (``(rank, world_size)`` under torch.distributed; ``(0, 1)``: every batch).
        """
        totals: Optional[Tensor] = None
        for _, stats in self.each_batch(model, shard):
            if stats is not None:
                totals = stats if totals is None else totals + stats
        return totals

    def each_batch(self, model: nn.Module, shard: Tuple[int, int] = (0, 1)) -> Iterator[Tuple[int, Optional[Tensor]]]:
        """``(batch number, its statistics)`` for every batch, from full forwards; ``None`` for another shard's batch.

        The model runs in eval mode (BatchNorm must not update its statistics, dropout must not
        drop) without gradients; its flags are restored when the iteration ends or is abandoned.
        """
        index, count = shard
        device = model_device(model)
        with torch.no_grad(), eval_mode(model), _captured(model, self.capture) as captured:
            for number, (inputs, target) in enumerate(self.batches(device)):
                if number % count != index:
                    yield number, None
                    continue
                captured.clear()
                output = model(inputs)
                outputs = dict(captured)
                if MODEL_OUTPUT in self.capture:
                    outputs[MODEL_OUTPUT] = output
                yield number, self.batch_statistics(outputs, target)

    def __call__(self, model: nn.Module) -> float:
        """Score ``model`` with full forwards (under ``torch.no_grad()``)."""
        totals = self.statistics(model)
        if totals is None:
            raise ValueError(f"{type(self).__name__} has no batch to evaluate; pass at least one")
        return self.reduce(totals)

    def __repr__(self) -> str:
        direction = "higher" if self.higher_is_better else "lower"
        return f"{type(self).__name__}(name={self.name!r}, {direction} is better)"


@contextlib.contextmanager
def _captured(model: nn.Module, names: Sequence[str]) -> Iterator[Dict[str, Tensor]]:
    """Record (a copy of) the output of each named submodule while the block runs; hooks removed after."""
    # A copy, since an in-place op further on (ReLU(inplace=True)) may overwrite it.
    with captured_outputs(model, [n for n in names if n != MODEL_OUTPUT], keep=lambda o: o.detach().clone()) as seen:
        yield seen


def output_tensor(output: Any) -> Tensor:
    """The tensor a metric scores: the output itself, or the first tensor of a tuple, list or dict.

    Models that return several outputs (auxiliary heads, ``{"logits": ..., ...}``) are
    scored on the first; to score another, wrap the model so that it returns that one.

    Example:
        >>> output_tensor((torch.ones(1), torch.zeros(1)))
        tensor([1.])
    """
    if isinstance(output, Tensor):
        return output
    items = list(output.values()) if isinstance(output, Mapping) else list(output) if isinstance(
        output, (tuple, list)) else []
    for item in items:
        if isinstance(item, Tensor):
            return item
    raise TypeError(
        f"the model returned {type(output).__name__} without a tensor in it; metrics score a tensor (or the first "
        "tensor of a tuple, list or dict): wrap the model so that its forward returns the output to score"
    )


def _check_finite(tensor: Tensor, what: str) -> None:
    if tensor.is_floating_point() or tensor.is_complex():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what} holds NaN or Inf values; every score would be NaN or Inf: fix the data")


def _as_batches(inputs: Union[Tensor, Sequence[Tensor]]) -> List[Tensor]:
    if isinstance(inputs, Tensor):
        batches = [inputs]
    elif isinstance(inputs, (list, tuple)):
        batches = list(inputs)
    else:
        raise TypeError(
            f"inputs must be a tensor (one batch) or a list of tensors, got {type(inputs).__name__}"
        )
    if not batches:
        raise ValueError("inputs is empty; pass at least one batch of model inputs")
    for index, batch in enumerate(batches):
        if not isinstance(batch, Tensor):
            raise TypeError(f"inputs[{index}] is a {type(batch).__name__}, not a tensor")
        _check_finite(batch, f"input batch {index}")
    return [batch.detach() for batch in batches]


class ZeroOutputWarning(UserWarning):
    """The dense model's output (or a captured layer's) is all zeros: distortions against it say nothing."""


class OutputDistortion(ForwardMetric):
    """Relative L2 distance of the pruned model's outputs to the dense model's, on fixed inputs.

    ``||y - y_dense|| / ||y_dense||`` over all calibration batches, for the model
    output or, with ``layers``, for each named module's output (the score is then
    the mean over those modules). 0 means unchanged; lower is better. The dense
    reference is recorded by :meth:`prepare` (``scan`` calls it).

    Args:
        inputs: one batch (a tensor) or a list of batches fed to the model.
        layers: module names whose outputs are compared (e.g. VGG style layers
            ``["features.1", "features.6"]``); ``None`` compares the model output.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> metric = OutputDistortion(torch.randn(2, 3, 8, 8))
        >>> metric.prepare(model); metric(model)
        0.0
    """

    name = "distortion"
    higher_is_better = False

    def __init__(
        self, inputs: Union[Tensor, Sequence[Tensor]], layers: Optional[Sequence[str]] = None
    ) -> None:
        self.inputs = _as_batches(inputs)
        if layers is None:
            self.capture = (MODEL_OUTPUT,)
        else:
            names = [layers] if isinstance(layers, str) else list(layers)
            if not names:
                raise ValueError("layers is empty; pass None to compare the model output")
            if len(set(names)) != len(names):
                raise ValueError(f"layers names a module twice: {names}; name each once")
            self.capture = tuple(names)
        self._reference: Optional[List[Dict[str, Tensor]]] = None
        self._norms: Optional[Tensor] = None

    def prepare(self, model: nn.Module) -> None:
        """Record the outputs of ``model`` (the dense model) that later scores are compared to."""
        for name in self.capture:
            if name != MODEL_OUTPUT:
                get_module(model, name)  # KeyError naming the valid layers
        reference: List[Dict[str, Tensor]] = []
        device = model_device(model)
        with torch.no_grad(), eval_mode(model), _captured(model, self.capture) as captured:
            for inputs in self.inputs:
                captured.clear()
                output = model(inputs.to(device))
                outputs = dict(captured)
                if MODEL_OUTPUT in self.capture:
                    outputs[MODEL_OUTPUT] = output_tensor(output).detach().clone()
                for name, value in outputs.items():
                    _check_finite(value, f"the dense model's output{f' of {name}' if name else ''} on batch "
                                         f"{len(reference)}")
                reference.append(outputs)
        self._reference = reference
        self._norms = None
        for outputs in reference:  # the dense energy each capture's distances divide by, as the totals sum it
            norms = torch.tensor([outputs[name].double().pow(2).sum().item() for name in self.capture],
                                 dtype=torch.float64)
            self._norms = norms if self._norms is None else self._norms + norms
        for name in self.capture:
            if reference and all(not bool(outputs[name].any()) for outputs in reference if name in outputs):
                where = "the model's output" if name == MODEL_OUTPUT else f"the output of {name!r}"
                warnings.warn(
                    f"{where} is all zeros on every batch of the dense model (a zero-initialised head?): "
                    "every distortion is then 0 and every layer looks prunable; measure a trained model, "
                    "or the distortion of a feature layer (OutputDistortion(inputs, layers=[...]))",
                    ZeroOutputWarning,
                    stacklevel=3,
                )

    def num_batches(self) -> Optional[int]:
        return len(self.inputs)

    def batches(self, device: torch.device) -> Iterator[Tuple[Tensor, Any]]:
        if self._reference is None:
            raise RuntimeError(
                "OutputDistortion has no dense reference yet; call metric.prepare(dense_model) "
                "first (scan() does it for you)"
            )
        for index, inputs in enumerate(self.inputs):
            yield inputs.to(device), index

    def batch_statistics(self, outputs: Mapping[str, Tensor], target: Any) -> Tensor:
        assert self._reference is not None  # batches() checked it
        reference = self._reference[target]
        stats = torch.zeros(2 * len(self.capture), dtype=torch.float64)
        for i, name in enumerate(self.capture):
            ref = reference[name].double()
            if name in outputs:
                stats[2 * i] = (output_tensor(outputs[name]).double() - ref).pow(2).sum().cpu()
            stats[2 * i + 1] = ref.pow(2).sum().cpu()
        return stats

    def reduce(self, totals: Tensor) -> float:
        values = totals.tolist()
        distances = [
            relative_distance(values[2 * i], values[2 * i + 1]) for i in range(len(self.capture))
        ]
        return float(sum(distances) / len(distances))

    def best_final_score(self, partial: Tensor) -> Optional[float]:
        """The distortion with no error past the batches seen: squared errors only add up, and the dense
        energy they are divided by is known from :meth:`prepare`.

        Example:
            >>> metric = OutputDistortion(torch.ones(1, 1, 2, 2))
            >>> metric.prepare(nn.Identity())  # dense energy 4
            >>> metric.best_final_score(torch.tensor([1.0, 1.0], dtype=torch.float64))
            0.5
        """
        if self._norms is None:
            return None
        errors = partial.double().reshape(-1)[0::2].tolist()
        norms = self._norms.tolist()
        distances = [relative_distance(error, norm) for error, norm in zip(errors, norms)]
        return float(sum(distances) / len(distances))

    def reduce_many(self, totals: Tensor) -> Tensor:
        """:meth:`reduce` of each row of ``totals`` [R, 2 * captures] at once (a settling scan's bootstrap)."""
        error, norm = totals[:, 0::2].double(), totals[:, 1::2].double()
        distance = torch.where(norm > 0, (error / norm.clamp_min(1e-300)).sqrt(),
                               torch.where(error == 0, torch.zeros_like(error), torch.full_like(error, math.inf)))
        return distance.mean(dim=1)


class Accuracy(ForwardMetric):
    """Top-1 accuracy (fraction in [0, 1]) of a classifier on labelled batches; higher is better.

    Args:
        loader: iterable of ``(inputs, labels)`` batches, e.g. a ``DataLoader``
            without shuffling or random augmentation (the same batches every pass).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
        >>> metric = Accuracy([(torch.randn(4, 1, 3, 3), torch.tensor([0, 1, 0, 1]))])
        >>> 0.0 <= metric(model) <= 1.0
        True
    """

    name = "accuracy"
    higher_is_better = True

    def __init__(self, loader: Iterable[Any]) -> None:
        if not isinstance(loader, Iterable):
            raise TypeError(f"loader must be an iterable of (inputs, labels), got {type(loader).__name__}")
        self.loader = loader
        self._samples: Optional[int] = None  # labels in the last complete pass over the loader
        self._dense_right: Optional[List[Tensor]] = None  # per batch: which samples the dense model gets right

    def prepare(self, model: nn.Module) -> None:
        """Record which samples the dense ``model`` classifies right (``scan`` calls it).

        The statistics then also count, per batch, the samples the scored model gets wrong where
        the dense one was right and the reverse: a settling scan bounds the accuracy *drop* from
        these paired flips, which is far tighter than bounding the accuracy alone.

        Example:
            >>> metric = Accuracy([(torch.eye(2), torch.tensor([0, 0]))])
            >>> metric.prepare(nn.Identity())  # dense: sample 0 right, sample 1 wrong
            >>> metric.statistics(nn.Flatten(0, 0)).tolist()  # [right, samples, lost, gained]
            [1.0, 2.0, 0.0, 0.0]
        """
        self._dense_right = None
        recorded: List[Tensor] = []
        device = model_device(model)
        with torch.no_grad(), eval_mode(model):
            for inputs, (labels, _) in self.batches(device):
                recorded.append(self._right(output_tensor(model(inputs)), labels))
        self._dense_right = recorded

    def dense_statistics(self) -> Optional[Tensor]:
        """The dense model's summed statistics over every batch, from :meth:`prepare` (no forward); None before it.

        Example:
            >>> metric = Accuracy([(torch.eye(2), torch.tensor([0, 0]))])
            >>> metric.prepare(nn.Identity())
            >>> metric.dense_statistics().tolist()
            [1.0, 2.0, 0.0, 0.0]
        """
        if self._dense_right is None:
            return None
        right = float(sum(int(batch.sum()) for batch in self._dense_right))
        samples = float(sum(batch.numel() for batch in self._dense_right))
        return torch.tensor([right, samples, 0.0, 0.0], dtype=torch.float64)

    def num_batches(self) -> Optional[int]:
        try:
            return len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            return None

    def batches(self, device: torch.device) -> Iterator[Tuple[Tensor, Any]]:
        samples = 0
        for index, batch in enumerate(self.loader):
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor)):
                raise TypeError(
                    f"batch {index} is a {type(batch).__name__}; Accuracy needs (inputs, labels) "
                    "batches, e.g. from a labelled dataset"
                )
            inputs, labels = batch[0], batch[1]
            if not isinstance(labels, Tensor):
                labels = torch.as_tensor(labels)
            _check_finite(inputs, f"input batch {index}")
            samples += int(labels.shape[0]) if labels.dim() else 1
            yield inputs.to(device), (labels, index)
        self._samples = samples

    @staticmethod
    def _right(logits: Tensor, labels: Tensor) -> Tensor:
        if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Accuracy needs class scores of shape [batch, classes] matching {labels.shape[0]} "
                f"labels; the model returned shape {tuple(logits.shape)}"
            )
        return logits.argmax(dim=1).cpu() == labels.cpu()

    def batch_statistics(self, outputs: Mapping[str, Tensor], target: Any) -> Tensor:
        """``[right, samples]`` of one batch; after :meth:`prepare`, ``[right, samples, lost, gained]``.

        ``target`` is what :meth:`batches` yields (the labels and the batch's number), or the labels alone.
        """
        labels, index = target if isinstance(target, tuple) else (target, None)
        right = self._right(output_tensor(outputs[MODEL_OUTPUT]), labels)
        stats = [float(right.sum()), float(labels.shape[0])]
        if index is not None and self._dense_right is not None:
            dense = self._dense_right[index]
            stats += [float((dense & ~right).sum()), float((~dense & right).sum())]
        return torch.tensor(stats, dtype=torch.float64)

    def reduce(self, totals: Tensor) -> float:
        correct, count = totals.tolist()[:2]
        return correct / count if count else math.nan

    def paired_counts(self, totals: Tensor) -> Optional[Tuple[Tuple[float, float], Tuple[float, float], Tuple[float, float]]]:
        """Flips against the dense model in summed statistics, where :meth:`prepare` recorded its answers; else None.

        Returns ``((lost, gained), (right, wrong) seen, (right, wrong) in all)``: ``lost`` counts the
        samples the dense model got right and this one gets wrong, ``gained`` the reverse; the pairs
        after it count the samples the dense model got right and wrong, among those seen and in all.
        """
        values = totals.double().reshape(-1).tolist()
        if len(values) < 4 or self._dense_right is None:
            return None
        right, samples, lost, gained = values[:4]
        dense_seen = right + lost - gained
        dense_all = float(sum(int(batch.sum()) for batch in self._dense_right))
        everything = float(sum(batch.numel() for batch in self._dense_right))
        return (lost, gained), (dense_seen, samples - dense_seen), (dense_all, everything - dense_all)

    def reduce_many(self, totals: Tensor) -> Tensor:
        """:meth:`reduce` of each row of ``totals`` [R, 2] at once (a settling scan's bootstrap)."""
        return totals[:, 0] / totals[:, 1]

    def best_final_score(self, partial: Tensor) -> Optional[float]:
        """The accuracy if every sample not seen yet were right (known once a pass has counted the samples).

        Example:
            >>> metric = Accuracy([(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))] * 2)
            >>> metric(nn.Identity())  # a full pass: 8 samples, the first class always picked
            0.5
            >>> metric.best_final_score(torch.tensor([1.0, 4.0], dtype=torch.float64))  # 1 of 4 right so far
            0.625
        """
        if not self._samples:
            return None
        correct, seen = partial.double().reshape(-1).tolist()[:2]
        return (correct + max(0.0, self._samples - seen)) / self._samples

    def counts(self, totals: Tensor) -> Tuple[float, float]:
        """(correct, samples) of summed statistics: the score is a rate of counts (see :mod:`~prunekit.sensitivity.settle`)."""
        return float(totals[0]), float(totals[1])

