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
from typing import Any, Dict, Mapping, Optional

from prunekit.io import read_json, write_json

__all__ = ["PLAN_FORMAT", "PlanFile", "read_plan_file", "recorded_path", "write_plan_file"]

PLAN_FORMAT = "prunekit.plan/1"
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


def recorded_path(value: Optional[str], kind: str) -> Optional[str]:
    """``value`` made absolute when it names an existing file (``kind="file"``) or folder (``"folder"``)."""
    if value is None:
        return None
    path = Path(value)
    if (kind == "file" and path.is_file()) or (kind == "folder" and path.is_dir()):
        return str(path.resolve())
    return value


def write_plan_file(path: Path, plan: Mapping[str, float], context: Mapping[str, Any], **details: Any) -> None:
    """Write ``plan.json`` atomically: the format tag, the plan, its scan's context and ``details``."""
    document: Dict[str, Any] = {"format": PLAN_FORMAT, "plan": dict(plan)}
    document.update(context)
    document.update(details)
    write_json(path, document)


def _looks_like_scan(data: Any) -> bool:
    return isinstance(data, dict) and "scores" in data and "sparsities" in data


def read_plan_file(path: str) -> PlanFile:
    """Read ``plan.json`` (or a bare ``{layer: sparsity}`` mapping), checked; errors name the file and the fix."""
    target = Path(path)
    if target.is_dir():
        hint = f"; the plan written by prunekit scan is {target / 'plan.json'}" if (target / "plan.json").is_file() else ""
        raise IsADirectoryError(f"--plan {path} is a folder, not a plan file{hint}")
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--plan {path}: no such file") from None
    except ValueError as err:
        raise ValueError(f"--plan {path} is not valid JSON ({err}); pass the plan.json written by prunekit scan") from None
    if _looks_like_scan(data):
        sibling = target.with_name("plan.json")
        hint = f"pass {sibling}" if sibling.is_file() else "pass the plan.json that prunekit scan writes beside it"
        raise ValueError(f"--plan {path} is a scan result (scan.json), not a plan; {hint}")
    meta: Dict[str, Any] = {}
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        meta = {k: v for k, v in data.items() if k != "plan"}
        data = data["plan"]
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"--plan {path} must hold a mapping of conv layer names to sparsities, e.g. "
            '{"features.0": 0.5}, or the plan.json written by prunekit scan'
        )
    for layer, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"--plan {path}: the sparsity of {layer!r} is {value!r}, not a number")
    return PlanFile(str(path), {str(k): float(v) for k, v in data.items()}, meta)

