"""``plan.json``: the hand-over from ``prunekit scan`` to ``prunekit prune``.

Besides the plan (``{layer: sparsity}``) the file records what the plan was
measured on: model spec, weights, data, image size, batch size, seed, method,
criterion and, for channel plans, where the activation statistics came from.
Paths are recorded absolute, so ``prunekit prune --plan DIR/plan.json`` finds
them from any folder. ``prunekit prune`` takes each of these from the plan
unless a flag says otherwise (and then says so). ``--trust-checkpoint`` is never
taken from a file: whoever runs the command opts in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict

from prunekit.io.files import read_json
from prunekit.sensitivity.folder import PLAN_FORMAT, recorded_path

__all__ = ["PLAN_FORMAT", "PlanFile", "check_recorded_model", "read_plan_file", "recorded_path"]

# What a plan records about its scan, and prune's option for each.
CONTEXT_KEYS = ("model", "weights", "data", "image_size", "batch_size", "seed")


@dataclass
class PlanFile:
    """A plan read from disk: the plan, and everything else the file records (``meta``)."""

    path: str
    plan: Dict[str, float]
    meta: Dict[str, Any] = field(default_factory=dict)

    def context(self, key: str) -> Any:
        """A recorded value of :data:`CONTEXT_KEYS` (None when the file does not record it)."""
        return self.meta.get(key)


def _looks_like_scan(data: Any) -> bool:
    return isinstance(data, dict) and "scores" in data and "sparsities" in data


def read_plan_file(path: str) -> PlanFile:
    """Read ``plan.json`` (or a bare ``{layer: sparsity}`` mapping), checked; errors name the file and the fix.

    Every recorded value is checked for its type and range here, before any work, and
    an error names the file and the key (never a flag the user did not type).
    """
    target = Path(path)
    if target.is_dir():
        hint = f"; the plan written by prunekit scan is {target / 'plan.json'}" if (target / "plan.json").is_file() else ""
        raise IsADirectoryError(f"--plan {path} is a folder, not a plan file{hint}")
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--plan {path}: no such file") from None
    except ValueError as err:
        raise ValueError(f"--plan {path}: {err}; pass the plan.json written by prunekit scan") from None
    if _looks_like_scan(data):
        sibling = target.with_name("plan.json")
        hint = f"pass {sibling}" if sibling.is_file() else "pass the plan.json that prunekit scan writes beside it"
        raise ValueError(f"--plan {path} is a scan result (scan.json), not a plan; {hint}")
    meta: Dict[str, Any] = {}
    if isinstance(data, dict) and "plan" in data:
        meta = {k: v for k, v in data.items() if k != "plan"}
        data = data["plan"]
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"--plan {path} must hold a mapping of conv layer names to sparsities, e.g. "
            '{"features.0": 0.5}, or the plan.json written by prunekit scan'
        )
    for layer, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"--plan {path}: the sparsity of {layer!r} is {value!r}; a sparsity is a number in [0, 1)")
    for key in CONTEXT_KEYS:
        _check_recorded(path, key, meta.get(key))
    return PlanFile(str(path), {str(k): float(v) for k, v in data.items()}, meta)


_LARGEST_SIDE = 1 << 16
_LARGEST_BATCH = 1 << 20


def _check_recorded(path: str, key: str, value: Any) -> None:
    """A value the plan records for ``key`` has the type and range ``prunekit scan`` writes."""
    if value is None:
        return
    if key in ("model", "weights", "data"):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"--plan {path} records {key} {value!r}, not a name or path; fix the file or rerun prunekit scan")
        return
    limits = {"image_size": (1, _LARGEST_SIDE), "batch_size": (1, _LARGEST_BATCH), "seed": (0, 2**63 - 1)}
    low, high = limits[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(
            f"--plan {path} records {key} {value!r}; it must be a whole number from {low} to {high}: "
            "fix the file or rerun prunekit scan"
        )


def check_recorded_model(plan: PlanFile, spec: str, trust_checkpoint: bool) -> None:
    """Refuse a model the plan file names when loading it would run code the user did not type.

    A ``package.module:factory`` spec imports and calls code: a plan file cannot ask for
    that (whoever wrote the file would choose the code). ``--trust-checkpoint`` is the
    user's word about a file they name, so it never extends to a model file the plan names.

    Raises:
        ValueError: naming the recorded model and the command-line flag to type instead.
    """
    from prunekit.models.zoo import is_factory_spec

    if is_factory_spec(spec):
        raise ValueError(
            f"--plan {plan.path} names model {spec!r}, a factory that prunekit would import and run; a plan "
            f"file never chooses code to run: if you trust {spec}, type it: --model {spec}"
        )
    if trust_checkpoint:
        raise ValueError(
            f"--trust-checkpoint applies to a --model you type, not to {spec!r}, which --plan {plan.path} names; "
            f"if you trust that file, type it: --model {spec} --trust-checkpoint"
        )
