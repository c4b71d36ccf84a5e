import itertools
import math

import pytest
import torch

from prunekit import losses
from prunekit.training.losses import channel_indicator, channel_loss, uncorrelation_loss, xor_loss

LOSSES = [channel_loss, xor_loss, uncorrelation_loss]


def loop_indicator(feature, eps):
    batch, channels = feature.shape[:2]
    return [
        [
            math.sqrt(sum(v * v for v in feature[b, c].flatten().tolist()))
            / (math.sqrt(sum(v * v for v in feature[b, c].flatten().tolist())) + eps)
            for c in range(channels)
        ]
        for b in range(batch)
    ]


def loop_channel_loss(feature, eps):
    s = loop_indicator(feature, eps)
    return sum(map(sum, s)) / (len(s) * len(s[0]))


def loop_xor_loss(feature, eps):
    s = loop_indicator(feature, eps)
    batch, channels = len(s), len(s[0])
    total = sum(
        abs(s[i][c] - s[j][c])
        for i, j in itertools.combinations(range(batch), 2)
        for c in range(channels)
    )
    return total / (channels * batch * (batch - 1) / 2)


def loop_uncorrelation_loss(feature):
    batch, channels = feature.shape[:2]
    per_image = []
    for b in range(batch):
        rows = [feature[b, c].flatten().tolist() for c in range(channels)]
        values = []
        for i in range(channels):
            for j in range(channels):
                if i == j:
                    continue
                mi = sum(rows[i]) / len(rows[i])
                mj = sum(rows[j]) / len(rows[j])
                cov = sum((x - mi) * (y - mj) for x, y in zip(rows[i], rows[j]))
                si = math.sqrt(sum((x - mi) ** 2 for x in rows[i]))
                sj = math.sqrt(sum((y - mj) ** 2 for y in rows[j]))
                values.append(abs(cov / (si * sj)))
        per_image.append(sum(values) / len(values))
    return sum(per_image) / batch


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (4, 3, 7)])
def test_match_loop_reference(shape):
    torch.manual_seed(0)
    # Some channels zeroed on some images so the indicator is not all ~1.
    feature = torch.randn(shape, dtype=torch.float64) * 1e-4
    feature[0, 1] = 0
    feature[1:, 2] = 0
    eps = 1e-4
    expected = loop_channel_loss(feature, eps)
    assert channel_loss(feature, eps).item() == pytest.approx(expected, rel=1e-12)
    assert xor_loss(feature, eps).item() == pytest.approx(loop_xor_loss(feature, eps), rel=1e-12)
    feature = torch.randn(shape, dtype=torch.float64)
    assert uncorrelation_loss(feature).item() == pytest.approx(
        loop_uncorrelation_loss(feature), rel=1e-10
    )


def test_indicator_values():
    feature = torch.zeros(1, 2, 2, 2)
    feature[0, 1] = 0.5  # norm 1
    assert channel_indicator(feature, eps=1.0).tolist() == [[0.0, 0.5]]


def test_channel_loss_counts_live_channels():
    feature = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    feature[:, 0] = 1.0  # norm 3 on both images; channels 1..3 are dead everywhere
    assert channel_loss(feature, eps=1.0).item() == pytest.approx(0.75 / 4, rel=1e-15)


def test_xor_loss_hand_made():
    feature = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    feature[0, 0] = 0.5  # channel 0 fires (norm 1) on image 0 only; channel 1 never fires
    # one pair, |0.5 - 0| on channel 0, 0 on channel 1: 0.5 / (2 channels * 1 pair)
    assert xor_loss(feature, eps=1.0).item() == pytest.approx(0.25, rel=1e-15)


def test_xor_loss_zero_for_identical_images():
    torch.manual_seed(0)
    feature = torch.rand(1, 6, 4, 4).repeat(5, 1, 1, 1)
    feature[:, 2] = 0
    assert xor_loss(feature).item() == 0.0


def test_xor_loss_single_image_is_attached_zero():
    feature = torch.rand(1, 3, 4, 4, requires_grad=True)
    loss = xor_loss(feature)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(feature.grad, torch.zeros_like(feature))


def test_uncorrelation_of_linear_and_orthogonal_channels():
    x = torch.tensor([1.0, -2.0, 0.5, 3.0])
    linear = torch.stack([x, 2 * x + 1, -x]).view(1, 3, 4)
    assert uncorrelation_loss(linear).item() == pytest.approx(1.0, abs=1e-6)
    orthogonal = torch.tensor([[[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, -1.0, -1.0]]])
    assert uncorrelation_loss(orthogonal).item() == 0.0


def test_uncorrelation_constant_channels_count_as_zero():
    torch.manual_seed(0)
    feature = torch.randn(2, 3, 7)
    feature[:, 1] = 0.1  # mean of 0.1s is not exactly 0.1 in float32
    feature[:, 2] = 0.0
    assert uncorrelation_loss(feature).item() == 0.0
    assert uncorrelation_loss(torch.randn(2, 1, 5)).item() == 0.0  # no channel pair


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_all_zero_feature_gives_zero_and_finite_gradient(loss_fn):
    feature = torch.zeros(3, 4, 5, 5, requires_grad=True)
    loss = loss_fn(feature)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(feature.grad).all()


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_gradient_finite_with_partly_zero_feature(loss_fn):
    torch.manual_seed(0)
    feature = torch.randn(3, 4, 5, 5)
    feature[:, 1] = 0
    feature[0, 2] = 0
    feature[:, 3] = 0.7
    feature.requires_grad_(True)
    loss_fn(feature).backward()
    assert torch.isfinite(feature.grad).all()
    assert feature.grad.abs().sum() > 0


def test_gradcheck_float64():
    torch.manual_seed(0)
    feature = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: channel_loss(f, eps=0.5), (feature,))
    assert torch.autograd.gradcheck(lambda f: xor_loss(f, eps=0.5), (feature,))
    assert torch.autograd.gradcheck(uncorrelation_loss, (feature,))


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_rejects_wrong_shape(loss_fn):
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] or \[B, C, L\], got shape \(4, 5\)"):
        loss_fn(torch.rand(4, 5))


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_rejects_integer_and_non_tensor(loss_fn):
    with pytest.raises(TypeError, match="floating point"):
        loss_fn(torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        loss_fn([[[1.0]]])


@pytest.mark.parametrize("loss_fn", [channel_loss, xor_loss, channel_indicator])
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf"), True])
def test_rejects_bad_eps(loss_fn, eps):
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        loss_fn(torch.rand(2, 3, 4, 4), eps=eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["channel_loss", "xor_loss", "uncorrelation_loss"])
def test_half_precision_features_accumulate_in_float32(dtype, name):
    loss = getattr(losses, name)
    torch.manual_seed(0)
    feature = torch.randn(4, 8, 16, 16) * 300  # squares overflow fp16 (max 65504)
    feature[1, :4] = 0.0  # some channels off: the indicator and xor terms are not trivial
    feature[2, 2:6] *= 1e-3
    low = feature.to(dtype).requires_grad_(True)
    value = loss(low)
    expected = loss(low.detach().float())  # the same rounded inputs, computed in fp32
    assert value.dtype == torch.float32 and torch.isfinite(value)
    torch.testing.assert_close(value, expected)
    assert float(loss(feature)) == pytest.approx(value.item() if not value.requires_grad else value.detach().item(), rel=10 * torch.finfo(dtype).eps, abs=1e-4)
    value.backward()
    assert low.grad.dtype == dtype and bool(torch.isfinite(low.grad.float()).all())
