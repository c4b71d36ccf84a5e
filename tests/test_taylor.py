"""The first-order Taylor method: its importance is the loss's derivative in each channel's gate, squared per batch."""

import pytest
import torch
from torch import nn

import prunekit
from prunekit.methods.registry import get_method
from prunekit.methods.taylor import taylor_importance
from prunekit.sensitivity import Accuracy, OutputDistortion, scan


def net(classes: int = 0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU()]
    if classes:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, classes)]
    model = nn.Sequential(*layers).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


def batches(labelled: bool, count: int = 3):
    generator = torch.Generator().manual_seed(5)
    out = []
    for _ in range(count):
        x = torch.randn(4, 3, 8, 8, generator=generator)
        out.append((x, torch.randint(0, 3, (4,), generator=generator)) if labelled else x)
    return out


def scaled_loss(model, gate, channel, t, x, y):
    """The cross-entropy with one channel's gate scaled by t (a finite difference's side)."""
    pruned = prunekit.copy_model(model)
    with torch.no_grad():
        for module_name, name in gate:
            getattr(pruned.get_submodule(module_name), name)[channel] *= t
    with torch.no_grad():
        return float(nn.functional.cross_entropy(pruned(x).double(), y))


def test_the_importance_is_the_squared_derivative_of_the_loss_in_the_channels_gate_summed_over_batches():
    model = net(classes=3).double()
    data = [(x.double(), y) for x, y in batches(labelled=True)]
    got = taylor_importance(model, data)
    gates = {"0": [("1", "weight"), ("1", "bias")], "3": [("3", "weight"), ("3", "bias")]}  # BatchNorm's, else own
    for layer, gate in gates.items():
        channels = got[layer].numel()
        expected = torch.zeros(channels, dtype=torch.float64)
        for x, y in data:
            for c in range(channels):
                h = 1e-5
                slope = (scaled_loss(model, gate, c, 1 + h, x, y) - scaled_loss(model, gate, c, 1 - h, x, y)) / (2 * h)
                expected[c] += slope ** 2
        torch.testing.assert_close(got[layer].double(), expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_half_precision_models_give_the_float32_ranking_within_their_tolerance(dtype):
    model = net()
    data = batches(labelled=False)
    reference = taylor_importance(model, data)
    if dtype is not torch.float32:
        model = model.to(dtype)
        data = [x.to(dtype) for x in data]
    got = taylor_importance(model, data)
    # The scores are float32 whatever the model's dtype; gradients differ by the dtype's rounding, through a
    # forward and a backward and then squared: 32 units of its precision, relative to the largest score.
    tolerance = 32 * torch.finfo(dtype).eps
    for layer, values in reference.items():
        assert got[layer].dtype == torch.float32
        scale = float(values.max())
        torch.testing.assert_close(got[layer] / scale, values / scale, rtol=0, atol=tolerance)


def test_the_model_is_left_as_it_was_grads_flags_and_weights():
    model = net(classes=3)
    model[0].weight.requires_grad_(False)
    model[1].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    taylor_importance(model, batches(labelled=True))
    assert all(p.grad is None for p in model.parameters())
    assert not model[0].weight.requires_grad and model[3].weight.requires_grad
    assert model[1].training and not model[0].training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # eval mode: running stats untouched


def test_a_silent_channel_scores_zero_and_is_pruned_first():
    model = net()
    with torch.no_grad():
        model[1].weight[2] = 0.0
        model[1].bias[2] = 0.0
    method = get_method("taylor").prepare(model, batches(labelled=False))
    assert float(method.data["0"][2]) == 0.0 and bool((method.data["0"][[0, 1, 3, 4, 5]] > 0).all())
    pruned = prunekit.apply_plan(prunekit.copy_model(model), {"0": 1 / 6}, method=method)
    assert (pruned[0].weight.flatten(1) == 0).all(1).nonzero().flatten().tolist() == [2]


def test_unlabelled_and_labelled_batches_both_score_and_bad_labels_are_refused():
    model = net(classes=3)
    labelled = taylor_importance(model, batches(labelled=True))
    unlabelled = taylor_importance(model, batches(labelled=False))
    assert all(bool((v > 0).all()) for v in list(labelled.values()) + list(unlabelled.values()))
    assert not torch.allclose(labelled["0"], unlabelled["0"])
    with pytest.raises(ValueError, match="labelled batches need class logits"):
        taylor_importance(net(), batches(labelled=True))  # a feature map, not logits
    with pytest.raises(ValueError, match="batches is empty"):
        taylor_importance(model, [])


def test_taylor_scans_fits_and_schedules_like_the_other_channel_methods():
    model = net(classes=3)
    data = batches(labelled=True)
    method = get_method("taylor").prepare(model, data)
    result = scan(model, Accuracy(data), sparsities=(0.2, 0.5), method=method, progress=False)
    assert result.method == "taylor" and result.meta["fingerprint"]["channel_scores"] is not None
    metric = OutputDistortion([x for x, _ in data])
    distortion = scan(model, metric, sparsities=(0.2, 0.5), method=method, progress=False)
    fit = prunekit.fit_plan(model, metric, distortion, max_drop=10.0, method=method)
    assert any(fit.plan.values())
    pruner = prunekit.GradualPruner(prunekit.copy_model(model), {"0": 0.5}, start_step=0, end_step=2, method=method)
    pruner.step(), pruner.step()
    assert pruner.sparsity("0") == 0.5 and pruner.state_dict()["method"] == "taylor"
