"""Side-by-side latency: the only honest way to time models on a shared, noisy machine.

Models are timed in interleaved rounds, after warm-up rounds that are not counted. Each
timed forward follows an untimed forward of the same model, so it is the model's
steady-state latency whatever ran before it: timed right after another model, a model
pays for that model's data in the caches. (Measured with three models, dense, prunekit's
and Torch-Pruning's efficientnet_b0, when only the order alternated: whichever pruned model
ran in the middle was 6-7 % slower than when it ran last.) The order rotates by one model
each round, so every model takes every place equally often. A speed-up
is the median of the per-round ratios, with a bootstrap interval over rounds: when
the interval holds 1.0, the difference is within noise and :class:`Speedup` says so.

Example:
    >>> samples = latency_samples({"wide": nn.Conv2d(3, 64, 3), "narrow": nn.Conv2d(3, 8, 3)},
    ...                           torch.randn(1, 3, 32, 32), repeats=5)
    >>> result = speedup(samples["wide"], samples["narrow"])
    >>> result.low <= result.ratio <= result.high
    True
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from prunekit._rollback import restore_training, training_flags

__all__ = ["NOISY_SPAN", "Speedup", "Spread", "compare_latency", "latency_samples", "speedup", "spread"]

#: A speed-up interval whose ends differ by more than this factor says little about the speed-up
#: (a quiet machine gives 1.1 or less): the timings were taken on a busy machine.
NOISY_SPAN = 1.5


def latency_samples(
    models: Mapping[str, nn.Module],
    example_input: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
    repeats: int = 10,
    warmup: int = 2,
) -> Dict[str, List[float]]:
    """Seconds of each forward of each model, timed in interleaved rounds.

    ``example_input`` is one tensor or a tuple of positional inputs. Every round runs
    each model twice, in turn, and times the second forward (see the module's docstring),
    so a load spike slows all of them alike and the ratios stay meaningful; ``warmup`` rounds run first and are
    not counted. On CUDA every forward is bracketed by ``torch.cuda.synchronize`` so
    the time is the kernels', not the launch's. Models run in eval mode under
    ``torch.no_grad()``; their train/eval flags are restored afterwards.

    Example:
        >>> samples = latency_samples({"conv": nn.Conv2d(3, 8, 3)}, torch.randn(1, 3, 16, 16), repeats=3)
        >>> len(samples["conv"])
        3
    """
    if not models:
        raise ValueError("models is empty; pass at least one {name: model}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    flags = training_flags(*models.values())
    samples: Dict[str, List[float]] = {name: [] for name in models}
    order = list(models.items())
    try:
        for model in models.values():
            model.eval()
        # CUDA runs asynchronously: without a synchronisation the clock would stop at the launch.
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
        device = next(t.device for t in inputs if isinstance(t, torch.Tensor)) if cuda else None
        with torch.no_grad():
            for round_index in range(warmup + repeats):
                shift = round_index % len(order)
                for name, model in order[shift:] + order[:shift]:
                    model(*inputs)  # untimed: the timed forward follows the model itself, never another
                    if cuda:
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    model(*inputs)
                    if cuda:
                        torch.cuda.synchronize(device)
                    elapsed = time.perf_counter() - start
                    if round_index >= warmup:
                        samples[name].append(elapsed)
    finally:
        restore_training(flags)
    return samples


def compare_latency(
    models: Mapping[str, nn.Module], example_input: torch.Tensor, repeats: int = 10, warmup: int = 2
) -> Dict[str, float]:
    """Median seconds per forward of each model, from :func:`latency_samples`.

    Example:
        >>> times = compare_latency({"a": nn.Conv2d(3, 8, 3), "b": nn.Conv2d(3, 4, 3)}, torch.randn(1, 3, 16, 16))
        >>> sorted(times)
        ['a', 'b']
    """
    samples = latency_samples(models, example_input, repeats, warmup)
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass(frozen=True)
class Spread:
    """The median of some timings and their interquartile range (seconds)."""

    median: float
    q1: float
    q3: float

    def __str__(self) -> str:
        return f"{self.median * 1e3:.2f} ms (IQR {self.q1 * 1e3:.2f}-{self.q3 * 1e3:.2f})"


def spread(values: Sequence[float]) -> Spread:
    """Median and quartiles of ``values`` (quartiles by linear interpolation; one value is its own spread).

    Example:
        >>> spread([1.0, 2.0, 3.0, 4.0, 5.0])
        Spread(median=3.0, q1=2.0, q3=4.0)
    """
    if not values:
        raise ValueError("values is empty; time at least one round")
    ordered = sorted(float(v) for v in values)
    return Spread(statistics.median(ordered), _quantile(ordered, 0.25), _quantile(ordered, 0.75))


@dataclass(frozen=True)
class Speedup:
    """``before / after`` time: the median per-round ratio and its bootstrap interval.

    Attributes:
        ratio: median over rounds of ``before[i] / after[i]`` (> 1: ``after`` is faster).
        low, high: the ``confidence`` bootstrap interval of that median.
        confidence: e.g. 0.95.
    """

    ratio: float
    low: float
    high: float
    confidence: float

    @property
    def within_noise(self) -> bool:
        """True when the interval holds 1.0: the timings cannot tell the two apart."""
        return self.low <= 1.0 <= self.high

    @property
    def too_noisy(self) -> bool:
        """True when the interval's ends differ by more than :data:`NOISY_SPAN` times: a busy machine.

        Example:
            >>> Speedup(1.10, 1.09, 6.10, 0.95).too_noisy, Speedup(1.95, 1.90, 2.10, 0.95).too_noisy
            (True, False)
        """
        return not self.high <= self.low * NOISY_SPAN

    def __str__(self) -> str:
        interval = f"{self.confidence:.0%} interval {self.low:.2f}-{self.high:.2f}x"
        if self.too_noisy:
            return (f"not measurable here: the machine is busy (the {interval} spans more than {NOISY_SPAN:g}x); "
                    "time it again when the machine is idle, with --threads 1 and more --repeats")
        verdict = ": within noise, no measurable difference" if self.within_noise else ""
        return f"{self.ratio:.2f}x ({interval}){verdict}"


def speedup(
    before: Sequence[float], after: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Speedup:
    """The speed-up of ``after`` over ``before`` from paired rounds of :func:`latency_samples`.

    Each round's ratio pairs two forwards timed moments apart, so a load spike that
    slows one round cancels out; the interval is a percentile bootstrap of the median
    over rounds (seeded: the same samples give the same interval).

    Example:
        >>> str(speedup([2.0, 2.1, 1.9, 2.0], [1.0, 1.0, 1.0, 1.05]))
        '1.95x (95% interval 1.90-2.10x)'
        >>> speedup([1.0, 1.1, 0.9], [1.05, 1.0, 0.95]).within_noise
        True
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"pass the same number (>= 1) of rounds for both; got {len(before)} and {len(after)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must lie in (0, 1), e.g. 0.95")
    ratios = torch.tensor([b / a for b, a in zip(before, after)], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(ratios), (resamples, len(ratios)), generator=generator)
    medians = sorted(ratios[picks].quantile(0.5, dim=1).tolist())
    tail = (1 - confidence) / 2
    return Speedup(float(ratios.quantile(0.5)), _quantile(medians, tail), _quantile(medians, 1 - tail), confidence)


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
