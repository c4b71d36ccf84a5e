"""``python -m examples.style_transfer``: style transfer on a VGG-19 pruned with prunekit.

The Gatys commands (``stylize``, ``scan``, ``prune``, ``samples``) come from
:mod:`gatys_cli`; when :mod:`adain_cli` is present, its ``adain`` command group
is added (``python -m examples.style_transfer adain ...``).
"""

from __future__ import annotations

import importlib
import importlib.util

import click

import prunekit
from examples.style_transfer.gatys_cli import prune, samples, scan, stylize

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(prunekit.__version__, prog_name="prunekit style-transfer example")
def cli() -> None:
    """Neural style transfer with a VGG-19 pruned by prunekit.

    Start with `stylize`; `scan` measures how much each conv layer can be
    pruned; `prune` applies a plan and compares dense and pruned results.
    Offline, pass --weights PATH (a VGG-19 state_dict) or --weights random.

    Example: python -m examples.style_transfer stylize sample:hopper sample:waves -o out.png
    """


for _command in (stylize, scan, prune, samples):
    cli.add_command(_command)

_ADAIN_MODULE = "examples.style_transfer.adain_cli"
if importlib.util.find_spec(_ADAIN_MODULE) is not None:
    _adain = getattr(importlib.import_module(_ADAIN_MODULE), "adain", None)
    if isinstance(_adain, click.Command):
        cli.add_command(_adain, "adain")


def main() -> None:
    """Entry point: run the command group."""
    cli(prog_name="python -m examples.style_transfer")


if __name__ == "__main__":
    main()
