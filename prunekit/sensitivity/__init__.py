"""Sensitivity analysis: how much can each conv layer lose before quality drops?

``scan`` prunes one conv layer at a time at several sparsities, scores the
model with any ``evaluate(model) -> float`` (or a built-in metric), restores it
exactly, and returns a :class:`SensitivityResult` whose ``plan(max_drop)`` is a
per-layer sparsity plan for :func:`prunekit.apply_plan`. The plan that holds with every
layer pruned together, and the whole job of ``prunekit scan``, are planning's
(:func:`prunekit.planning.fit_plan`, :func:`prunekit.planning.run_scan`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> result = scan(model, OutputDistortion(torch.randn(2, 3, 16, 16)), progress=False)
    >>> plan = result.plan(max_drop=0.1)
"""

from prunekit._lazy import lazy_exports

# Each public name is imported on first use (the scanner needs torch; results and plans do not).
_EXPORTS = {
    "Accuracy": "prunekit.sensitivity.metrics:Accuracy",
    "ForwardMetric": "prunekit.sensitivity.metrics:ForwardMetric",
    "OutputDistortion": "prunekit.sensitivity.metrics:OutputDistortion",
    "DEFAULT_SPARSITIES": "prunekit.sensitivity.result:DEFAULT_SPARSITIES",
    "SensitivityResult": "prunekit.sensitivity.result:SensitivityResult",
    "check_sparsities": "prunekit.sensitivity.result:check_sparsities",
    "select_plan": "prunekit.sensitivity.result:select_plan",
    "select_sparsity": "prunekit.sensitivity.result:select_sparsity",
    "METHODS": "prunekit.methods.registry:METHODS",
    "SuffixFallbackWarning": "prunekit.sensitivity.scanner:SuffixFallbackWarning",
    "evaluate_plan": "prunekit.sensitivity.scoring:evaluate_plan",
    "scan": "prunekit.sensitivity.scanner:scan",
}

__all__ = [
    "Accuracy",
    "DEFAULT_SPARSITIES",
    "ForwardMetric",
    "METHODS",
    "OutputDistortion",
    "SensitivityResult",
    "SuffixFallbackWarning",
    "check_sparsities",
    "evaluate_plan",
    "scan",
    "select_plan",
    "select_sparsity",
]

#: Names that moved up to prunekit.planning (the package that uses the scanner, not a part of it).
MOVED_TO_PLANNING = ("PlanFit", "ScanRun", "fit_plan", "run_scan")

lazy_exports(__name__, _EXPORTS, moved={name: "prunekit.planning" for name in MOVED_TO_PLANNING})
