"""AdaIN style transfer: a VGG encoder up to relu4_1, adaptive instance normalisation, a mirrored decoder.

The network of Huang & Belongie, *Arbitrary Style Transfer in Real-time with
Adaptive Instance Normalization* (ICCV 2017), as used by *Compact Image Style
Transfer: Channel Pruning on a Single Training of Network* (Sensors 2022):

    content, style --encoder--> relu4_1 features --AdaIN--> t --decoder--> image

The encoder keeps the module indices of torchvision's ``vgg19().features``
(``'19'`` is conv4_1, ``'20'`` relu4_1) or ``vgg16().features`` (``'17'`` and
``'18'``; the one HED's real weights give, ``weights="hed"``), so prunekit names
its last conv :func:`encoder_last_conv` whatever the width. A ``width`` below 1
scales every channel count (random init only): tests and smoke runs use it to
stay fast on a CPU.

Example:
    >>> _ = torch.manual_seed(0)
    >>> net = AdaINNet(build_encoder("random", width=0.125))
    >>> net(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)).shape
    torch.Size([1, 3, 32, 32])
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from examples.style_transfer.vgg import LAYER_INDEX, Preprocessor, layer_index, load_vgg_features, resolve_arch

__all__ = [
    "ENCODER_LAST_CONV",
    "ENCODER_OUTPUT",
    "STYLE_LAYERS",
    "VGG19_RELU4_1_WIDTHS",
    "AdaINNet",
    "adain",
    "build_decoder",
    "build_encoder",
    "channel_mean_std",
    "encoder_arch",
    "encoder_last_conv",
    "encoder_output",
    "encoder_widths",
]

#: Channels of the four VGG-19 blocks up to relu4_1.
VGG19_RELU4_1_WIDTHS: Tuple[int, int, int, int] = (64, 128, 256, 512)
#: Layers whose mean/std define the style loss (AdaIN's choice).
STYLE_LAYERS: Tuple[str, ...] = ("relu1_1", "relu2_1", "relu3_1", "relu4_1")
#: prunekit name of a VGG-19 encoder's last conv (conv4_1) and of its output module (relu4_1);
#: :func:`encoder_last_conv` and :func:`encoder_output` give them for any encoder.
ENCODER_LAST_CONV = str(LAYER_INDEX["conv4_1"])
ENCODER_OUTPUT = str(LAYER_INDEX["relu4_1"])


def encoder_arch(weights: str, arch: Optional[str] = None) -> str:
    """The encoder's architecture: ``arch`` if given, else ``vgg16`` for HED's weights and ``vgg19`` otherwise."""
    if arch is not None:
        return resolve_arch(arch)
    return "vgg16" if str(weights).lower() == "hed" else "vgg19"


def encoder_last_conv(encoder: nn.Sequential) -> str:
    """prunekit's name of the encoder's last conv (conv4_1): ``'19'`` for VGG-19, ``'17'`` for VGG-16.

    Example:
        >>> encoder_last_conv(build_encoder("random", width=0.125, arch="vgg16"))
        '17'
    """
    convs = [index for index, module in enumerate(encoder) if isinstance(module, nn.Conv2d)]
    if not convs:
        raise ValueError("the encoder has no Conv2d")
    return str(convs[-1])


def encoder_output(encoder: nn.Sequential) -> str:
    """prunekit's name of the encoder's output module (relu4_1): its last index."""
    return str(len(encoder) - 1)


def _convs_per_block(arch: str) -> Tuple[int, int, int, int]:
    """Convs per block up to relu4_1 (VGG-19: 2, 2, 4 and the first of block 4; VGG-16: 2, 2, 3, 1)."""
    names = [name for name in layer_index(arch) if name.startswith("conv")]
    counts = [sum(name.startswith(f"conv{block}_") for name in names) for block in (1, 2, 3)]
    return (counts[0], counts[1], counts[2], 1)


def encoder_widths(width: float = 1.0) -> Tuple[int, int, int, int]:
    """Channel counts of the encoder's four blocks for a width multiplier (at least 1 channel each).

    Example:
        >>> encoder_widths(0.125)
        (8, 16, 32, 64)
    """
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1:
        raise ValueError(f"width={width!r} must be a number in (0, 1]; 1 is the full VGG-19")
    return tuple(max(1, int(round(c * width))) for c in VGG19_RELU4_1_WIDTHS)  # type: ignore[return-value]


def _random_encoder(widths: Sequence[int], arch: str = "vgg19") -> nn.Sequential:
    """``{arch}().features`` up to relu4_1 with the given block widths, initialised like torchvision's VGG."""
    layers = []
    in_channels = 3
    for block, (convs, out_channels) in enumerate(zip(_convs_per_block(arch), widths)):
        if block > 0:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        for _ in range(convs):
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=False)]
            in_channels = out_channels
    encoder = nn.Sequential(*layers)
    assert len(encoder) == layer_index(arch)["relu4_1"] + 1  # the VGG indices are part of the API
    return encoder


