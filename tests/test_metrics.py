"""Built-in scan metrics: OutputDistortion and Accuracy."""

import math

import pytest
import torch
from torch import nn

from prunekit.sensitivity import Accuracy, OutputDistortion


def conv_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3)).eval()


def test_distortion_of_the_dense_model_is_zero():
    model = conv_net()
    metric = OutputDistortion(torch.randn(2, 3, 8, 8))
    metric.prepare(model)
    assert metric(model) == 0.0
    assert metric.higher_is_better is False and metric.name == "distortion"


def test_distortion_is_the_relative_l2_distance_over_all_batches():
    model = conv_net()
    batches = [torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    metric = OutputDistortion(batches)
    metric.prepare(model)
    reference = [model(x).detach() for x in batches]
    with torch.no_grad():
        model[2].weight.mul_(0.5)
    outputs = [model(x).detach() for x in batches]
    error = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(outputs, reference))
    norm = sum(float(r.double().pow(2).sum()) for r in reference)
    assert metric(model) == pytest.approx(math.sqrt(error / norm), rel=1e-12)


def test_distortion_of_named_feature_maps_is_their_mean():
    model = conv_net()
    x = torch.randn(2, 3, 8, 8)
    metric = OutputDistortion(x, layers=["0", "2"])
    metric.prepare(model)
    dense_out = model(x).detach()
    with torch.no_grad():
        model[2].weight.mul_(0.5)  # map "0" is unchanged, map "2" (the output) changes
    out = model(x).detach()
    distance = float((out - dense_out).double().norm() / dense_out.double().norm())
    assert metric(model) == pytest.approx((0.0 + distance) / 2, rel=1e-6)


def test_feature_map_is_read_before_an_inplace_relu_overwrites_it():
    model = conv_net()
    with torch.no_grad():
        model[0].bias.zero_()
    metric = OutputDistortion(torch.randn(4, 3, 8, 8), layers=["0"])
    metric.prepare(model)
    with torch.no_grad():
        model[0].weight.neg_()  # the conv output flips sign: ||-y - y|| / ||y|| = 2
    # Read after ReLU(inplace=True) instead, the maps would be relu(-y) vs relu(y): distance ~1.
    assert metric(model) == pytest.approx(2.0, rel=1e-6)


def test_distortion_needs_prepare():
    with pytest.raises(RuntimeError, match="prepare"):
        OutputDistortion(torch.randn(1, 3, 8, 8))(conv_net())


def test_distortion_unknown_layer_lists_conv_layers():
    metric = OutputDistortion(torch.randn(1, 3, 8, 8), layers=["features.9"])
    with pytest.raises(KeyError, match="conv layers are: 0, 2"):
        metric.prepare(conv_net())


def test_metric_leaves_no_hooks():
    model = conv_net()
    metric = OutputDistortion(torch.randn(1, 3, 8, 8), layers=["0", "1"])
    metric.prepare(model)
    metric(model)
    assert all(not m._forward_hooks for m in model.modules())


def test_accuracy_counts_correct_top1_over_batches():
    model = nn.Sequential(nn.Flatten()).eval()  # logits are the inputs themselves
    batches = [
        (torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0])),
        (torch.tensor([[0.3, 0.7]]), torch.tensor([1])),
    ]
    metric = Accuracy(batches)
    assert metric(model) == pytest.approx(2 / 3)
    assert metric.higher_is_better is True and metric.name == "accuracy"


def test_accuracy_needs_labels():
    with pytest.raises(TypeError, match="labels"):
        Accuracy([torch.randn(2, 3, 8, 8)])(conv_net())


def test_accuracy_needs_class_scores():
    metric = Accuracy([(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        metric(conv_net())


def test_metrics_called_directly_score_in_eval_mode_and_restore_the_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Dropout(0.5), nn.LazyLinear(2))
    x = torch.rand(4, 3, 8, 8)
    model(x)  # materialise the lazy layer
    model.train()
    running = model[1].running_mean.clone()
    metric = OutputDistortion(x)
    metric.prepare(model)
    assert metric(model) == 0.0  # dropout off, BatchNorm on its running statistics: deterministic
    assert torch.equal(model[1].running_mean, running)  # not updated
    assert all(module.training for module in model.modules())
    labels = Accuracy([(x, torch.zeros(4, dtype=torch.long))])
    assert labels(model) == labels(model)
    assert all(module.training for module in model.modules())
