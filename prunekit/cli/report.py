"""``prunekit report``: zeros, sizes and MACs of a checkpoint (torch or sparse), per layer and in total."""

from __future__ import annotations

from typing import Optional

import click

from prunekit.cli.errors import emit_json, library_errors
from prunekit.cli.checkpoints import load_checkpoint_argument
from prunekit.input_size import check_input_fits
from prunekit.cli.options import checkpoint_options, examples, json_option, parse_input_size, threads_option

__all__ = ["report_command"]


@click.command(
    "report",
    short_help="Print the sparsity report of a checkpoint.",
    epilog=examples(
        "prunekit report pruned.pt --input-size 1x16x16",
        "prunekit report vgg11-pruned.pksparse --input-size 3x224x224 --json",
        "prunekit report resnet18 --groups",
    ),
)
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--input-size", default=None, metavar="CxHxW",
              help="One input's shape (e.g. 3x224x224) to count MACs; without it only parameters are counted.")
@checkpoint_options
@click.option("--groups", is_flag=True,
              help="Print the channel groups instead: layers whose channels are removed together, and what is fixed.")
@json_option("the report")
@threads_option
@library_errors
def report_command(
    checkpoint: str,
    input_size: Optional[str],
    weights: Optional[str],
    trust_checkpoint: bool,
    groups: bool,
    as_json: bool,
) -> None:
    """Print the sparsity report of a checkpoint: zeros, sizes and MACs per layer.

    CHECKPOINT is a file written by `prunekit prune` (.pt or .pksparse, told apart
    by their content) or any --model spec, such as vgg11. A layer's sparsity is
    its weight's (biases are counted in params and zeros, not in the sparsity).

    --groups lists the channel groups instead: convs and Linear layers coupled by
    residual additions, grouped convs or gates, whose channels channel pruning and
    `compact` remove together, and the channels that must stay (with the graph node
    that fixes them).
    """
    from prunekit.measure.sparsity import sparsity_report

    size = parse_input_size(input_size)
    model = load_checkpoint_argument("report", checkpoint, weights, trust_checkpoint)
    if size is not None:
        check_input_fits(model, size, "--input-size", input_size)
    if groups:
        _print_groups(model, as_json)
        return
    report = sparsity_report(model, input_size=size)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(str(report))


def _print_groups(model, as_json: bool) -> None:
    from prunekit.dependency import channel_groups

    found = channel_groups(model)
    if as_json:
        emit_json({"groups": [
            {"name": g.name, "members": list(g.members), "units": len(g.units),
             "removable_units": len(g.removable_units), "fixed": list(g.fixed_reasons), "joined_by": list(g.joined_by)}
            for g in found
        ]})
        return
    coupled = sum(len(g.members) > 1 for g in found)
    click.echo(f"{len(found)} channel groups ({coupled} coupling several layers):")
    for group in found:
        click.echo(f"  {group}")
