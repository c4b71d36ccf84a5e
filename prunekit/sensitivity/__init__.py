"""Sensitivity analysis: how much can each conv layer lose before quality drops?

``scan`` prunes one conv layer at a time at several sparsities, scores the
model with any ``evaluate(model) -> float`` (or a built-in metric), restores it
exactly, and returns a :class:`SensitivityResult` whose ``plan(max_drop)`` is a
per-layer sparsity plan for :func:`prunekit.apply_plan`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> result = scan(model, OutputDistortion(torch.randn(2, 3, 16, 16)), progress=False)
    >>> plan = result.plan(max_drop=0.1)
"""

from prunekit.sensitivity.joint import PlanFit, fit_plan
from prunekit.sensitivity.metrics import Accuracy, ForwardMetric, OutputDistortion
from prunekit.sensitivity.result import (
    DEFAULT_SPARSITIES,
    SensitivityResult,
    check_sparsities,
    select_plan,
    select_sparsity,
)
from prunekit.sensitivity.scanner import METHODS, SuffixFallbackWarning, evaluate_plan, scan

__all__ = [
    "Accuracy",
    "DEFAULT_SPARSITIES",
    "ForwardMetric",
    "METHODS",
    "OutputDistortion",
    "PlanFit",
    "SensitivityResult",
    "SuffixFallbackWarning",
    "check_sparsities",
    "evaluate_plan",
    "fit_plan",
    "scan",
    "select_plan",
    "select_sparsity",
]
