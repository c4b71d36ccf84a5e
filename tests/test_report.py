"""sparsity_report counts zeros and MACs of dense, masked and finalized models."""

import json

import pytest
import torch
from torch import nn

from prunekit import apply_plan, finalize, sparsity_report


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


def test_dense_counts_and_macs():
    model = _model()
    with torch.no_grad():
        model[0].bias.fill_(0.1)
        model[3].bias.fill_(0.1)
    report = sparsity_report(model, input_size=(3, 8, 8))
    conv, linear = report.layers
    assert conv.params == 8 * 27 + 8 and conv.zeros == 0
    assert conv.macs == 6 * 6 * 8 * 27 == conv.effective_macs
    assert linear.macs == 288 * 10
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.dense_bytes == 4 * report.total_params


def test_masked_and_finalized_reports_agree():
    model = apply_plan(_model(), {"0": 0.5})
    masked = sparsity_report(model, input_size=(3, 8, 8))
    finalized = sparsity_report(finalize(model), input_size=(3, 8, 8))
    assert masked.to_dict() == finalized.to_dict()
    assert masked.layers[0].effective_macs == 36 * 108
    assert masked.total_zeros >= 108


def test_report_does_not_change_model_or_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsity_report(model, input_size=(3, 8, 8))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_table_and_dict_are_printable():
    report = sparsity_report(apply_plan(_model(), {"0": 0.5}), input_size=(3, 8, 8))
    text = str(report)
    assert "Conv2d" in text and "total" in text and "MiB" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["layers"][0]["name"] == "0"
    assert data["compression"] > 1


def test_bad_input_size_is_rejected():
    with pytest.raises(ValueError, match="input_size"):
        sparsity_report(_model(), input_size=(3, 0, 8))


def test_one_mac_counter_agrees_with_flop_counter_mode_and_counts_every_call():
    from torch.utils.flop_counter import FlopCounterMode

    from prunekit.compact import layer_costs
    from prunekit.measure.sparsity import count_macs

    torch.manual_seed(0)
    shared = nn.Conv2d(8, 8, 3, padding=1)  # called twice per forward
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.ReLU(), shared, nn.ReLU(), shared,
        nn.Conv2d(8, 8, 3, groups=4), nn.Flatten(), nn.LazyLinear(5),
    ).eval()
    x = torch.zeros(2, 3, 10, 10)
    model(x)
    with FlopCounterMode(display=False) as counter:
        model(x)
    flops = counter.get_total_flops()
    macs = count_macs(model, (2, 3, 10, 10))
    assert sum(dense for dense, _ in macs.values()) * 2 * 2 == flops  # per sample x 2 samples x 2 FLOPs per MAC
    assert macs["2"][0] == 2 * 8 * 8 * 9 * 100  # both calls of the shared conv
    from prunekit import sparsity_report

    report = sparsity_report(model, input_size=(3, 10, 10))
    assert report.macs == sum(dense for dense, _ in macs.values())
    assert {k: c.macs for k, c in layer_costs(model, (3, 10, 10)).items()} == {k: d for k, (d, _) in macs.items()}
