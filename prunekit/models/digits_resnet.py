"""``digits-resnet``: a small ResNet for the built-in digits, the offline residual model of prunekit.

Made of torchvision's own ``BasicBlock``: a 16-channel stem, three stages of two blocks
(16, 32 and 64 channels; the second and third halve the resolution with a 1x1 conv
shortcut), global average pooling and one Linear. Its residual streams couple the stem
with every block's second conv of a stage, so channel pruning must remove channel groups
(:func:`prunekit.channel_groups`), which is what this model is for: ``prunekit scan --model
digits-resnet --method channel`` -> ``prune`` -> ``compact`` runs offline in seconds. Its
trained weights ship with prunekit (``scripts/train_default_model.py --model digits-resnet``).

Example:
    >>> model = digits_resnet()
    >>> model(torch.zeros(2, 1, 16, 16)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from pathlib import Path

import torch  # noqa: F401  (the docstring example uses it)
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from prunekit.io.weights import load_shipped_digits_weights

__all__ = ["DIGITS_RESNET_WEIGHTS", "DigitsResNet", "digits_resnet"]

DIGITS_RESNET_WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "digits_resnet.pt"


def _stage(in_channels: int, channels: int, stride: int) -> nn.Sequential:
    shortcut = None
    if stride != 1 or in_channels != channels:
        shortcut = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
        )
    return nn.Sequential(BasicBlock(in_channels, channels, stride, shortcut), BasicBlock(channels, channels))


class DigitsResNet(nn.Module):
    """Stem, three residual stages (16, 32, 64 channels), global pooling, Linear; takes ``[N, 1, 16, 16]``."""

    def __init__(self, num_classes: int = 10, widths: tuple = (16, 32, 64)) -> None:
        super().__init__()
        first, second, third = widths
        self.stem = nn.Sequential(nn.Conv2d(1, first, 3, padding=1, bias=False), nn.BatchNorm2d(first), nn.ReLU(inplace=True))
        self.layer1 = _stage(first, first, 1)
        self.layer2 = _stage(first, second, 2)
        self.layer3 = _stage(second, third, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(third, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def digits_resnet(pretrained: bool = False, num_classes: int = 10) -> DigitsResNet:
    """The digits ResNet, with the trained weights shipped with prunekit when ``pretrained``.

    Raises:
        ValueError: ``pretrained`` with ``num_classes`` other than 10.
        FileNotFoundError: the shipped weights are missing (the message says how to rebuild them).
    """
    model = DigitsResNet(num_classes)
    if pretrained:
        rebuild = "python scripts/train_default_model.py --model digits-resnet"
        load_shipped_digits_weights(model, DIGITS_RESNET_WEIGHTS, num_classes, rebuild)
    return model.eval()
