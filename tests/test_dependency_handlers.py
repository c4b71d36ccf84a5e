"""One handler per op type: a new op is one handler, the built-in rules are handlers, and compact/ lists no layer types."""

from __future__ import annotations

import ast
import operator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import prunekit
from prunekit.compact import compact
from prunekit.dependency import (
    Handler,
    UnsupportedGraphError,
    channel_groups,
    handler_of,
    register_handler,
    unregister_handler,
)
from prunekit.dependency.flow import CONV
from prunekit.dependency.registry import handler_for_method


class LayerScale(nn.Module):
    """A learned per-channel scale (ConvNeXt's layer scale), unknown to prunekit."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 2.0, channels))

    def forward(self, x):
        return x * self.gamma.view(1, -1, 1, 1)


class LayerScaleHandler(Handler):
    """The user's rule: channels pass, the scale follows them, a constant is scaled."""

    resizable = True

    def trace(self, tracer, node, module):
        tracked = tracer.single(node)
        if tracked is None or tracked.layout != CONV or len(tracked.ids) != module.gamma.numel():
            tracer.unsupported(node, "does not match its channels")
            return
        tracer.flow.per_channel[node.target] = tracked.ids
        tracer.flow.values[node] = tracked

    def constant(self, constants, node, module):
        return constants.incoming(node) * module.gamma.detach().double().cpu()

    def resize(self, module, keep_in, keep_out, fold):
        new = LayerScale(len(keep_out))
        with torch.no_grad():
            new.gamma.copy_(module.gamma.detach()[keep_out])
        return new


def _scaled_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), LayerScale(6), nn.Conv2d(6, 4, 3, padding=1))
    with torch.no_grad():
        model[0].bias.uniform_(0.5, 1.0)  # a removed channel carries a non-zero constant into the scale
    return model.eval()


@pytest.fixture
def layer_scale_handler():
    handler = register_handler(LayerScale, LayerScaleHandler())
    yield handler
    unregister_handler(LayerScale)


def test_an_op_without_a_handler_fixes_the_channels_it_meets_naming_the_node():
    (group, _) = channel_groups(_scaled_model())
    assert not group.removable_units
    # traced into: its multiply by a parameter is an op whose channels prunekit does not follow
    assert group.fixed_reasons == ("mul() (graph node 'mul') combines them with a tensor whose channels prunekit does not follow",)


def test_a_new_op_is_one_handler_and_compact_then_removes_channels_through_it(layer_scale_handler):
    model = _scaled_model()
    (group, _) = channel_groups(model)
    assert len(group.removable_units) == 6
    prune.custom_from_mask(model[0], "weight", torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool).view(6, 1, 1, 1).expand(6, 3, 3, 3))
    x = torch.randn(2, 3, 12, 12)
    compacted = compact(model, x)  # checks the output against the input model's
    assert compacted[0].out_channels == 4 and compacted[2].gamma.numel() == 4 and compacted[3].in_channels == 4
    torch.testing.assert_close(compacted(x), model(x), rtol=1e-5, atol=1e-5)


def test_registering_refuses_a_taken_op_unless_replace_and_names_the_handler(layer_scale_handler):
    with pytest.raises(ValueError, match="LayerScaleHandler.*replace=True"):
        register_handler(LayerScale, Handler())
    other = register_handler(LayerScale, LayerScaleHandler(), replace=True)
    assert handler_of(LayerScale(2)) is other
    with pytest.raises(TypeError, match="nn.Module class"):
        register_handler(int, Handler())
    with pytest.raises(ValueError, match="method's name"):
        register_handler("not a name", Handler())
    with pytest.raises(TypeError, match="Handler instance"):
        register_handler(LayerScale, object(), replace=True)
    with pytest.raises(KeyError, match="no handler"):
        unregister_handler(nn.Embedding)


def test_a_module_with_a_handler_is_traced_whole_and_its_subclasses_are_not(layer_scale_handler):
    from prunekit.dependency import trace_graph

    class Doubled(LayerScale):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(nn.Conv2d(3, 6, 3), LayerScale(6), Doubled(6))
    ops = [(node.op, str(node.target)) for node in trace_graph(model)[0].nodes]
    assert ("call_module", "1") in ops and ("call_module", "2") not in ops


@pytest.mark.parametrize(
    "op, handler",
    [
        (nn.Conv2d(2, 2, 1), "ConvHandler"),
        (prunekit.BorderBiasConv2d(2, 2, 1), "ConvHandler"),
        (nn.ConvTranspose2d(2, 2, 2), "ConvTransposeHandler"),
        (nn.Linear(2, 2), "LinearHandler"),
        (nn.BatchNorm2d(2), "BatchNormHandler"),
        (nn.PReLU(2), "PReLUHandler"),
        (nn.Hardswish(), "ActivationHandler"),
        (nn.AdaptiveAvgPool2d(1), "ConstantPoolHandler"),
        (nn.ZeroPad2d(1), "PaddingPoolHandler"),
        (nn.Flatten(), "FlattenHandler"),
    ],
)
def test_every_built_in_layer_rule_is_a_handler(op, handler):
    assert type(handler_of(op)).__name__ == handler


