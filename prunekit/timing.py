"""Side-by-side latency: the only honest way to time models on a shared, noisy machine."""

from __future__ import annotations

import statistics
import time
from typing import Dict, List, Mapping, Tuple, Union

import torch
from torch import nn

from prunekit._rollback import restore_training, training_flags

__all__ = ["compare_latency", "latency_samples"]


def latency_samples(
    models: Mapping[str, nn.Module],
    example_input: Union[torch.Tensor, Tuple[torch.Tensor, ...]],
    repeats: int = 10,
    warmup: int = 2,
) -> Dict[str, List[float]]:
    """Seconds of each forward of each model, timed in interleaved rounds.

    ``example_input`` is one tensor or a tuple of positional inputs. Every round runs each model once, in turn, so a load spike slows all of
    them alike and the ratios stay meaningful. On CUDA every forward is bracketed
    by ``torch.cuda.synchronize`` so the time is the kernels', not the launch's. Models run in eval mode under
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
    try:
        for model in models.values():
            model.eval()
        # CUDA runs asynchronously: without a synchronisation the clock would stop at the launch.
        inputs = example_input if isinstance(example_input, tuple) else (example_input,)
        cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs)
        device = next(t.device for t in inputs if isinstance(t, torch.Tensor)) if cuda else None
        with torch.no_grad():
            for round_index in range(warmup + repeats):
                for name, model in models.items():
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
