"""FineGrainedL1 and ChannelActivation under torch's own pruning machinery."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from prunekit import ChannelActivation, FineGrainedL1, channel_activation, fine_grained_l1


def _scores(conv):
    return torch.arange(conv.out_channels, dtype=torch.float32).flip(0)


def _prune_fine(module, name, amount):
    return FineGrainedL1.apply(module, name, amount=amount)


def _prune_channel(module, name, amount):
    scores = torch.linspace(1.0, 0.0, getattr(module, name).shape[0])
    return ChannelActivation.apply(module, name, scores=scores, amount=amount)


METHODS = {"fine-grained": _prune_fine, "channel": _prune_channel}


@pytest.fixture(params=list(METHODS))
def prune_fn(request):
    return METHODS[request.param]


def test_pruning_types_follow_torch_contract():
    assert FineGrainedL1.PRUNING_TYPE == "unstructured"
    assert ChannelActivation.PRUNING_TYPE == "structured"
    assert ChannelActivation(torch.ones(3), amount=1).dim == 0


@pytest.mark.parametrize("amount,expected", [(0.5, 18), (7, 7), (0, 0), (1.0, 35)])
def test_fine_grained_prunes_exact_count(amount, expected):
    linear = fine_grained_l1(nn.Linear(5, 7), "weight", amount=amount)
    assert int((linear.weight_mask == 0).sum()) == expected


def test_fine_grained_prunes_smallest_magnitudes():
    linear = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[-0.1, 3.0, 0.2, -2.0]]))
    fine_grained_l1(linear, amount=2)
    assert linear.weight_mask.tolist() == [[0.0, 1.0, 0.0, 1.0]]


def test_fine_grained_ties_broken_by_count_not_threshold():
    linear = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.5)
    fine_grained_l1(linear, amount=3)
    # All values tie: exactly three zeros, the first three positions.
    assert linear.weight_mask.tolist() == [[0.0] * 3 + [1.0] * 7]


def test_fine_grained_importance_scores_drive_selection():
    linear = nn.Linear(4, 1, bias=False)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    fine_grained_l1(linear, amount=2, importance_scores=scores)
    assert linear.weight_mask.tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_fine_grained_matches_torch_l1_without_ties():
    ours, theirs = nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3)
    theirs.load_state_dict(ours.state_dict())
    fine_grained_l1(ours, amount=0.6)
    prune.l1_unstructured(theirs, "weight", amount=0.6)
    assert torch.equal(ours.weight_mask, theirs.weight_mask)


@pytest.mark.parametrize("amount", [-1, 1.5, -0.1])
def test_amount_out_of_range_is_rejected(prune_fn, amount):
    with pytest.raises(ValueError, match="amount"):
        prune_fn(nn.Linear(5, 7), "weight", amount)


@pytest.mark.parametrize("amount", ["0.5", None, True])
def test_amount_of_wrong_type_is_rejected(amount):
    with pytest.raises(TypeError, match="amount"):
        FineGrainedL1(amount)


def test_amount_larger_than_tensor_rolls_back(prune_fn):
    linear = nn.Linear(5, 7)
    weight = linear.weight
    with pytest.raises(ValueError, match="only"):
        prune_fn(linear, "weight", 1000)
    # torch's rollback: the original parameter is back, no reparametrization left.
    assert linear.weight is weight
    assert not hasattr(linear, "weight_orig") and not hasattr(linear, "weight_mask")
    assert not prune.is_pruned(linear)


def test_reparametrization_and_is_pruned(prune_fn):
    linear = nn.Linear(5, 7)
    original = linear.weight.detach().clone()
    prune_fn(linear, "weight", 3)
    assert prune.is_pruned(linear)
    assert "weight_orig" in dict(linear.named_parameters())
    assert "weight_mask" in dict(linear.named_buffers())
    assert "weight" not in dict(linear.named_parameters())
    assert torch.equal(linear.weight_orig, original)
    assert torch.equal(linear.weight, original * linear.weight_mask)


def test_remove_makes_pruning_permanent(prune_fn):
    linear = nn.Linear(5, 7)
    prune_fn(linear, "weight", 3)
    masked = linear.weight.detach().clone()
    prune.remove(linear, "weight")
    assert not prune.is_pruned(linear)
    assert isinstance(linear.weight, nn.Parameter)
    assert torch.equal(linear.weight, masked)
    assert not hasattr(linear, "weight_orig")


def test_forward_uses_masked_weight(prune_fn):
    linear = nn.Linear(5, 7)
    prune_fn(linear, "weight", 3)
    x = torch.randn(2, 5)
    expected = x @ (linear.weight_orig * linear.weight_mask).t() + linear.bias
    with torch.no_grad():
        linear.weight_orig.add_(1.0)  # the hook must recompute from weight_orig
    expected = x @ (linear.weight_orig * linear.weight_mask).t() + linear.bias
    assert torch.allclose(linear(x), expected)


def test_gradient_flows_to_orig_only_through_unmasked_entries(prune_fn):
    linear = nn.Linear(5, 7)
    prune_fn(linear, "weight", 3)
    linear(torch.randn(4, 5)).sum().backward()
    grad = linear.weight_orig.grad
    assert grad is not None
    assert torch.all(grad[linear.weight_mask == 0] == 0)
    assert torch.any(grad[linear.weight_mask == 1] != 0)


def test_iterative_pruning_builds_container_and_compounds():
    linear = nn.Linear(10, 10)
    fine_grained_l1(linear, amount=0.5)
    fine_grained_l1(linear, amount=0.5)  # half of what remains
    hooks = [h for h in linear._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
    assert len(hooks) == 1 and isinstance(hooks[0], prune.PruningContainer)
    assert len(hooks[0]._pruning_methods) == 2
    assert int((linear.weight_mask == 0).sum()) == 75


def test_iterative_mix_with_torch_methods():
    conv = nn.Conv2d(3, 6, 3)
    prune.ln_structured(conv, "weight", amount=2, n=2, dim=0)
    fine_grained_l1(conv, amount=10)
    pruned_channels = int((conv.weight_mask.flatten(1).sum(1) == 0).sum())
    assert pruned_channels >= 2
    assert int((conv.weight_mask == 0).sum()) == 2 * 27 + 10


def test_iterative_channel_pruning_narrows_scores_to_live_channels():
    conv = nn.Conv2d(3, 6, 3)
    scores = torch.tensor([5.0, 0.0, 4.0, 1.0, 3.0, 2.0])
    channel_activation(conv, scores, amount=2)  # channels 1 and 3
    channel_activation(conv, scores, amount=1)  # then channel 5 (score 2)
    alive = conv.weight_mask.flatten(1).amax(1)
    assert alive.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert conv.bias_mask.tolist() == alive.tolist()


def test_global_unstructured_accepts_fine_grained():
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    with torch.no_grad():
        first.weight.fill_(1.0)
        second.weight.copy_(torch.arange(16.0).reshape(4, 4) / 100)
    prune.global_unstructured(
        [(first, "weight"), (second, "weight")], pruning_method=FineGrainedL1, amount=16
    )
    assert int((first.weight_mask == 0).sum()) == 0
    assert int((second.weight_mask == 0).sum()) == 16


def test_state_dict_round_trip(prune_fn):
    source, target = nn.Linear(5, 7), nn.Linear(5, 7)
    prune_fn(source, "weight", 3)
    prune_fn(target, "weight", 0)
    target.load_state_dict(source.state_dict())
    assert set(source.state_dict()) == {"weight_orig", "weight_mask", "bias"}
    x = torch.randn(3, 5)
    assert torch.equal(source(x), target(x))


def test_torch_save_load_state_dict(prune_fn, tmp_path):
    source = nn.Linear(5, 7)
    prune_fn(source, "weight", 3)
    path = tmp_path / "pruned.pt"
    torch.save(source.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["weight_mask"], source.weight_mask)


def test_deepcopy_of_freshly_pruned_module(prune_fn):
    linear = nn.Linear(5, 7)
    with torch.no_grad():  # as with torch's own methods, autograd history blocks deepcopy
        prune_fn(linear, "weight", 3)
    twin = copy.deepcopy(linear)
    assert torch.equal(twin.weight_mask, linear.weight_mask)
    assert prune.is_pruned(twin)
    x = torch.randn(2, 5)
    assert torch.equal(twin(x), linear(x))


def test_pickle_round_trip_keeps_method(prune_fn):
    linear = nn.Linear(5, 7)
    prune_fn(linear, "weight", 3)
    buffer = io.BytesIO()
    pickle.dump(linear, buffer)
    buffer.seek(0)
    restored = pickle.load(buffer)
    hooks = [h for h in restored._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
    assert len(hooks) == 1 and type(hooks[0]) is type(next(iter(linear._forward_pre_hooks.values())))
    x = torch.randn(2, 5)
    assert torch.equal(restored(x), linear(x))


def test_channel_activation_masks_whole_channels_by_amount():
    conv = nn.Conv2d(3, 4, 3)
    channel_activation(conv, torch.tensor([3.0, 0.0, 2.0, 1.0]), amount=0.5)
    assert conv.weight_mask.flatten(1).amax(1).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert torch.all(conv.weight_mask[1] == 0) and torch.all(conv.weight_mask[0] == 1)
    assert conv.bias_mask.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_channel_activation_threshold_zero_prunes_never_firing():
    conv = nn.Conv2d(3, 4, 3)
    l0 = torch.tensor([0.0, 0.5, 0.0, 1.0])
    channel_activation(conv, l0, threshold=0)
    assert conv.bias_mask.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_channel_activation_uses_channel_stats_criterion():
    class Stats:
        def score(self, criterion):
            return {"l2": torch.tensor([1.0, 2.0, 3.0]), "l0": torch.tensor([1.0, 0.0, 1.0])}[criterion]

    conv = channel_activation(nn.Conv2d(1, 3, 1), Stats(), amount=1, criterion="l0")
    assert conv.bias_mask.tolist() == [1.0, 0.0, 1.0]
    conv = channel_activation(nn.Conv2d(1, 3, 1), Stats(), amount=1, criterion="l2")
    assert conv.bias_mask.tolist() == [0.0, 1.0, 1.0]


def test_channel_activation_masks_batchnorm_so_channel_is_dead():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.bias.fill_(1.0)
        bn.running_mean.fill_(0.3)
    bn.eval()
    channel_activation(conv, torch.tensor([3.0, 0.0, 2.0, 1.0]), amount=1, batchnorm=bn)
    out = bn(conv(torch.randn(2, 3, 6, 6)))
    assert torch.all(out[:, 1] == 0)
    assert torch.all(out[:, 0] != 0)


def test_channel_activation_rejects_non_conv():
    with pytest.raises(TypeError, match="nn.Conv2d, nn.Linear or nn.MultiheadAttention; got Conv1d"):
        channel_activation(nn.Conv1d(3, 4, 3), torch.ones(4), amount=1)


def test_channel_activation_rejects_mismatched_stats():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="3 channels but the layer has 4"):
        channel_activation(conv, torch.ones(3), amount=1)
    assert not prune.is_pruned(conv)


def test_channel_activation_needs_exactly_one_selection():
    with pytest.raises(ValueError, match="exactly one"):
        channel_activation(nn.Conv2d(3, 4, 3), torch.ones(4))
    with pytest.raises(ValueError, match="exactly one"):
        channel_activation(nn.Conv2d(3, 4, 3), torch.ones(4), amount=1, threshold=0.1)


def test_channel_activation_failure_leaves_nothing_half_pruned():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5)
    with pytest.raises(ValueError, match="BatchNorm2d that follows"):
        channel_activation(conv, torch.ones(4), amount=1, batchnorm=bn)
    assert not prune.is_pruned(conv) and not prune.is_pruned(bn)


def test_channel_dead_in_weight_alone_is_masked_everywhere():
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.001, 2.0]).reshape(3, 1, 1, 1))
    fine_grained_l1(conv, amount=1)  # zeroes all of channel 1's weight, not its bias
    channel_activation(conv, torch.tensor([1.0, 2.0, 3.0]), amount=1)
    # channel 1 was already dead in the weight: masked in the bias too, and the
    # amount is taken among the live channels (channel 0 has the lowest score)
    assert conv.bias_mask.tolist() == [0.0, 0.0, 1.0]
    assert conv.weight_mask.flatten().tolist() == [0.0, 0.0, 1.0]


def test_channel_activation_after_torch_ln_structured():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    with torch.no_grad():
        conv.weight[2].mul_(0.01)
    prune.ln_structured(conv, "weight", amount=1, n=2, dim=0)  # channel 2
    channel_activation(conv, torch.tensor([4.0, 1.0, 3.0, 2.0]), amount=1, batchnorm=bn)
    expected = [1.0, 0.0, 0.0, 1.0]
    assert conv.weight_mask.flatten(1).amax(1).tolist() == expected
    assert conv.bias_mask.tolist() == expected
    assert bn.weight_mask.tolist() == expected and bn.bias_mask.tolist() == expected


def test_importance_scores_shape_is_checked():
    with pytest.raises(AssertionError, match="importance_scores"):
        fine_grained_l1(nn.Linear(5, 7), amount=1, importance_scores=torch.ones(3))


# --- the smallest magnitudes without a sort --------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prunekit.methods.fine_grained import MagnitudeSelector, magnitude_order  # noqa: E402


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    values=st.lists(st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 2.0, 3.0, float("nan"), 1e-8]),
                    min_size=1, max_size=40),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
)
def test_the_selector_takes_the_entries_a_stable_sort_takes_ties_by_position(values, dtype, fractions):
    tensor = torch.tensor(values, dtype=dtype)
    selector = MagnitudeSelector(tensor)
    order = magnitude_order(tensor)
    for fraction in fractions + fractions:  # asked again: from the kept threshold
        count = round(fraction * tensor.numel())
        want = torch.zeros(tensor.numel(), dtype=torch.bool)
        want[order[:count]] = True
        got = selector.smallest(count)
        assert torch.equal(got, want), (values, dtype, count)
        assert int(got.sum()) == count


def test_the_selector_matches_the_sort_on_a_conv_weight_of_a_real_size_and_rejects_a_bad_count():
    torch.manual_seed(0)
    weight = torch.randn(64, 32, 3, 3).permute(0, 2, 3, 1)  # not contiguous, as channels-last weights are
    weight[:4] = -0.5  # 1152 ties: the count below takes the first 100 of them, by position
    straddling = int((weight.abs() < 0.5).sum()) + 100
    selector = MagnitudeSelector(weight)
    order = magnitude_order(weight)
    for count in (0, 1, 4608, straddling, 9000, weight.numel()):
        want = torch.zeros(weight.numel(), dtype=torch.bool)
        want[order[:count]] = True
        assert torch.equal(selector.smallest(count), want)
    with pytest.raises(ValueError, match=r"count=18433 is outside \[0, 18432\]"):
        selector.smallest(weight.numel() + 1)
