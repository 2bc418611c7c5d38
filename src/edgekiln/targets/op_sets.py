"""Which ONNX ops each accelerator's compiler maps to the unit: data tables, as models/support.py.

A profile's unit names one of these with ``ops: edgetpu`` (or lists ONNX op names itself; no ``ops``
means every op). Ops a unit does not list fall back to another unit; the placement report says why.

Sources (nothing is fetched at run time; the tables were transcribed from these documents):

- ``edgetpu``: Coral, "TensorFlow models on the Edge TPU" (coral.ai/docs/edgetpu/models-intro), the table
  "Supported operations", TFLite op names mapped to ONNX: Conv2d and DepthwiseConv2d -> Conv,
  FullyConnected -> Gemm/MatMul, L2Normalization -> LpNormalization, ResizeBilinear/NearestNeighbor -> Resize,
  Logistic -> Sigmoid, Relu6/ReluN1To1 -> Clip, Mean -> ReduceMean (GlobalAveragePool), Sum -> ReduceSum,
  ExpandDims/Squeeze/Reshape -> Unsqueeze/Squeeze/Reshape/Flatten, Quantize -> QuantizeLinear (Dequantize is
  not in the table: a model's final DequantizeLinear runs on the CPU). FullyConnected takes a constant weight,
  so a MatMul of two activations (attention) is refused (``UnitLimits.matmul_const_weight``). Not mapped:
  LSTM, Pack, Rsqrt, SquaredDifference (no single ONNX op). The same page's
  limits become ``UnitLimits`` in the profile: at most 3 non-unit dims, Mean and Pad over x/y only, Softmax
  on 1-D input only, int8 (uint8) only, and the compiler's single partition (``max_segments: 1``).
- ``rknpu``: Rockchip, RKNN-Toolkit2 "RKNN_Compiler_Support_Operator_List" (v1.5-v2.x), the ONNX column.
  HardSwish and HardSigmoid run on the NPU; LayerNormalization, Erf and TopK fall back to the CPU.
- ``tflite``: the ops edgekiln's own ``.tflite`` writer handles (models/support.py), for the host's LiteRT unit.
- ``mali_gpu`` / ``tensorrt_gpu``: every op minus a short stated list (an assumption: the Arm NN /
  OpenCL and TensorRT ONNX parsers cover the common ops; the exclusions are ops they document as
  unsupported or CPU-only).
"""

from __future__ import annotations

from typing import Any

from edgekiln.errors import EdgekilnError

#: Q/DQ folded into an int8 op are part of it (placement.support skips them); a Q or DQ standing alone is
#: the deployed model's Quantize/Dequantize op and must be listed: the Edge TPU runs Quantize, not Dequantize.
_QDQ = frozenset({"QuantizeLinear", "DequantizeLinear"})
_SHAPE_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Constant"})

EDGETPU = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Max", "Min", "Relu", "Clip", "Sigmoid", "Tanh",
    "PRelu", "AveragePool", "MaxPool", "GlobalAveragePool", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
    "Concat", "Pad", "Slice", "Split", "Resize", "Softmax", "LpNormalization", "Transpose", "SpaceToDepth",
    "QuantizeLinear",
}) | _SHAPE_OPS

RKNPU = frozenset({
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Max", "Min", "Relu", "Clip", "LeakyRelu",
    "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Exp", "AveragePool", "MaxPool",
    "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum", "ReduceMax", "Concat", "Split", "Slice", "Pad",
    "Resize", "Transpose", "Softmax", "BatchNormalization", "InstanceNormalization", "LpNormalization",
    "DepthToSpace", "SpaceToDepth", "Gather", "Expand", "Tile", "Pow", "Sqrt", "Abs", "Neg", "Cast", "Where", "Equal",
    "Greater", "Less", "Swish", "Gelu",
}) | _SHAPE_OPS | _QDQ

#: Arm Mali via OpenCL (Arm NN / ORT-ACL class): data-dependent and string ops stay on the CPU (assumption).
MALI_GPU_EXCLUDED = frozenset({"NonMaxSuppression", "TopK", "NonZero", "Unique", "RoiAlign", "Loop", "If", "Scan",
                               "StringNormalizer", "RandomNormal", "RandomUniform"})
#: TensorRT's ONNX parser: these are documented as unsupported or plugin-only (assumption for the list's
#: completeness; NonMaxSuppression needs the EfficientNMS plugin).
TENSORRT_GPU_EXCLUDED = frozenset({"NonMaxSuppression", "NonZero", "Unique", "StringNormalizer", "Loop", "Scan",
                                   "RoiAlign"})

#: name -> (ops or None for "all", excluded ops, label used in fallback reasons)
OP_SETS: dict[str, tuple[frozenset[str] | None, frozenset[str], str]] = {
    "edgetpu": (EDGETPU, frozenset(), "the Edge TPU op list"),
    "rknpu": (RKNPU, frozenset(), "the RKNN NPU op list"),
    "mali_gpu": (None, MALI_GPU_EXCLUDED, "the Mali GPU op list"),
    "tensorrt_gpu": (None, TENSORRT_GPU_EXCLUDED, "the TensorRT op list"),
    "tflite": (None, frozenset(), "edgekiln's .tflite writer op list"),   # filled from models/support.py
}


def resolve(raw: Any, where: str) -> tuple[frozenset[str] | None, frozenset[str], str]:
    """A unit's ``ops:`` value -> (ops, excluded, label): a named set, a list of ONNX ops, or absent (all).

    >>> resolve(None, "x")
    (None, frozenset(), '')
    >>> resolve(["Conv", "Relu"], "x")[0] == frozenset({"Conv", "Relu"})
    True
    """
    if raw is None:
        return None, frozenset(), ""
    if raw == "tflite":
        from edgekiln.models.support import SUPPORTED_OPS

        return SUPPORTED_OPS["tflite"] or frozenset(), frozenset(), OP_SETS["tflite"][2]
    if isinstance(raw, str):
        if raw not in OP_SETS:
            raise EdgekilnError(f"{where}: unknown op set {raw!r} (known: {', '.join(OP_SETS)}, or a list of ONNX ops)")
        return OP_SETS[raw]
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return frozenset(raw), frozenset(), ""
    raise EdgekilnError(f"{where}: a named op set ({', '.join(OP_SETS)}) or a list of ONNX op names")
