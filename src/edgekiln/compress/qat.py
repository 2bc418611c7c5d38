"""Quantization-aware training: fine-tune with the int8 rounding in the loop.

Every Conv2d/Linear is wrapped so that, in the forward pass, its input activation is
fake-quantized per tensor (asymmetric int8, range tracked by an exponential moving average and
frozen after ``observe_steps``) and its weight per output channel (symmetric int8,
scale = max|w| / 127, the grid onnxruntime's per-channel quantizer uses). Gradients pass the
rounding straight through (the straight-through estimator built into torch's fake-quant ops).

After training, :func:`strip_qat` returns a plain float module whose weights lie exactly on
their int8 grid; quantizing it with the ordinary static QDQ path then reproduces what training
simulated, so QAT produces the same kind of artifact as post-training quantization.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class ActFakeQuant(nn.Module):
    """Per-tensor asymmetric int8 fake-quantization with an EMA range observer."""

    def __init__(self, momentum: float = 0.05, observe_steps: int = 200) -> None:
        super().__init__()
        self.momentum, self.observe_steps = momentum, observe_steps
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and int(self.steps) < self.observe_steps:
            lo, hi = x.detach().min(), x.detach().max()
            if int(self.steps) == 0:
                self.lo.copy_(lo)
                self.hi.copy_(hi)
            else:
                self.lo.mul_(1 - self.momentum).add_(self.momentum * lo)
                self.hi.mul_(1 - self.momentum).add_(self.momentum * hi)
            self.steps += 1
        lo = torch.clamp(self.lo, max=0.0)
        hi = torch.clamp(self.hi, min=0.0)
        scale = float(torch.clamp((hi - lo) / 255.0, min=1e-8))
        zero_point = int(torch.clamp(torch.round(-128 - lo / scale), -128, 127))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127)


def weight_fake_quant(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel int8 (values in [-127, 127]); zero points are 0."""
    flat = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1)
    scale = torch.clamp(flat / 127.0, min=1e-8).to(torch.float32)
    zp = torch.zeros(w.shape[0], dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)


class QATConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, **observer: Any) -> None:
        super().__init__()
        self.conv, self.act = conv, ActFakeQuant(**observer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        return F.conv2d(self.act(x), weight_fake_quant(c.weight), c.bias, c.stride, c.padding, c.dilation, c.groups)


class QATLinear(nn.Module):
    def __init__(self, linear: nn.Linear, **observer: Any) -> None:
        super().__init__()
        self.linear, self.act = linear, ActFakeQuant(**observer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act(x), weight_fake_quant(self.linear.weight), self.linear.bias)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` into the
    conv (eval-mode statistics), so QAT quantizes the weights the exporter will produce."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:], strict=False):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                module._modules[a], module._modules[b] = fused, nn.Identity()
    return model


def prepare_qat(model: nn.Module, **observer: Any) -> nn.Module:
    """A copy of ``model`` (BatchNorm folded) with every Conv2d/Linear wrapped for QAT."""
    model = fold_batchnorm(model)

    def wrap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, name, QATConv2d(child, **observer))
            elif isinstance(child, nn.Linear):
                setattr(parent, name, QATLinear(child, **observer))
            else:
                wrap(child)

    wrap(model)
    return model


def strip_qat(model: nn.Module) -> nn.Module:
    """The float module with the wrappers removed and weights snapped to their int8 grid."""
    model = copy.deepcopy(model).eval()

    def unwrap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, (QATConv2d, QATLinear)):
                inner = child.conv if isinstance(child, QATConv2d) else child.linear
                with torch.no_grad():
                    inner.weight.copy_(weight_fake_quant(inner.weight))
                setattr(parent, name, inner)
            else:
                unwrap(child)

    unwrap(model)
    return model


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """The ranges each wrapped layer's input observer settled on (for the report)."""
    return {name: (float(m.lo), float(m.hi)) for name, m in model.named_modules() if isinstance(m, ActFakeQuant)}
