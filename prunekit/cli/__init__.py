"""The ``prunekit`` command line: one module per command, shared parts beside them.

* ``scan.py``, ``prune.py``, ``report.py``, ``compact.py``: the commands.
* ``options.py``: options several commands share, and parsers of option values.
* ``inputs.py``: the images a command works on (evaluation and recovery batches).
* ``checkpoints.py``: a CHECKPOINT argument, and the spec a saved model records.
* ``session.py``: status lines and the torchrun process group.
* ``plan_file.py``: ``plan.json``, the hand-over from ``scan`` to ``prune``.
* ``paths.py``: output paths checked before any work; never over an input.
* ``errors.py``: library errors as one line (exit 1), Ctrl-C as exit 130, pure ``--json``.

The work itself is done by :mod:`prunekit.sensitivity`, :mod:`prunekit.models.zoo`,
:mod:`prunekit.datasets`, :mod:`prunekit.plans`, :mod:`prunekit.training.recover`,
:mod:`prunekit.measure.sparsity`, :mod:`prunekit.compact` and :mod:`prunekit.input_size` (input
sizes checked before any work).
"""

from __future__ import annotations

import click

from prunekit import __version__
from prunekit.cli.compact import compact_command
from prunekit.cli.options import CONTEXT_SETTINGS, examples, parse_sparsities
from prunekit.cli.prune import prune_command
from prunekit.cli.report import report_command
from prunekit.cli.scan import scan_command

__all__ = ["cli", "main", "parse_sparsities"]


@click.group(
    context_settings=CONTEXT_SETTINGS,
    epilog=examples(
        "prunekit scan",
        "prunekit prune --plan prunekit-scan/plan.json --out pruned.pt",
        "prunekit report pruned.pt --input-size 1x16x16",
    ),
)
@click.version_option(__version__, "--version", prog_name="prunekit", message="%(prog)s %(version)s")
def cli() -> None:
    """prunekit: prune PyTorch conv nets on top of torch.nn.utils.prune.

    Start with `prunekit scan`: it measures how much each conv layer of a model
    can lose before quality drops and suggests a per-layer sparsity plan;
    `prunekit prune --plan DIR/plan.json` applies it with the model and data the
    scan used.
    """


for _command in (scan_command, prune_command, report_command, compact_command):
    cli.add_command(_command)


def main() -> None:
    """Console entry point (``prunekit``)."""
    cli(prog_name="prunekit")