def build_encoder(weights: str = "imagenet", width: float = 1.0, arch: Optional[str] = None) -> nn.Sequential:
    """A VGG up to relu4_1 (VGG-19: 21 modules, VGG-16: 19; non-in-place ReLUs), frozen and in eval mode.

    Args:
        weights: ``"imagenet"``, ``"hed"`` (HED's real VGG-16 weights, offline), ``"random"``
            or the path to a state_dict (see :func:`examples.style_transfer.vgg.load_vgg_features`).
        width: channel multiplier in (0, 1]; below 1 only ``weights="random"`` exists.
        arch: ``"vgg19"`` or ``"vgg16"`` (any torchvision VGG); default :func:`encoder_arch`.

    Raises:
        ValueError: ``width`` out of range, or pretrained weights asked for a reduced width.
        WeightsUnavailableError: ImageNet weights cannot be downloaded (pass a PATH).
    """
    widths = encoder_widths(width)
    arch = encoder_arch(weights, arch)
    if weights == "random":
        encoder = _random_encoder(widths, arch)
    elif widths != VGG19_RELU4_1_WIDTHS:
        raise ValueError(
            f"weights={weights!r} exist only for the full {arch} (width=1), got width={width}; "
            "use weights='random' for a width-reduced encoder"
        )
    else:
        encoder = load_vgg_features(weights, arch=arch)[: layer_index(arch)["relu4_1"] + 1]
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


