import gc
import weakref

import pytest
import torch
from torch import nn

from prunekit.training.losses import channel_loss, uncorrelation_loss, xor_loss
from prunekit.training.regularizer import ChannelRegularizer
from prunekit.stats import collect_channel_stats


def tiny_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 3, 1),
    )


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def dead_channels_after_training(weight: float) -> int:
    """Fit a random teacher for 40 Adam steps; count channels that never fire on new images."""
    torch.manual_seed(0)
    model, teacher = tiny_net(), tiny_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with ChannelRegularizer(model, ["1", "3"], weight, weight, eps=1.0) as reg:
        for _ in range(40):
            images = torch.rand(8, 3, 16, 16)
            with torch.no_grad():
                target = teacher(images)
            loss = (model(images) - target).pow(2).mean() + reg.loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    stats = collect_channel_stats(model, [torch.rand(8, 3, 16, 16) for _ in range(2)])
    return sum(int((stats[name].l0 == 0).sum()) for name in ("0", "2"))


def test_training_with_regularizer_kills_more_channels():
    without = dead_channels_after_training(0.0)
    with_reg = dead_channels_after_training(0.3)
    assert with_reg >= without + 4, (without, with_reg)


def test_loss_is_weighted_sum_of_losses_on_hooked_outputs():
    torch.manual_seed(0)
    model = tiny_net()
    images = torch.rand(4, 3, 8, 8)
    reg = ChannelRegularizer(model, ["1", "3"], 0.5, 2.0, uncorrelation_weight=0.25, eps=1e-3)
    model(images)
    relu1 = torch.relu(model[0](images))
    relu3 = torch.relu(model[2](relu1))
    expected = sum(
        0.5 * channel_loss(f, 1e-3) + 2.0 * xor_loss(f, 1e-3) + 0.25 * uncorrelation_loss(f)
        for f in (relu1, relu3)
    )
    assert reg.loss().item() == pytest.approx(expected.item(), rel=1e-6)
    terms = reg.terms()
    assert set(terms) == {
        f"{term}/{layer}" for term in ("channel", "xor", "uncorrelation") for layer in ("1", "3")
    } | {"total"}
    assert terms["total"] == pytest.approx(expected.item(), rel=1e-6)
    assert terms["xor/3"] == pytest.approx(xor_loss(relu3, 1e-3).item(), rel=1e-6)
    reg.remove()


def test_gradients_reach_model_parameters():
    torch.manual_seed(0)
    model = tiny_net()
    with ChannelRegularizer(model, ["3"], channel_weight=1.0, xor_weight=1.0, eps=1.0) as reg:
        model(torch.rand(4, 3, 8, 8))
        reg.loss().backward()
    for index in (0, 2):
        grad = model[index].weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert model[4].weight.grad is None  # after the hooked layer: untouched


def test_context_manager_removes_hooks():
    model = tiny_net()
    with ChannelRegularizer(model, ["1", "3"], 1.0, 1.0) as reg:
        assert all_hooks(model) == 3  # two forward hooks + the model's pre-hook
        model(torch.rand(2, 3, 8, 8))
    assert all_hooks(model) == 0
    with pytest.raises(RuntimeError, match="removed"):
        reg.loss()


def test_loss_before_forward_says_run_forward():
    reg = ChannelRegularizer(tiny_net(), ["1"], 1.0, 1.0)
    with pytest.raises(RuntimeError, match="run a forward pass"):
        reg.loss()
    reg.remove()


def test_clear_drops_outputs():
    model = tiny_net()
    with ChannelRegularizer(model, ["1"], 1.0, 1.0) as reg:
        model(torch.rand(2, 3, 8, 8))
        reg.clear()
        with pytest.raises(RuntimeError, match="run a forward pass"):
            reg.loss()


def test_older_batches_are_not_kept_alive():
    model = tiny_net()
    with ChannelRegularizer(model, ["1", "3"], 1.0, 1.0) as reg:
        first = model(torch.rand(2, 3, 8, 8))
        hooked = weakref.ref(reg._outputs["1"])
        del first
        model(torch.rand(2, 3, 8, 8))
        gc.collect()
        assert hooked() is None


def test_layer_missing_from_last_forward():
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(3, 4, 1)

        def forward(self, x, use_b=False):
            return self.b(x) if use_b else self.a(x)

    model = TwoPaths()
    with ChannelRegularizer(model, ["a", "b"], 1.0, 1.0) as reg:
        model(torch.rand(2, 3, 4, 4), use_b=True)
        model(torch.rand(2, 3, 4, 4))
        with pytest.raises(RuntimeError, match="layers b did not run"):
            reg.loss()


def test_hooks_any_module_including_nested_encoder():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh()))
    model.add_module("decoder", nn.Conv2d(6, 3, 3))
    images = torch.rand(3, 3, 8, 8)
    with ChannelRegularizer(model, "encoder", 0.0, 0.0, uncorrelation_weight=1.0) as reg:
        model(images)
        assert reg.loss().item() == pytest.approx(
            uncorrelation_loss(model.encoder(images)).item(), rel=1e-6
        )


def test_default_layers_are_conv_block_outputs():
    reg = ChannelRegularizer(tiny_net(), None, 1.0, 1.0)
    assert reg.layers == ["1", "3", "4"]
    reg.remove()


def test_all_zero_weights_give_attached_zero():
    model = tiny_net()
    with ChannelRegularizer(model, ["1"], 0.0, 0.0) as reg:
        model(torch.rand(2, 3, 8, 8))
        loss = reg.loss()
        assert loss.item() == 0.0 and loss.requires_grad


def test_unknown_layer_lists_modules():
    with pytest.raises(KeyError, match=r"unknown layer 'features.9'; modules are: '', 0, 1, 2"):
        ChannelRegularizer(tiny_net(), ["features.9"], 1.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channel_weight": -1.0}, "channel_weight=-1.0 must be a finite number >= 0"),
        ({"xor_weight": float("nan")}, "xor_weight=nan must be"),
        ({"uncorrelation_weight": "1"}, "uncorrelation_weight='1' must be"),
        ({"eps": 0.0}, "eps=0.0 must be a finite number > 0"),
        ({"layers": []}, "layers is empty"),
        ({"layers": ["1", "1"]}, "named twice"),
    ],
)
def test_invalid_arguments(kwargs, message):
    arguments = {"layers": ["1"], "channel_weight": 1.0, "xor_weight": 1.0, **kwargs}
    model = tiny_net()
    with pytest.raises(ValueError, match=message):
        ChannelRegularizer(model, **arguments)
    assert all_hooks(model) == 0
