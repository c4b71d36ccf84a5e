"""The 2:4 method: the pattern, torch's machinery, scans and plans at its one level, sparse files, export, CUDA."""

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import prunekit
from prunekit.cli import cli
from prunekit.export import export_program, semi_structured_layers, to_semi_structured
from prunekit.methods.registry import get_method
from prunekit.methods.semi_structured import SemiStructured24, is_semi_structured, semi_structured_mask
from prunekit.planning import Budget, fit_plan
from prunekit.sensitivity import OutputDistortion, scan
from prunekit.training.schedules import GradualPruner


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _images():
    return torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def test_every_run_of_four_keeps_its_two_largest_magnitudes():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    mask = semi_structured_mask(weight)
    runs, kept = weight.abs().reshape(16, 8, 4), mask.reshape(16, 8, 4)
    assert (kept.sum(-1) == 2).all()
    smallest_kept = torch.where(kept == 1, runs, torch.inf).amin(-1)
    largest_zeroed = torch.where(kept == 0, runs, -torch.inf).amax(-1)
    assert (smallest_kept >= largest_zeroed).all()


def test_ties_zero_the_earlier_weights_and_tiny_magnitudes_stay_apart():
    assert semi_structured_mask(torch.ones(1, 4)).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    tiny = torch.tensor([[2e-9, 1e-9, 4e-9, 3e-9]])
    assert semi_structured_mask(tiny).tolist() == [[0.0, 0.0, 1.0, 1.0]]
    linear = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(tiny)
    SemiStructured24.apply(linear, "weight")
    assert linear.weight_mask.tolist() == [[0.0, 0.0, 1.0, 1.0]]  # torch's path picks what the mask function picks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_scan_masks_are_the_applied_masks_bit_for_bit(dtype):
    model = _mlp().to(dtype)
    method = get_method("2:4")
    block = method.block(model, "1")
    made = method.mask_maker(block, None)(0.5)[0]
    method.apply(block, "1", 0.5, None)
    assert torch.equal(made, model[1].weight_mask) and made.dtype == dtype
    assert is_semi_structured(model[1].weight) and method.current_sparsity(block) == 0.5


def test_a_weight_already_pruned_keeps_its_zeros_and_becomes_2_4():
    linear = nn.Linear(8, 4)
    prune.l1_unstructured(linear, "weight", amount=11)
    before = linear.weight_mask.clone()
    SemiStructured24.apply(linear, "weight")
    assert (linear.weight_mask <= before).all() and is_semi_structured(linear.weight)
    again = linear.weight_mask.clone()
    SemiStructured24.apply(linear, "weight")
    assert torch.equal(linear.weight_mask, again)  # applied twice: nothing changes


def test_bad_layers_and_levels_are_refused_naming_them():
    method = get_method("2:4")
    odd = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match="layer '0' has 6 inputs, not a multiple of 4"):
        method.apply(method.block(odd, "0"), "0", 0.5, None)
    with pytest.raises(ValueError, match="sparsity 0.3 is not a 2:4 level"):
        method.apply(method.block(_mlp(), "1"), "1", 0.3, None)
    with pytest.raises(ValueError, match="shape \\(4, 3, 3, 3\\); 2:4 sparsity is for Linear weights"):
        semi_structured_mask(torch.ones(4, 3, 3, 3))
    assert get_method("2:4").layer_types == (nn.Linear,)


def test_a_scan_measures_the_one_level_and_leaves_the_model_as_it_was():
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metric = OutputDistortion(_images())
    with pytest.raises(ValueError, match="prunes only to 0.5 .*not to 0.4, 0.9; scan --sparsities 0.5"):
        scan(model, metric, method="2:4", sparsities=(0.4, 0.5, 0.9), progress=False)
    result = scan(model, metric, method="2:4", sparsities=(0.5,), progress=False)
    assert result.layers == ["1", "3", "5"] and result.sparsities == (0.5,)
    assert all(0 < result.score(layer, 0.5) for layer in result.layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    fit = fit_plan(model, metric, result, max_drop=1.0)
    assert set(fit.plan.values()) <= {0.0, 0.5} and any(fit.plan.values())
    budget = fit_plan(model, metric, result, budget=Budget(macs=0.8), method="2:4")
    assert set(budget.plan.values()) <= {0.0, 0.5} and budget.measured.macs <= 0.8 * budget.dense.macs
    assert not budget.dense_hardware


def test_a_2_4_plan_round_trips_through_a_sparse_file_and_exports(tmp_path):
    model = prunekit.apply_plan(_mlp(), {"1": 0.5, "3": 0.5}, method="2:4")
    prunekit.finalize(model)
    assert semi_structured_layers(model) == ["1", "3"]
    path = tmp_path / "model.pksparse"
    prunekit.save_sparse(model, path)
    loaded = prunekit.load_sparse(path, _mlp())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert semi_structured_layers(loaded) == ["1", "3"]
    dense = tmp_path / "dense.pksparse"
    prunekit.save_sparse(_mlp(), dense)
    assert path.stat().st_size < dense.stat().st_size
    assert export_program(loaded, _images()[:1], tmp_path / "model.pt2") < 1e-6


def test_to_semi_structured_says_what_it_needs_on_this_machine():
    masked = prunekit.apply_plan(_mlp(), {"1": 0.5}, method="2:4")
    with pytest.raises(ValueError, match="prunekit.finalize"):
        to_semi_structured(masked)
    with pytest.raises(ValueError, match="no Linear layer of the model holds a 2:4 pattern"):
        to_semi_structured(_mlp())
    final = prunekit.finalize(masked)
    with pytest.raises(ValueError, match=r"\['3'\] do not hold a 2:4 pattern"):
        to_semi_structured(final, ["1", "3"])
    with pytest.raises(ValueError, match="torch.float32 on cpu: 2:4 kernels run on CUDA"):
        to_semi_structured(final)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 kernels need a CUDA GPU")
def test_on_cuda_to_semi_structured_takes_the_weights_and_keeps_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128)).half().cuda().eval()
    model = prunekit.finalize(prunekit.apply_plan(model, {"0": 0.5, "2": 0.5}, method="2:4"))
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = model(x)
        to_semi_structured(model)
        actual = model(x)
    torch.testing.assert_close(actual, expected)


def test_a_schedule_cannot_ramp_a_fixed_pattern():
    with pytest.raises(ValueError, match="a schedule has no sparsities between"):
        GradualPruner(_mlp(), {"1": 0.5}, 0, 10, method="2:4")


def test_the_cli_scans_2_4_at_its_own_level(runner, one_error_line):
    result = runner.invoke(cli, ["scan", "--method", "2:4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "50%" in result.output and "classifier.1" in result.output and "40%" not in result.output
    one_error_line(runner.invoke(cli, ["scan", "--method", "2:4", "--sparsities", "0.4,0.5"]),
                   "prunes only to 0.5", "--sparsities 0.5")
