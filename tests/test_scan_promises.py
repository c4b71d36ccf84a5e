"""The scan leaves the model as it found it, whatever evaluate() does, and refuses layers it cannot prune alone."""


import pytest
import torch
from torch import nn

import prunekit
from prunekit.sensitivity import OutputDistortion, scan


def model_with_batchnorm():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()


def test_grads_come_back_by_value_after_an_evaluate_that_calls_backward():
    model = model_with_batchnorm()
    x = torch.rand(2, 3, 8, 8)
    model(x).sum().backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    objects = {name: p.grad for name, p in model.named_parameters()}

    def training_evaluate(m):
        m(x).pow(2).sum().backward()  # accumulates into the same .grad tensors
        return 1.0

    scan(model, training_evaluate, sparsities=(0.5,), progress=False)
    for name, p in model.named_parameters():
        assert p.grad is objects[name] and torch.equal(p.grad, before[name]), name


def test_reassigned_buffers_are_put_back_as_the_same_objects():
    model = model_with_batchnorm()
    original = model[1].running_mean

    def reassigning_evaluate(m):
        m[1].running_mean = torch.full_like(m[1].running_mean, 7.0)
        return 1.0

    scan(model, reassigning_evaluate, sparsities=(0.5,), progress=False)
    assert model[1].running_mean is original and torch.equal(original, torch.zeros(8))


def test_an_interrupt_inside_the_cleanup_still_restores_everything(monkeypatch):
    import prunekit.sensitivity.guard as guard

    model = model_with_batchnorm().train()
    real = guard.ModelGuard._restore_once
    calls = []

    def interrupted_once(self):
        calls.append(1)
        if len(calls) == 1:
            self.unswap()  # part of the work, then Ctrl-C
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(guard.ModelGuard, "_restore_once", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        scan(model, lambda m: 1.0, sparsities=(0.5,), progress=False)
    assert len(calls) == 2 and all(module.training for module in model.modules())


def test_tied_weights_are_refused_naming_both_layers():
    first, second = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    second.weight = first.weight
    model = nn.Sequential(nn.Conv2d(3, 4, 1), first, nn.ReLU(), second)
    with pytest.raises(ValueError, match=r"layer '1' shares its weight with '3' \(tied parameters\)"):
        scan(model, OutputDistortion(torch.rand(1, 3, 8, 8)), layers=["1"], progress=False)
    with pytest.raises(ValueError, match="tied parameters"):
        prunekit.apply_plan(model, {"3": 0.5})
    assert not hasattr(first, "weight_orig") and not hasattr(second, "weight_orig")
    reused = nn.Conv2d(4, 4, 3, padding=1)  # one module used twice is fine: it is pruned alike in both uses
    prunekit.apply_plan(nn.Sequential(nn.Conv2d(3, 4, 1), reused, nn.ReLU(), reused), {"1": 0.5})


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old_weight_norm"])
def test_parametrized_convs_get_a_clear_error(kind):
    conv = nn.Conv2d(3, 4, 3)
    if kind == "weight_norm":
        conv = nn.utils.parametrizations.weight_norm(conv)
        fix = "remove_parametrizations"
    elif kind == "spectral_norm":
        conv = nn.utils.parametrizations.spectral_norm(conv)
        fix = "remove_parametrizations"
    else:
        with pytest.warns(FutureWarning):
            conv = nn.utils.weight_norm(conv)
        fix = "remove_weight_norm"
    model = nn.Sequential(conv, nn.ReLU())
    with pytest.raises(ValueError, match=fix):
        scan(model, OutputDistortion(torch.rand(1, 3, 8, 8)), progress=False)
    with pytest.raises(ValueError, match=fix):
        prunekit.apply_plan(model, {"0": 0.5})


def test_nan_channel_statistics_are_refused_naming_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    scores = {"0": torch.tensor([1.0, float("nan"), 0.5, 0.2]), "2": torch.ones(4)}
    with pytest.raises(ValueError, match=r"layer '0' hold 1 NaN/inf values \(channel 1 first\)"):
        prunekit.apply_plan(model, {"0": 0.5}, method="channel", stats=scores)
    with pytest.raises(ValueError, match="layer '0'"):
        scan(model, OutputDistortion(torch.rand(1, 3, 8, 8)), method="channel", stats=scores, progress=False)


def test_resume_refuses_other_data_even_when_the_dense_distortion_is_zero():
    model = model_with_batchnorm()
    partial = scan(model, OutputDistortion(torch.rand(2, 3, 8, 8)), sparsities=(0.5, 0.9), progress=False)
    partial.scores["3"] = [None, None]
    other_data = OutputDistortion(torch.rand(2, 3, 8, 8))  # baseline 0 again: only the fingerprint tells
    with pytest.raises(ValueError, match="the data or the weights"):
        scan(model, other_data, sparsities=(0.5, 0.9), progress=False, resume_from=partial)


def test_resume_refuses_another_channel_criterion():
    model = model_with_batchnorm()
    stats = prunekit.collect_channel_stats(model, [torch.rand(2, 3, 8, 8)])
    metric = OutputDistortion(torch.rand(2, 3, 8, 8))
    partial = scan(model, metric, sparsities=(0.5,), method="channel", stats=stats, criterion="l2", progress=False)
    partial.scores["3"] = [None]
    with pytest.raises(ValueError, match="the channel criterion"):
        scan(model, metric, sparsities=(0.5,), method="channel", stats=stats, criterion="l0",
             progress=False, resume_from=partial)
    resumed = scan(model, metric, sparsities=(0.5,), method="channel", stats=stats, criterion="l2",
                   progress=False, resume_from=partial)
    assert resumed.complete
