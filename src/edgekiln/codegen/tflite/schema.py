"""Access to the TFLite flatbuffer schema, and a small graph builder that writes ``.tflite`` bytes.

No TensorFlow: the generated Python schema module ships inside the ``tflite-micro`` wheel (and a
copy inside ``ai-edge-litert``); ``flatbuffers`` packs the object API (``ModelT`` ...) into bytes.

The builder knows nothing about ONNX or edgekiln's IR: it holds tensors (shape, dtype, optional
constant data, quantization) and operators (builtin code, inputs, outputs, options), and
:meth:`TFLiteGraph.to_bytes` packs them. :mod:`edgekiln.codegen.tflite.writer` lowers the IR onto it.

>>> import numpy as np
>>> g = TFLiteGraph("relu_only")
>>> x = g.add_tensor("x", (1, 4), np.int8, scale=0.1, zero_point=-3)
>>> y = g.add_tensor("y", (1, 4), np.int8, scale=0.1, zero_point=-3)
>>> g.add_op("RELU", [x], [y])
>>> data = g.to_bytes(inputs=[x], outputs=[y])
>>> data[4:8]
b'TFL3'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

# NOTE: constant buffers are aligned to 16 bytes (what the TFLite converter does with
# force_align); TFLM reads int32 bias and int8 weights in place from flash, so misaligned
# data would be a silent slowdown (or a fault on cores without unaligned access).
BUFFER_ALIGNMENT = 16
FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3

_NP_TO_TFLITE = {"int8": "INT8", "int32": "INT32", "uint8": "UINT8", "float32": "FLOAT32",
                 "int16": "INT16", "int64": "INT64"}


@lru_cache(maxsize=1)
def schema_module() -> ModuleType:
    """The generated TFLite schema module (``ModelT``, ``BuiltinOperator``, options classes ...)."""
    try:
        from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb
    except ImportError:
        try:
            from ai_edge_litert import schema_py_generated as fb  # type: ignore[no-redef]
        except ImportError as exc:
            raise EdgekilnError("writing .tflite needs the 'tflite-micro' (or 'ai-edge-litert') package: "
                                "pip install tflite-micro") from exc
    return fb


def builtin_code(op: str) -> int:
    """The ``BuiltinOperator`` enum value for an op name such as ``"CONV_2D"``."""
    return int(getattr(schema_module().BuiltinOperator, op))


def activation_code(name: str | None) -> int:
    """``ActivationFunctionType`` value for ``None``/``"NONE"``, ``"RELU"``, ``"RELU6"``."""
    return int(getattr(schema_module().ActivationFunctionType, (name or "NONE").upper()))


@dataclass
class TensorSpec:
    """One tensor of the graph. ``data`` is set for constants (weights, bias, shapes)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    data: np.ndarray | None = None
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    quantized_dimension: int = 0


@dataclass
class OpSpec:
    op: str
    inputs: list[int]
    outputs: list[int]
    options: Any = None  # an ``...OptionsT`` instance from the schema, or None
    version: int = 1