def build_decoder(encoder: nn.Sequential) -> nn.Sequential:
    """The decoder that mirrors ``encoder``: convs reversed, max-pools replaced by nearest upsampling.

    Every conv uses reflection padding and is followed by a ReLU, except the
    last one, which outputs the RGB image. For VGG-19 up to relu4_1 this is
    AdaIN's decoder (512->256, up, 256x3, 256->128, up, 128, 128->64, up, 64, 64->3).

    Example:
        >>> encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        ...                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        >>> [m.out_channels for m in build_decoder(encoder) if isinstance(m, nn.Conv2d)]
        [8, 3]
    """
    if not isinstance(encoder, nn.Sequential):
        raise TypeError(f"encoder must be an nn.Sequential, got {type(encoder).__name__}")
    convs = [m for m in encoder if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("encoder has no Conv2d to mirror")
    layers = []
    for module in reversed(encoder):
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size
            layers.append(
                nn.Conv2d(
                    module.out_channels,
                    module.in_channels,
                    kernel_size=kernel,
                    padding=(kernel[0] // 2, kernel[1] // 2),
                    padding_mode="reflect",
                )
            )
            layers.append(nn.ReLU(inplace=False))
        elif isinstance(module, nn.MaxPool2d):
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
    layers.pop()  # no ReLU after the RGB output conv
    return nn.Sequential(*layers)


def channel_mean_std(feature: Tensor, eps: float = 1e-5) -> Tuple[Tensor, Tensor]:
    """Per-image, per-channel mean and ``sqrt(var + eps)`` over the spatial positions, as ``[B, C, 1, 1]``."""
    if feature.dim() != 4:
        raise ValueError(f"expected features [B, C, H, W], got shape {tuple(feature.shape)}")
    flat = feature.flatten(2)
    mean = flat.mean(dim=2)
    # The biased variance keeps a constant channel at std sqrt(eps) exactly,
    # so an all-zero channel stays exactly zero through adain().
    std = (flat.var(dim=2, unbiased=False) + eps).sqrt()
    return mean[:, :, None, None], std[:, :, None, None]


def adain(content: Tensor, style: Tensor, eps: float = 1e-5) -> Tensor:
    """Adaptive instance normalisation: give each content channel the style channel's mean and std.

    A channel that is all zero in both content and style stays exactly zero
    (``(0 - 0) / std * std_s + 0``), which is what makes removing it from the
    encoder and the decoder's first conv exact.

    Args:
        content: ``[B, C, H, W]`` content features.
        style: ``[B, C, H', W']`` style features (``B`` equal, or 1 to share one style).

    Example:
        >>> out = adain(torch.rand(2, 4, 8, 8), torch.rand(2, 4, 5, 5) * 3 + 1)
        >>> out.shape
        torch.Size([2, 4, 8, 8])
    """
    if content.dim() != 4 or style.dim() != 4 or content.shape[1] != style.shape[1]:
        raise ValueError(
            f"content and style must be [B, C, H, W] with the same C, got shapes "
            f"{tuple(content.shape)} and {tuple(style.shape)}"
        )
    content_mean, content_std = channel_mean_std(content, eps)
    style_mean, style_std = channel_mean_std(style, eps)
    return (content - content_mean) / content_std * style_std + style_mean


class AdaINNet(nn.Module):
    """Encoder + AdaIN + decoder on RGB images in [0, 1].

    Args:
        encoder: VGG-19 features up to relu4_1 (from :func:`build_encoder`), or its
            compacted version.
        decoder: the decoder; ``None`` builds :func:`build_decoder` ``(encoder)``.
        preprocess: input normalisation of the encoder's weights (``"imagenet"``, ``"caffe"`` or ``"hed"``).

    The decoder outputs an image in [0, 1] space (not clamped, so losses see
    the raw values; clamp before saving).
    """

    def __init__(
        self,
        encoder: nn.Sequential,
        decoder: Optional[nn.Sequential] = None,
        preprocess: str = "imagenet",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder if decoder is not None else build_decoder(encoder)
        self.preprocessor = Preprocessor(preprocess)

    def encode(self, images: Tensor) -> Tensor:
        """relu4_1 features of images in [0, 1]."""
        return self.encoder(self.preprocessor.normalize(images))

    def transfer(self, content_features: Tensor, style_features: Tensor, alpha: float = 1.0) -> Tensor:
        """AdaIN target ``t``, blended with the content features by style strength ``alpha`` in [0, 1]."""
        if not 0.0 <= alpha <= 1.0:  # also rejects NaN
            raise ValueError(f"alpha={alpha!r} must be in [0, 1] (1: full style, 0: content only)")
        target = adain(content_features, style_features)
        if alpha == 1.0:
            return target
        return alpha * target + (1.0 - alpha) * content_features

    def forward(self, content: Tensor, style: Tensor, alpha: float = 1.0) -> Tensor:
        """Stylise ``content`` with ``style`` (both ``[B, 3, H, W]`` in [0, 1]; ``style`` may have B=1)."""
        return self.decoder(self.transfer(self.encode(content), self.encode(style), alpha))

    def encode_pair(self, content: Tensor, style: Tensor) -> Tuple[Tensor, Tensor]:
        """Encode content and style in one encoder pass (one forward, so hooks see both at once)."""
        if content.shape[2:] == style.shape[2:]:
            both = self.encode(torch.cat([content, style]))
            return both[: content.shape[0]], both[content.shape[0] :]
        return self.encode(content), self.encode(style)

    def parameter_counts(self) -> Dict[str, int]:
        """Parameters of the encoder, the decoder and both."""
        counts = {
            "encoder": sum(p.numel() for p in self.encoder.parameters()),
            "decoder": sum(p.numel() for p in self.decoder.parameters()),
        }
        counts["total"] = counts["encoder"] + counts["decoder"]
        return counts
