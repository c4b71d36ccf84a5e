"""Sensitivity analysis: how much can each conv layer lose before quality drops?

``scan`` prunes one conv layer at a time at several sparsities, scores the
model with any ``evaluate(model) -> float`` (or a built-in metric), restores it
exactly, and returns a :class:`SensitivityResult` whose ``plan(max_drop)`` is a
per-layer sparsity plan for :func:`prunekit.apply_plan`. ``run_scan`` does the whole job of
``prunekit scan`` in one call: metric, method data, scan, joint plan fit, compaction check.

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
    "PlanFit": "prunekit.sensitivity.joint:PlanFit",
    "fit_plan": "prunekit.sensitivity.joint:fit_plan",
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
    "evaluate_plan": "prunekit.sensitivity.scanner:evaluate_plan",
    "scan": "prunekit.sensitivity.scanner:scan",
    "ScanRun": "prunekit.sensitivity.pipeline:ScanRun",
    "run_scan": "prunekit.sensitivity.pipeline:run_scan",
}

__all__ = [
    "Accuracy",
    "DEFAULT_SPARSITIES",
    "ForwardMetric",
    "METHODS",
    "OutputDistortion",
    "PlanFit",
    "ScanRun",
    "SensitivityResult",
    "SuffixFallbackWarning",
    "check_sparsities",
    "evaluate_plan",
    "fit_plan",
    "run_scan",
    "scan",
    "select_plan",
    "select_sparsity",
]

lazy_exports(__name__, _EXPORTS)
