"""prunekit.finalize removes the reparametrization: no hooks, no _orig/_mask, no mask multiply, same output."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import prunekit


def masked_model(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )  # fmt: skip
    stats = {"0": torch.rand(8), "3": torch.rand(16)} if method == "channel" else None
    prunekit.apply_plan(model, {"0": 0.5, "3": 0.75}, method=method, stats=stats)
    prune.l1_unstructured(model[6], "weight", amount=0.5)  # torch's own methods are finalized too
    return model.eval()


@pytest.mark.parametrize("method", ["fine-grained", "channel"])
def test_finalize_leaves_no_hooks_and_no_orig_or_mask(method):
    model = prunekit.finalize(masked_model(method))
    assert all(not module._forward_pre_hooks for module in model.modules())
    names = list(model.state_dict()) + [name for name, _ in model.named_parameters()]
    assert not [name for name in names if name.endswith(("_orig", "_mask"))]


@pytest.mark.parametrize("method", ["fine-grained", "channel"])
def test_finalized_output_is_identical(method):
    model = masked_model(method)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(prunekit.finalize(model)(x), expected)


def test_finalized_forward_does_no_mask_multiply(monkeypatch):
    calls = []
    original = prune.BasePruningMethod.apply_mask

    def counting(self, module):
        calls.append(self._tensor_name)
        return original(self, module)

    monkeypatch.setattr(prune.BasePruningMethod, "apply_mask", counting)
    model = masked_model("fine-grained")
    x = torch.randn(1, 3, 8, 8)
    calls.clear()  # applying the masks computed each weight once
    with torch.no_grad():
        model(x)
        assert len(calls) == 3  # one weight * mask per pruned tensor, at every forward
        prunekit.finalize(model)
        calls.clear()
        model(x)
    assert calls == []