def test_functions_and_methods_find_their_handlers():
    from prunekit.dependency.registry import _FUNCTIONS

    assert type(_FUNCTIONS[operator.add]).__name__ == "ArithmeticHandler"
    assert type(_FUNCTIONS[torch.cat]).__name__ == "CatHandler"
    assert type(handler_for_method("view")).__name__ == "FlattenHandler"
    assert type(handler_for_method("chunk")).__name__ == "FixedSplitHandler"
    assert type(handler_for_method("permute")).__name__ == "PermuteHandler"
    assert handler_for_method("transpose") is None  # not followed: the channels it meets are fixed


def test_compact_lists_no_layer_types():
    """compact/ asks each op's handler; an isinstance over layer types there would be a second rule."""
    found = []
    for path in sorted((Path(prunekit.__file__).parent / "compact").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                kinds = ast.unparse(node.args[1])
                if "nn." in kinds and kinds != "nn.Module":
                    found.append(f"{path.name}:{node.lineno} {kinds}")
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.Is) for op in node.ops):
                if ast.unparse(node.left).startswith("type(") and "nn." in ast.unparse(node):
                    found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not found, found


def test_a_refused_constant_names_the_node():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AvgPool2d(3, padding=1), nn.Conv2d(4, 2, 1)).eval()
    with torch.no_grad():
        model[1].bias.fill_(1.0)
    prune.custom_from_mask(model[0], "weight", torch.tensor([0, 1, 1, 1], dtype=torch.bool).view(4, 1, 1, 1).expand(4, 3, 3, 3))
    with pytest.raises(UnsupportedGraphError, match="reach AvgPool2d '2': AvgPool2d '2' averages in zero padding"):
        compact(model)


def test_the_readmes_handler_runs_as_written():
    import re

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "register_handler(LayerScale" in b]

    class LayerScale(nn.Module):
        def __init__(self, gamma):
            super().__init__()
            self.gamma = nn.Parameter(gamma.clone())

        def forward(self, x):
            return x * self.gamma.view(1, -1, 1, 1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), LayerScale(torch.linspace(0.5, 2.0, 6)), nn.Conv2d(6, 4, 3)).eval()
    prune.ln_structured(model[0], "weight", amount=0.5, n=1, dim=0)
    namespace = {"prunekit": prunekit, "LayerScale": LayerScale, "masked_model": model}
    try:
        exec(block, namespace)
    finally:
        unregister_handler(LayerScale)
    small = namespace["small"]
    assert small[0].out_channels == 3 and small[2].gamma.numel() == 3 and small[3].in_channels == 3
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_plan_on_channels_that_meet_an_unfollowed_op_is_refused_before_masking():
    """Never masked and then refused by compact (issue: efficientnet_b0 at half of every conv)."""

    class Rolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(torch.roll(self.a(x), 1, dims=1))  # moves channels: not followed

    model = Rolled()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'a' cannot be channel-pruned: none of its 4 channels.*roll\(\).*leave it out of the plan"):
        prunekit.apply_plan(model, {"a": 0.5}, method="filter-norm")
    assert not hasattr(model.a, "weight_mask") and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_torchvisions_stochastic_depth_is_followed_in_eval_mode_so_its_residual_compacts():
    from torchvision.ops import StochasticDepth

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.branch, self.drop = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3, padding=1), StochasticDepth(0.2, "row")
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            x = self.stem(x)
            return self.head(x + self.drop(self.branch(x)))

    torch.manual_seed(0)
    model = Block().eval()
    (stream, _) = channel_groups(model)
    assert stream.members == ("stem", "branch") and len(stream.removable_units) == 6
    masked = prunekit.apply_plan(prunekit.copy_model(model), {"stem": 0.5}, method="filter-norm")
    x = torch.randn(2, 3, 10, 10)
    small = compact(masked, x)
    assert small.stem.out_channels == 3 and small.branch.out_channels == 3 and small.head.in_channels == 3
    torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    model.train()
    # traced in training mode it drops samples at random: not followed (the scanner traces the model as it is) ...
    from prunekit.dependency import trace_graph
    from prunekit.dependency.flow import FlowTracer

    flow = FlowTracer(model, trace_graph(model)[0]).run()
    assert any("drops samples at random" in reason for reasons in flow.fixed.values() for reason in reasons)
    # ... while the channel groups, traced in eval mode, follow it whatever the model's mode
    assert len(channel_groups(model)[0].removable_units) == 6


def test_a_function_is_registered_by_its_dotted_name():
    handler = register_handler("mypackage.ops.shift", Handler())
    try:
        assert register_handler("mypackage.ops.shift", handler) is handler  # the same handler again: fine
        with pytest.raises(ValueError, match="already has a handler"):
            register_handler("mypackage.ops.shift", Handler())
    finally:
        unregister_handler("mypackage.ops.shift")
    with pytest.raises(ValueError, match="dotted name"):
        register_handler("mypackage..shift", Handler())
