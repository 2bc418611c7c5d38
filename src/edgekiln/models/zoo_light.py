"""The rest of the lightweight family edge engineers reach for (pure ``torch.nn``):

| builder            | input (batch 1)  | idea                                                          |
|--------------------|------------------|---------------------------------------------------------------|
| mobilenet_v1_style | 1x1x28x28        | depthwise-separable blocks (dw kxk + pw 1x1), width multiplier |
| squeezenet_style   | 1x1x28x28        | Fire modules: 1x1 squeeze, concat of 1x1 and 3x3 expands       |
| cnn1d              | 1x3x128 (C, T)   | Conv1d blocks for time series (accelerometer, vibration, ECG)  |
| rnn_classifier     | 1x64x3 (T, F)    | a small GRU or LSTM, last hidden state -> linear               |

The image builders share the knobs the architecture search varies (``width_mult``,
``blocks``, ``kernel_size``, ``input_size``); every builder sets ``model.input_shape`` and is
deterministic given ``torch.manual_seed``. The convolutional ones use only ops the integer C
backend lowers (Conv, Relu, MaxPool, GlobalAveragePool, Concat, Gemm); a GRU/LSTM exports to
ONNX's own GRU/LSTM op, which onnxruntime runs (int8 quantization leaves the recurrent cell
float and quantizes the linear head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (output channels at width 1.0, stride) per depthwise-separable block; strides take 28 -> 7.
_V1_BLOCKS = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (128, 1))


def _round8(channels: float) -> int:
    return max(8, int(round(channels / 8)) * 8)


def _ds_block(cin: int, cout: int, stride: int, kernel_size: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cin, kernel_size, stride, kernel_size // 2, groups=cin, bias=False), nn.BatchNorm2d(cin),
            nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def mobilenet_v1_style(width_mult: float = 1.0, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                       kernel_size: int = 3, blocks: int = 6) -> nn.Sequential:
    """MobileNetV1-style: 3x3 stem, ``blocks`` depthwise-separable blocks, global pool, linear.

    >>> import torch
    >>> mobilenet_v1_style(width_mult=0.25, blocks=3)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    if not 1 <= blocks <= len(_V1_BLOCKS) or kernel_size % 2 == 0 or width_mult <= 0:
        raise ValueError(f"blocks must be 1-{len(_V1_BLOCKS)}, kernel_size odd, width_mult > 0")
    stem = _round8(16 * width_mult)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()]
    cin = stem
    for out, stride in _V1_BLOCKS[:blocks]:
        cout = _round8(out * width_mult)
        layers += _ds_block(cin, cout, stride, kernel_size)
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    model = nn.Sequential(*layers)
    model.input_shape = (1, in_channels, input_size, input_size)
    return model


class Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 squeeze, then 1x1 and kxk expands concatenated on channels."""

    def __init__(self, cin: int, squeeze: int, expand: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.expand1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3 = nn.Sequential(nn.Conv2d(squeeze, expand, kernel_size, padding=kernel_size // 2), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return torch.cat([self.expand1(s), self.expand3(s)], dim=1)


def squeezenet_style(width_mult: float = 1.0, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                     kernel_size: int = 3, blocks: int = 4) -> nn.Sequential:
    """SqueezeNet-style: 3x3 stem + maxpool, ``blocks`` Fire modules (a maxpool after the second),
    a 1x1 conv classifier and global average pooling (no fully connected layer).

    >>> import torch
    >>> squeezenet_style(width_mult=0.5)(torch.zeros(1, 1, 28, 28)).shape
    torch.Size([1, 10])
    """
    if not 1 <= blocks <= 6 or kernel_size % 2 == 0 or width_mult <= 0:
        raise ValueError("blocks must be 1-6, kernel_size odd, width_mult > 0")
    stem = _round8(32 * width_mult)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2)]
    cin = stem
    for i in range(blocks):
        squeeze = _round8((8 if i < 2 else 16) * width_mult)
        expand = _round8((16 if i < 2 else 32) * width_mult)
        layers.append(Fire(cin, squeeze, expand, kernel_size))
        cin = 2 * expand
        if i == 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.Conv2d(cin, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    model = nn.Sequential(*layers)
    model.input_shape = (1, in_channels, input_size, input_size)
    return model


def cnn1d(in_channels: int = 3, num_classes: int = 6, length: int = 128, channels: int = 32, blocks: int = 3,
          kernel_size: int = 5) -> nn.Sequential:
    """A 1D-CNN for multichannel time series (N, C, T): ``blocks`` x (Conv1d + BN + ReLU +
    maxpool 2), channels doubling from ``channels``, global average pool, linear.

    >>> import torch
    >>> cnn1d()(torch.zeros(4, 3, 128)).shape
    torch.Size([4, 6])
    """
    if kernel_size % 2 == 0 or blocks < 1 or length < 2 ** blocks:
        raise ValueError("kernel_size must be odd, blocks >= 1 and length >= 2**blocks")
    layers: list[nn.Module] = []
    cin = in_channels
    for i in range(blocks):
        cout = channels * 2 ** i
        layers += [nn.Conv1d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False), nn.BatchNorm1d(cout),
                   nn.ReLU(), nn.MaxPool1d(2)]
        cin = cout
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    model = nn.Sequential(*layers)
    model.input_shape = (1, in_channels, length)
    return model


class RNNClassifier(nn.Module):
    """A GRU or LSTM over (N, T, F) sequences; the last time step's hidden state goes to a linear."""

    def __init__(self, cell: str, in_features: int, hidden: int, num_layers: int, num_classes: int) -> None:
        super().__init__()
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be gru or lstm (got {cell!r})")
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(in_features, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def rnn_classifier(cell: str = "gru", in_features: int = 3, hidden: int = 32, num_layers: int = 1,
                   num_classes: int = 6, length: int = 64) -> RNNClassifier:
    """A small GRU/LSTM sequence classifier; ``length`` only sets ``model.input_shape``.

    >>> import torch
    >>> rnn_classifier("lstm")(torch.zeros(2, 64, 3)).shape
    torch.Size([2, 6])
    """
    model = RNNClassifier(cell, in_features, hidden, num_layers, num_classes)
    model.input_shape = (1, length, in_features)
    return model


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v1_style": mobilenet_v1_style,
    "squeezenet_style": squeezenet_style,
    "cnn1d": cnn1d,
    "rnn_classifier": rnn_classifier,
}
