"""What a plan fit returns: the plan, its score with every layer pruned, and how it was found.

Shared by the tolerance fit (:mod:`prunekit.planning.fit`) and the budget fit
(:mod:`prunekit.planning.budget`): :func:`~prunekit.planning.fit_plan` hands a budget to the
budget fit, which returns a :class:`PlanFit` too, without an import loop.

Example:
    >>> PlanFit({"0": 0.5}, score=0.01).plan
    {'0': 0.5}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

__all__ = ["PlanFit", "Trial"]

#: One measured plan: ``(layer, sparsity, joint score, kept)``, the plan being the one the fit had
#: plus every step of the order up to ``layer`` at ``sparsity``. A trial that broke the tolerance
#: stops once the break is certain (see :class:`~prunekit.sensitivity.settle.Tolerance`): its score
#: is then that of the batches it used.
Trial = Tuple[str, float, float, bool]


@dataclass(frozen=True)
class PlanFit:
    """The fitted plan and how it was found.

    Attributes:
        plan: layer -> sparsity; its joint score is within the tolerance of the baseline.
        score: the model's score with the whole plan applied.
        trials: every plan measured, as ``(layer, sparsity, joint score, kept)`` (see :data:`Trial`).
        steps: how many steps the order offered (the step-by-step search measures one plan per step
            it reaches).
        sparsity: the fraction of the scanned layers' weights the plan removes (a channel group counts
            the weights of its layers).
        left: the most the steps the fit did not try could have added to ``sparsity`` (``min_gain``).
    """

    plan: Dict[str, float]
    score: float
    trials: List[Trial] = field(default_factory=list)
    steps: int = 0
    sparsity: float = 0.0
    left: float = 0.0
