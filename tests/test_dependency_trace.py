"""One trace per model: the graph and the channel groups are kept while the model's structure stays the same."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from prunekit.dependency import Handler, channel_groups, register_handler, trace_graph, unregister_handler
from prunekit.dependency.trace import ConvLeafTracer


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()


def test_a_model_is_traced_once_while_its_structure_stays(monkeypatch):
    traced = []
    real = ConvLeafTracer.trace
    monkeypatch.setattr(ConvLeafTracer, "trace", lambda self, root, *a, **k: traced.append(root) or real(self, root, *a, **k))
    model = _model()
    graph = trace_graph(model)[0]
    groups = channel_groups(model)
    torch.nn.utils.prune.l1_unstructured(model[0], "weight", amount=0.5)  # masking changes weights, not the graph
    assert trace_graph(model)[0] is graph and channel_groups(model) == groups
    assert traced == [model]


def test_a_changed_structure_is_traced_again():
    model = _model()
    graph = trace_graph(model)[0]
    model.train()
    trained = trace_graph(model)[0]
    assert trained is not graph
    model.eval()
    model[2] = nn.ReLU()  # a new module object
    assert trace_graph(model)[0] is not graph


def test_registering_a_handler_traces_again():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 2

    class ScaleHandler(Handler):
        def trace(self, tracer, node, module):
            tracer.pass_through(node)

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Scale(), nn.Conv2d(4, 2, 1))
    before = [node.op for node in trace_graph(model)[0].nodes]
    register_handler(Scale, ScaleHandler())
    try:
        after = [node.op for node in trace_graph(model)[0].nodes]
    finally:
        unregister_handler(Scale)
    assert before.count("call_module") == 2 and after.count("call_module") == 3


def test_groups_follow_a_hook_added_after_they_were_computed():
    model = _model()
    assert [group.members for group in channel_groups(model)] == [("0",), ("3",)]
    handle = model[0].register_forward_hook(lambda module, inputs, output: None)
    try:
        # a conv with a hook is not followed: it is no longer a group's member
        assert [group.members for group in channel_groups(model)] == [("3",)]
    finally:
        handle.remove()
    assert len(channel_groups(model)[0].removable_units) == 4


def test_what_is_kept_does_not_keep_the_model_alive():
    model = _model()
    trace_graph(model)
    channel_groups(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
