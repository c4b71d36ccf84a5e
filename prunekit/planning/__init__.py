"""Planning: from a scan's curves to the plan to apply, and the whole ``prunekit scan`` job.

A scan (:mod:`prunekit.sensitivity`) measures one layer (or channel group) at a time;
planning decides what to prune with every layer pruned together. :func:`fit_plan` grows
the plan whose joint score stays within a tolerance (:mod:`prunekit.planning.fit`), or
the plan that meets a :class:`Budget` of MACs, parameters, speed-up or latency where the scan
says it hurts least (:mod:`prunekit.planning.budget`, walking the curves in
:mod:`prunekit.planning.walk`, its costs counted on what ``compact`` builds:
:mod:`prunekit.planning.costs`, its times by a per-layer model measured on this machine:
:mod:`prunekit.planning.latency`);
:func:`run_scan` runs the whole job of ``prunekit scan``: metric, method data, scan, fit,
compaction check (:mod:`prunekit.planning.pipeline`); :func:`prune_in_stages` reaches a budget in
stages of scan, fit, compaction and recovery (:mod:`prunekit.planning.stages`, ``prunekit scan --steps``). Applying a plan to a model is
:func:`prunekit.apply_plan` (``prunekit.plans``, below the scanner, which scores plans).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.sensitivity import OutputDistortion, scan
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> metric = OutputDistortion(torch.randn(2, 3, 16, 16))
    >>> fit = fit_plan(model, metric, scan(model, metric, progress=False), max_drop=0.4)
    >>> fit.score <= 0.4
    True
"""

from prunekit._lazy import lazy_exports

# Each public name is imported on first use (the fit needs torch).
_EXPORTS = {
    "Budget": "prunekit.planning.budget:Budget",
    "BudgetError": "prunekit.planning.budget:BudgetError",
    "BudgetFit": "prunekit.planning.budget:BudgetFit",
    "Cost": "prunekit.planning.costs:Cost",
    "LatencyModel": "prunekit.planning.latency:LatencyModel",
    "measure_latency": "prunekit.planning.latency:measure_latency",
    "plan_costs": "prunekit.planning.costs:plan_costs",
    "PlanFit": "prunekit.planning.fitted:PlanFit",
    "fit_plan": "prunekit.planning.fit:fit_plan",
    "DEFAULT_MAX_DROP": "prunekit.planning.pipeline:DEFAULT_MAX_DROP",
    "ScanInterrupted": "prunekit.planning.pipeline:ScanInterrupted",
    "ScanRun": "prunekit.planning.pipeline:ScanRun",
    "run_scan": "prunekit.planning.pipeline:run_scan",
    "prune_in_stages": "prunekit.planning.stages:prune_in_stages",
    "StagedRun": "prunekit.planning.stages:StagedRun",
}

__all__ = ["Budget", "BudgetError", "BudgetFit", "Cost", "DEFAULT_MAX_DROP", "LatencyModel", "PlanFit", "ScanInterrupted",
           "ScanRun", "StagedRun", "fit_plan", "measure_latency", "plan_costs", "prune_in_stages", "run_scan"]

lazy_exports(__name__, _EXPORTS)
