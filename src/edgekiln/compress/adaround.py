"""Adaptive rounding of int8 weights (AdaRound, Nagel et al., ICML 2020).

Rounding every weight to its nearest int8 level minimizes the error of each weight, not of the
layer's output. AdaRound learns, per weight, whether to round down or up so that the layer's
output on the calibration data stays closest to the float layer's output. The reconstruction is
*asymmetric*: the quantized layer sees its input as the quantized model so far produces it (the
error of earlier layers included), the target is the float layer's output on the float input, so
each layer also absorbs part of the error upstream of it. A fifth of the calibration samples is
held out of each fit; a layer keeps its learned rounding only if those samples agree it is better.

Works on a QDQ model as onnxruntime's quantizer writes it: a Conv/Gemm/MatMul whose weight is a
``DequantizeLinear`` of an int8 initializer with zero point 0. Only the int8 values change; the
scales, the graph and the file size stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Rectified sigmoid stretch (the paper's zeta and gamma) and regularizer schedule.
_ZETA, _GAMMA = 1.1, -0.1
_BETA_START, _BETA_END, _WARMUP = 20.0, 2.0, 0.2


@dataclass(frozen=True)
class AdaRoundSettings:
    iterations: int = 1000        # optimizer steps per layer
    batch: int = 32               # calibration samples per step
    reg_weight: float = 0.01      # lambda: pull of each rounding variable towards 0 or 1
    lr: float = 1e-2
    seed: int = 0


def adaround(float_model: Any, qdq_model: Any, feeds: list[dict[str, np.ndarray]],
             settings: AdaRoundSettings = AdaRoundSettings()) -> tuple[Any, dict[str, Any]]:
    """Return a copy of ``qdq_model`` with the int8 weights of every Conv/Gemm/MatMul re-rounded,
    layer by layer in graph order, and a report per layer (output MSE on ``feeds`` before and
    after, and how many weights moved off nearest rounding)."""
    import onnx

    from edgekiln.quant.correction import tensor_values

    q = onnx.ModelProto()
    q.CopyFrom(qdq_model)
    float_nodes = {n.name: n for n in float_model.graph.node if n.name}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    # Storing a layer rewrites its initializer in place, so these maps stay valid for the whole walk.
    inits = {i.name: i for i in q.graph.initializer}
    producers = {o: n for n in q.graph.node for o in n.output}
    report: dict[str, Any] = {}
    for node in list(q.graph.node):
        layer = _layer(node, inits, producers, float_nodes, float_inits)
        if layer is None:
            continue
        x = tensor_values(q, feeds, [node.input[0]])[node.input[0]]
        fn = float_nodes[node.name]
        target = tensor_values(float_model, feeds, [fn.output[0]])[fn.output[0]]
        ints, stats = _fit(layer, x, target, settings)
        layer.store(ints)
        report[node.name] = stats
    return q, report


@dataclass
class _Layer:
    op: str
    attrs: dict[str, Any]
    weight: np.ndarray      # float weight, as the float model holds it
    scale: np.ndarray       # broadcastable to weight
    qmin: int
    qmax: int
    bias: np.ndarray | None  # the bias as the quantized layer applies it (dequantized)
    init: Any               # the int8 initializer to overwrite

    def store(self, ints: np.ndarray) -> None:
        from onnx import numpy_helper

        self.init.CopyFrom(numpy_helper.from_array(ints.astype(np.int8), self.init.name))


def _layer(node: Any, inits: dict[str, Any], producers: dict[str, Any], float_nodes: dict[str, Any],
           float_inits: dict[str, Any]) -> _Layer | None:
    from onnx import helper, numpy_helper

    if node.op_type not in ("Conv", "Gemm", "MatMul") or node.name not in float_nodes:
        return None
    dq = producers.get(node.input[1])
    fw = float_nodes[node.name].input[1]
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or fw not in float_inits:
        return None
    w_int = inits[dq.input[0]]
    if w_int.data_type != 3:  # INT8
        return None
    if len(dq.input) > 2 and dq.input[2] and numpy_helper.to_array(inits[dq.input[2]]).any():
        return None  # AdaRound here assumes symmetric weights (zero point 0)
    weight = numpy_helper.to_array(float_inits[fw]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * weight.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bias = None
    if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
        src = producers.get(node.input[2])
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0] in inits:
            bias = numpy_helper.to_array(inits[src.input[0]]).astype(np.float64) * \
                numpy_helper.to_array(inits[src.input[1]]).astype(np.float64)
        elif node.input[2] in inits:
            bias = numpy_helper.to_array(inits[node.input[2]])
        else:
            return None
    return _Layer(node.op_type, attrs, weight, scale, -127, 127,
                  None if bias is None else np.asarray(bias, np.float32), w_int)


def _fit(layer: _Layer, x: np.ndarray, target: np.ndarray, s: AdaRoundSettings) -> tuple[np.ndarray, dict[str, Any]]:
    import torch

    w = torch.from_numpy(layer.weight)
    scale = torch.from_numpy(layer.scale)
    floor = torch.floor(w / scale)
    frac = (w / scale - floor).clamp(1e-4, 1 - 1e-4)
    # h(v) = frac at the start: the soft weight begins at the float weight.
    v = torch.nn.Parameter(-torch.log((_ZETA - _GAMMA) / (frac - _GAMMA) - 1))
    xs, ys = torch.from_numpy(x), torch.from_numpy(target)
    bias = None if layer.bias is None else torch.from_numpy(layer.bias)
    opt = torch.optim.Adam([v], lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    # Every 5th sample is held out of the fit: a layer with more weights than its outputs on the
    # calibration set constrain (a classifier fitted on 256 samples) can fit the calibration set
    # and still round worse than nearest on new data; the held-out part decides.
    held = torch.arange(xs.shape[0]) % 5 == 4 if xs.shape[0] >= 10 else torch.ones(xs.shape[0], dtype=torch.bool)
    fit = ~held if bool((~held).any()) else held
    fit_idx = torch.nonzero(fit).flatten()
    n = len(fit_idx)

    def h() -> torch.Tensor:
        return (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)

    def apply(wq: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
        return _forward(layer, wq, bias, inp)

    nearest = torch.clamp(torch.round(w / scale), layer.qmin, layer.qmax)

    def errors(ints: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            sq = (apply(ints * scale, xs) - ys) ** 2
        return float(sq.mean()), float(sq[held].mean())

    before, held_before = errors(nearest)
    for step in range(s.iterations):
        idx = fit_idx[torch.randint(0, n, (min(s.batch, n),), generator=gen)]
        wq = torch.clamp(floor + h(), layer.qmin, layer.qmax) * scale
        loss = _reconstruction(apply(wq, xs[idx]), ys[idx])
        progress = step / s.iterations
        if progress >= _WARMUP:
            beta = _BETA_END + (_BETA_START - _BETA_END) * (1 - (progress - _WARMUP) / (1 - _WARMUP))
            loss = loss + s.reg_weight * (1 - (2 * h() - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ints = torch.clamp(floor + (h() >= 0.5).float(), layer.qmin, layer.qmax)
    after, held_after = errors(ints)
    moved = int((ints != nearest).sum())
    kept = held_after < held_before  # never worse than nearest rounding on samples the fit did not see
    if not kept:
        ints, after, moved = nearest, before, 0
    return ints.numpy().astype(np.int8), {"mse_nearest": before, "mse": after, "held_out_mse_nearest": held_before,
                                          "held_out_mse_learned": held_after, "kept": kept,
                                          "flipped_weights": moved, "weights": int(ints.numel())}


def _reconstruction(y: Any, target: Any) -> Any:
    """Squared error summed over each sample's outputs, averaged over the batch: the scale against
    which ``reg_weight`` (the paper's lambda) is set."""
    return ((y - target) ** 2).flatten(1).sum(1).mean()


def _forward(layer: _Layer, w: Any, bias: Any, x: Any) -> Any:
    import torch.nn.functional as F

    a = layer.attrs
    if layer.op == "Conv":
        pads = list(a.get("pads", [0] * (2 * (w.dim() - 2))))
        half = len(pads) // 2
        if pads[:half] != pads[half:]:
            x = F.pad(x, [p for i in reversed(range(half)) for p in (pads[i], pads[i + half])])
            pads = [0] * len(pads)
        conv = F.conv2d if w.dim() == 4 else F.conv1d
        return conv(x, w, bias, stride=a.get("strides", 1), padding=pads[:half], dilation=a.get("dilations", 1),
                    groups=a.get("group", 1))
    if layer.op == "Gemm":
        xa = x.transpose(0, 1) if a.get("transA", 0) else x
        wb = w.transpose(0, 1) if a.get("transB", 0) else w
        y = a.get("alpha", 1.0) * (xa @ wb)
        return y if bias is None else y + a.get("beta", 1.0) * bias
    return x @ w
