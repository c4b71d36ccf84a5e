"""A scan kept in a folder: what it writes, how an interrupted scan or plan fit resumes, what it never replaces.

``prunekit scan --out DIR`` is a thin layer over this module: :class:`ScanFolder`
saves ``scan.json`` after every point and ``fit.json`` after every trial of the plan
fit, resumes either one only when it was measured with the same options (and the same
weights and data: fingerprints are part of the options), refuses to replace another
scan's results, and writes ``scan.json``, ``scan.csv``, ``plan.json`` and
``sensitivity.png`` at the end. Under ``torch.distributed`` rank 0 alone reads (and
shares what it read) and writes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from prunekit.sensitivity import OutputDistortion, scan
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    >>> metric = OutputDistortion(torch.randn(2, 3, 16, 16))
    >>> folder = ScanFolder("results")
    >>> result = scan(model, metric, progress=False, on_point=folder.save_scan)
    >>> plan = result.plan(max_drop=0.5)
    >>> folder.write(result, plan, {"model": "mine"}, max_drop=0.5)["plan"]
    'results/plan.json'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from prunekit.io.files import PathLike, write_json
from prunekit.sensitivity.distributed import is_main_process, read_json_on_rank0
from prunekit.sensitivity.result import SensitivityResult

__all__ = ["FIT_FORMAT", "PLAN_FORMAT", "ScanFolder", "options_differ", "recorded_path"]

PLAN_FORMAT = "prunekit.plan/1"
FIT_FORMAT = "prunekit.fit/2"  # 2: trials are the plans a bisecting fit measured


def recorded_path(value: Optional[str], kind: str) -> Optional[str]:
    """``value`` made absolute when it names an existing file (``kind="file"``) or folder (``"folder"``).

    Example:
        >>> recorded_path("digits-vgg", "file")
        'digits-vgg'
    """
    if value is None:
        return None
    path = Path(value)
    if (kind == "file" and path.is_file()) or (kind == "folder" and path.is_dir()):
        return str(path.resolve())
    return value


def options_differ(previous: Any, current: Mapping[str, Any]) -> List[str]:
    """What differs between the options a saved file records and the current ones, each as a phrase.

    Example:
        >>> options_differ({"model": "a"}, {"model": "b"})
        ["model 'a' (now 'b')"]
    """
    if not isinstance(previous, Mapping):
        return ["the saved file records no options"]
    differences = []
    for key, value in current.items():
        if previous.get(key) == value:
            continue
        if key == "fingerprint" and isinstance(value, Mapping):
            saved = previous.get(key) if isinstance(previous.get(key), Mapping) else {}
            changed = [what for what in value if saved.get(what) != value[what]]
            differences.append(f"the {' and the '.join(changed)} it was measured on changed since")
        else:
            differences.append(f"{key} {previous.get(key)!r} (now {value!r})")
    return differences


def _is_trial(item: Any) -> bool:
    """``[layer, sparsity, score, kept]`` as ``fit.json`` stores a trial."""
    return (
        isinstance(item, list) and len(item) == 4 and isinstance(item[0], str)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item[1:3])
        and isinstance(item[3], bool)
    )


class ScanFolder:
    """The files of one scan in ``path``: ``scan.json``, ``scan.csv``, ``fit.json``, ``plan.json``, ``sensitivity.png``."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self.scan_file = self.path / "scan.json"
        self.csv_file = self.path / "scan.csv"
        self.fit_file = self.path / "fit.json"
        self.plan_file = self.path / "plan.json"
        self.plot_file = self.path / "sensitivity.png"
        self._before: Any = None  # scan.json as found before this run: read once (a collective under torchrun)
        self._read = False

    def _saved_scan(self) -> Any:
        """The JSON of ``scan.json`` as it was before this run (None: none; a ValueError: unreadable)."""
        if not self._read:
            try:
                self._before = read_json_on_rank0(self.scan_file)
            except ValueError as err:
                self._before = err
            self._read = True
        return self._before

    # ------------------------------------------------------------------ before the scan

    def partial_scan(self) -> SensitivityResult:
        """The saved (partial) scan to resume.

        Raises:
            FileNotFoundError: there is none.
            ValueError: it is not a scan.
        """
        document = self._saved_scan()
        if isinstance(document, ValueError):
            raise document
        if document is None:
            raise FileNotFoundError(f"--resume: no partial scan at {self.scan_file}; run without --resume to start one")
        return SensitivityResult.from_dict(document, repr(str(self.scan_file)))

    def check_resumable(self, previous: SensitivityResult, options: Mapping[str, Any]) -> None:
        """Refuse to resume ``previous`` with other ``options`` (weights and data fingerprints included).

        Raises:
            ValueError: naming each option that differs.
        """
        differences = options_differ(previous.meta.get("options", {}), options)
        if differences:
            raise ValueError(
                f"--resume: the partial scan in {self.scan_file} used other options: " + "; ".join(differences)
                + ". Rerun with the same options, or drop --resume to start over"
            )

    def refuse_other_scan(self, typed: Mapping[str, Any], flag: str = "--out") -> None:
        """Refuse to replace the results of another scan (another model, weights, data, method or levels).

        Raises:
            ValueError: naming what differs, ``--force`` and another ``--out`` as the ways on.
        """
        document = self._saved_scan()
        if document is None:
            return
        options = document.get("meta", {}).get("options") if isinstance(document, dict) else None
        if not isinstance(options, Mapping):
            raise ValueError(
                f"{flag} {self.path} holds a scan.json that is not a prunekit scan; choose another {flag}, or pass "
                "--force to replace it"
            )
        differences = [f"{key} {options.get(key)!r} (now {value!r})" for key, value in typed.items()
                       if options.get(key) != value]
        if differences:
            raise ValueError(
                f"{flag} {self.path} holds the results of another scan ({'; '.join(differences)}); choose another "
                f"{flag}, or pass --force to replace them"
            )

    def holds_a_partial_scan(self) -> bool:
        """Whether ``scan.json`` is an unfinished scan (which a new scan would replace)."""
        document = self._saved_scan()
        if document is None or isinstance(document, ValueError):
            return False
        try:
            return not SensitivityResult.from_dict(document).complete
        except ValueError:
            return False

    # ------------------------------------------------------------------ while it runs

    def save_scan(self, partial: SensitivityResult) -> None:
        """Save the scan so far (``on_point`` of :func:`prunekit.sensitivity.scan`; rank 0 alone writes)."""
        if is_main_process():
            partial.to_json(self.scan_file)

    def saved_trials(self, key: Mapping[str, Any]) -> Optional[List[Any]]:
        """The trials of an interrupted fit saved under the same ``key`` (scan options and tolerance), else None."""
        try:
            document = read_json_on_rank0(self.fit_file)
        except ValueError:
            return None
        if not (isinstance(document, dict) and document.get("format") == FIT_FORMAT and document.get("key") == dict(key)):
            return None
        trials = document.get("trials")
        return list(trials) if isinstance(trials, list) and all(_is_trial(t) for t in trials) else None

    # ------------------------------------------------------------------ at the end

    def write(
        self, result: SensitivityResult, plan: Mapping[str, float], context: Mapping[str, Any], *,
        max_drop: float, relative: bool = False, joint: bool = True, warn: Optional[Callable[[str], None]] = None,
        **details: Any,
    ) -> Dict[str, str]:
        """Write ``scan.json``, ``scan.csv``, ``plan.json`` and ``sensitivity.png``; returns what was written.

        ``plan.json`` holds the plan, the scan's ``context`` (model, weights, data, sizes, seed:
        what ``prunekit prune --plan`` reuses) and ``details``. The plot needs matplotlib: without
        it ``warn`` hears why it was left out. Rank 0 alone writes (other ranks get ``{}``).
        """
        if not is_main_process():
            return {}
        files = {"scan": str(self.scan_file), "csv": str(self.csv_file), "plan": str(self.plan_file)}
        if joint and self.fit_file.is_file():
            files["fit"] = str(self.fit_file)
        result.to_json(self.scan_file)
        result.to_csv(self.csv_file)
        document: Dict[str, Any] = {"format": PLAN_FORMAT, "plan": dict(plan)}
        document.update(context)
        document.update(details, scan=str(self.scan_file.resolve()), max_drop=max_drop, relative=relative, joint=joint)
        write_json(self.plan_file, document)
        try:
            result.plot(self.plot_file, max_drop=max_drop, relative=relative, plan=plan if joint else None)
            files["plot"] = str(self.plot_file)
        except ImportError as err:
            if warn is not None:
                warn(f"sensitivity.png not written: {err}")
        return files