@dataclass
class TFLiteGraph:
    """A single-subgraph TFLite model under construction (tensor ids are list indices)."""

    name: str = "edgekiln"
    tensors: list[TensorSpec] = field(default_factory=list)
    ops: list[OpSpec] = field(default_factory=list)

    def add_tensor(self, name: str, shape: tuple[int, ...] | list[int], dtype: Any, *,
                   data: np.ndarray | None = None, scale: Any = None, zero_point: Any = None,
                   quantized_dimension: int = 0) -> int:
        """Add a tensor and return its index. ``scale``/``zero_point`` may be scalars or per-channel arrays."""
        dt = np.dtype(dtype).name
        if dt not in _NP_TO_TFLITE:
            raise EdgekilnError(f"tensor {name!r}: dtype {dt} cannot be written to .tflite")
        shape = tuple(int(s) for s in shape)
        if data is not None:
            data = np.ascontiguousarray(np.asarray(data, dtype=dt).reshape(shape))
        sc = None if scale is None else np.atleast_1d(np.asarray(scale, dtype=np.float32))
        zp = None if zero_point is None else np.atleast_1d(np.asarray(zero_point, dtype=np.int64))
        if sc is not None and zp is None:
            zp = np.zeros_like(sc, dtype=np.int64)
        if sc is not None and zp is not None and zp.size == 1 and sc.size > 1:
            zp = np.full(sc.shape, int(zp[0]), dtype=np.int64)
        self.tensors.append(TensorSpec(name, shape, dt, data, sc, zp, int(quantized_dimension)))
        return len(self.tensors) - 1

    def add_op(self, op: str, inputs: list[int], outputs: list[int], options: Any = None,
               *, version: int = 1) -> None:
        """Append an operator (``op`` is a ``BuiltinOperator`` name; ``-1`` marks an omitted input)."""
        builtin_code(op)  # fail early on a typo
        self.ops.append(OpSpec(op, list(inputs), list(outputs), options, version))

    def to_bytes(self, *, inputs: list[int], outputs: list[int], description: str = "edgekiln") -> bytes:
        """Pack the graph into ``.tflite`` flatbuffer bytes."""
        import flatbuffers

        fb = schema_module()
        buffers: list[Any] = [fb.BufferT()]  # buffer 0 is the empty sentinel, by convention
        tensors = []
        for t in self.tensors:
            tt = fb.TensorT()
            tt.name = t.name
            tt.shape = list(t.shape)
            tt.type = int(getattr(fb.TensorType, _NP_TO_TFLITE[t.dtype]))
            tt.buffer = 0
            if t.data is not None:
                buf = _aligned_buffer_class()()
                buf.raw = t.data.astype(t.data.dtype.newbyteorder("<"), copy=False).tobytes()
                buffers.append(buf)
                tt.buffer = len(buffers) - 1
            if t.scale is not None:
                q = fb.QuantizationParametersT()
                q.scale = [float(s) for s in t.scale]
                q.zeroPoint = [int(z) for z in t.zero_point]
                q.quantizedDimension = t.quantized_dimension
                tt.quantization = q
            tensors.append(tt)
        codes: list[tuple[str, int]] = []
        operators = []
        for o in self.ops:
            key = (o.op, o.version)
            if key not in codes:
                codes.append(key)
            ot = fb.OperatorT()
            ot.opcodeIndex = codes.index(key)
            ot.inputs = list(o.inputs)
            ot.outputs = list(o.outputs)
            if o.options is not None:
                ot.builtinOptionsType = int(getattr(fb.BuiltinOptions, type(o.options).__name__[:-1]))
                ot.builtinOptions = o.options
            operators.append(ot)
        opcodes = []
        for op, version in codes:
            oc = fb.OperatorCodeT()
            code = builtin_code(op)
            oc.builtinCode = code
            # NOTE: old readers look only at the int8 deprecated field (codes < 127 fit in it).
            oc.deprecatedBuiltinCode = min(code, 127)
            oc.version = version
            opcodes.append(oc)
        sg = fb.SubGraphT()
        sg.tensors, sg.operators, sg.name = tensors, operators, self.name
        sg.inputs, sg.outputs = list(inputs), list(outputs)
        model = fb.ModelT()
        model.version = SCHEMA_VERSION
        model.operatorCodes, model.subgraphs, model.buffers = opcodes, [sg], buffers
        model.description = description
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())


@lru_cache(maxsize=1)
def _aligned_buffer_class() -> type:
    fb = schema_module()

    class AlignedBufferT(fb.BufferT):  # type: ignore[misc, name-defined]
        """A ``BufferT`` whose bytes are packed at a 16-byte boundary."""

        raw: bytes = b""

        def Pack(self, builder: Any) -> int:  # noqa: N802 - flatbuffers' object-API name
            n = len(self.raw)
            builder.StartVector(1, n, BUFFER_ALIGNMENT)
            builder.head = builder.head - n
            builder.Bytes[builder.head: builder.head + n] = self.raw
            data = builder.EndVector()
            fb.BufferStart(builder)
            fb.BufferAddData(builder, data)
            return fb.BufferEnd(builder)

    return AlignedBufferT


def options(name: str, **fields: Any) -> Any:
    """An options object, e.g. ``options("Conv2DOptions", padding=0, strideW=1, strideH=1)``."""
    fb = schema_module()
    obj = getattr(fb, name + "T")()
    for k, v in fields.items():
        if not hasattr(obj, k):
            raise AttributeError(f"{name} has no field {k!r}")
        setattr(obj, k, v)
    return obj


def read_model(data: bytes) -> Any:
    """Unpack ``.tflite`` bytes into the schema's object API (``ModelT``), for inspection and tests."""
    fb = schema_module()
    return fb.ModelT.InitFromObj(fb.Model.GetRootAsModel(bytearray(data), 0))


def op_names(model: Any) -> list[str]:
    """The builtin operator names of the first subgraph, in execution order."""
    fb = schema_module()
    by_code = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    return [by_code[codes[o.opcodeIndex]] for o in model.subgraphs[0].operators]
