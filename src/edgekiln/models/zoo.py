"""Model builders (pure ``torch.nn``, no torchvision), using only ops the C backend supports.

Every builder is deterministic given ``torch.manual_seed``. ``BUILDERS`` maps names to builders
so a factory string such as ``edgekiln.models.zoo:mnist_cnn`` rebuilds the module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def mnist_cnn(num_classes: int = 10, width: int = 1) -> nn.Sequential:
    """conv(16)-relu-pool, conv(32)-relu-pool, fc(64)-relu, fc(10) on 1x28x28 (~111k parameters)."""
    c1, c2 = 16 * width, 32 * width
    model = nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )
    model.input_shape = (1, 1, 28, 28)
    return model


def digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """A tiny CNN for 1x8x8 digits (~5k parameters)."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, num_classes),
    )
    model.input_shape = (1, 1, 8, 8)
    return model


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def _c(ch: float) -> int:
    return max(8, int(round(ch / 8)) * 8)


def mobilenet_v2_style(width_mult: float = 1.0, in_channels: int = 1, num_classes: int = 10,
                       input_size: int = 28) -> nn.Sequential:
    """A MobileNetV2-style network sized for small grayscale images: stem conv, inverted
    residual blocks (expand 4, some with residual adds), global average pool, linear."""
    stem = _c(16 * width_mult)
    cfg = [(16, 1, 1), (24, 2, 4), (24, 1, 4), (32, 2, 4), (32, 1, 4), (48, 1, 4)]  # (out, stride, expand)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6()]
    cin = stem
    for out, stride, expand in cfg:
        cout = _c(out * width_mult)
        layers.append(InvertedResidual(cin, cout, stride, expand))
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    model = nn.Sequential(*layers)
    model.input_shape = (1, in_channels, input_size, input_size)
    return model


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mnist_cnn": mnist_cnn,
    "digits_cnn": digits_cnn,
    "mobilenet_v2_style": mobilenet_v2_style,
}


def build(name: str, **kwargs: Any) -> nn.Module:
    from edgekiln.errors import EdgekilnError

    if name not in BUILDERS:
        raise EdgekilnError(f"unknown model '{name}'; known: {', '.join(BUILDERS)}")
    return BUILDERS[name](**kwargs)
