"""``export_c``: QDQ int8 ONNX -> integer C library + report (arena, flash, per-op table, memory plot)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekiln.codegen.emit import check_prefix, write_library
from edgekiln.codegen.fuse import lower_for_c
from edgekiln.codegen.ir import IntGraph
from edgekiln.codegen.planner import MemoryPlan, plan_memory, plot_live_memory
from edgekiln.codegen.requant_fixed import FIXED_ATTR, FLOAT32_EXACT, apply_mode, check_mode
from edgekiln.errors import EdgekilnError

#: Cortex-M4 ``-mthumb -Os`` code bytes per kernel, measured with arm-none-eabi-gcc 12 on
#: ek_kernels.c (``-ffunction-sections``); ``_call`` is the per-step call site in NAME.c and
#: ``_ldiv`` libgcc's 64-bit division, pulled in by avg_pool and softmax; ``_conv_row`` the conv
#: row helper shared by conv2d and the fused conv_pool; ``_requant_b32`` the float32-exact conv/FC
#: requantization with its 24-bit rounding helper (186 + 154 B), ``_requant_fixed`` the fixed-point mode's
#: (TFLite Micro's arithmetic, used instead). lut_channel, gather, mul, pad, resize measured the same way
#: (issue 20).
CODE_BYTES = {"_requant": 178, "_call": 28, "_ldiv": 400, "_conv_row": 314, "_requant_b32": 340,
              "_requant_fixed": 166, "conv2d": 66, "fully_connected": 108, "add": 108,
              "requantize": 58, "max_pool": 164, "avg_pool": 360, "concat": 146, "softmax": 224,
              "transpose_nchw": 74, "reshape": 0, "conv_pool": 420, "lut": 26, "lut_channel": 52, "gather": 54,
              "mul": 246, "pad": 118, "resize": 376, "mean_lut": 94,
              "add_lut": 112, "constant": 0}
#: bytes of one int32 field in a ``static const`` parameter struct.
_FIELD_BYTES = 4


@dataclass
class CExport:
    """What :func:`export_c` produced."""

    out_dir: Path
    prefix: str
    graph: IntGraph
    plan: MemoryPlan
    files: list[Path]
    flash: dict[str, int] = field(default_factory=dict)
    fused: bool = False
    #: requantization mode (edgekiln.codegen.requant_fixed.REQUANT_MODES)
    requant: str = "float32-exact"

    def to_dict(self) -> dict[str, Any]:
        g = self.graph
        ti, to = g.tensors[g.input], g.tensors[g.output]
        return {
            "target": "c", "prefix": self.prefix, "files": [p.name for p in self.files], "fused": self.fused,
            "requant": self.requant,
            "arena_bytes": self.plan.arena_bytes, "io_bytes": g.input_bytes + g.output_bytes,
            "ram_bytes": self.plan.arena_bytes + g.input_bytes + g.output_bytes,
            "flash_bytes": self.flash["total"], "flash": self.flash, "macs": g.macs,
            "input": {"shape_nhwc": list(ti.shape), "scale": ti.scale, "zero_point": ti.zero_point},
            "inputs": [{"name": name, "shape_nhwc": list(g.tensors[i].shape), "scale": g.tensors[i].scale,
                        "zero_point": g.tensors[i].zero_point, "offset": off}
                       for i, (name, _), off in zip(g.inputs, g.onnx_inputs, g.input_offsets, strict=True)],
            "output": {"shape_nhwc": list(to.shape), "scale": to.scale, "zero_point": to.zero_point},
            "outputs": [{"shape_nhwc": list(g.tensors[o].shape), "scale": g.tensors[o].scale,
                         "zero_point": g.tensors[o].zero_point, "offset": off}
                        for o, off in zip(g.outputs, g.output_offsets, strict=True)],
            "memory_plan": self.plan.to_dict(),
            "ops": [{"step": i, "name": op.name, "kind": op.kind, "output_shape": list(g.tensors[op.output].shape),
                     "macs": op.macs, "const_bytes": op.const_bytes, "location": self.plan.location[op.output]}
                    for i, op in enumerate(self.plan.schedule)],
        }


def estimate_flash(graph: IntGraph) -> dict[str, int]:
    """Flash bytes: constant arrays + parameter structs + a code-size estimate (see :data:`CODE_BYTES`; a
    layer a fast kernel runs: :data:`edgekiln.codegen.fast_kernels.CODE_BYTES`, its arrays as emitted)."""
    from edgekiln.codegen import fast_kernels
    from edgekiln.codegen.emit import PARAM_STRUCT, STRUCT_FIELDS

    fast = [fast_kernels.choose(op) for op in graph.ops]
    portable = [op for op, fk in zip(graph.ops, fast, strict=True) if fk is None]
    weights = sum(fast_kernels.const_bytes(op) for op in graph.ops)
    params = sum(len(STRUCT_FIELDS[PARAM_STRUCT[op.kind]].split()) * _FIELD_BYTES for op in portable if op.kind in PARAM_STRUCT)
    n_conv_pool = sum(op.kind == "conv_pool" for op in portable)
    params += n_conv_pool * (len(STRUCT_FIELDS["ek_conv_params"].split()) + len(STRUCT_FIELDS["ek_pool_params"].split()) + 2) \
        * _FIELD_BYTES
    kinds = {op.kind for op in portable}
    code = CODE_BYTES["_requant"] + sum(CODE_BYTES[k] for k in kinds) + CODE_BYTES["_call"] * len(graph.ops)
    code += sum(fast_kernels.CODE_BYTES[fk.name] for fk in fast if fk is not None)
    if kinds & {"conv2d", "conv_pool"}:
        code += CODE_BYTES["_conv_row"]
    if kinds & {"conv2d", "conv_pool", "fully_connected"} or any(fast):
        fixed = any(op.attrs.get(FIXED_ATTR) for op in graph.ops)
        code += CODE_BYTES["_requant_fixed" if fixed else "_requant_b32"]
    if kinds & {"avg_pool", "softmax", "conv_pool", "resize"}:
        code += CODE_BYTES["_ldiv"]
    return {"weights": weights, "params": params, "code_estimate": code, "total": weights + params + code}


@dataclass(frozen=True)
class McuFootprint:
    """RAM and flash the default C export of a model needs (see :func:`mcu_footprint`)."""

    arena_bytes: int
    io_bytes: int          # the int8 input and output buffers the caller owns
    flash: dict[str, int]  # weights, params, code_estimate, total (:func:`estimate_flash`)

    @property
    def ram_bytes(self) -> int:
        return self.arena_bytes + self.io_bytes


def mcu_footprint(model: str | Path | Any, input_shapes: dict[str, tuple[int, ...]] | None = None) -> McuFootprint:
    """The arena, I/O and flash bytes ``export --to c`` would produce for an int8 QDQ model, without
    writing files: the numbers ``fits`` and ``optimize`` use for microcontroller targets (dynamic
    input dims from ``input_shapes``, else 1).

    >>> from edgekiln.codegen.testmodels import tiny_qdq_model
    >>> fp = mcu_footprint(tiny_qdq_model("tiny_int8.onnx"))
    >>> fp.ram_bytes, fp.flash["total"]
    (346, 4302)
    """
    graph = lower_for_c(model, input_shapes=input_shapes)  # fused, as the default export
    plan = plan_memory(graph)
    io = graph.input_bytes + graph.output_bytes
    return McuFootprint(int(plan.arena_bytes), int(io), estimate_flash(graph))


def export_c(model: str | Path, out_dir: str | Path, *, prefix: str = "model", reorder: bool = True,
             fuse: bool = True, input_shapes: dict[str, tuple[int, ...]] | None = None,
             requant: str = FLOAT32_EXACT) -> CExport:
    """Lower a QDQ int8 ONNX model to a C99 library in ``out_dir``; plot and plan included.

    ``fuse`` (default) runs :func:`edgekiln.codegen.fuse.fuse_conv_pool`: conv -> pool pairs
    become one kernel that never stores the full conv output (a smaller arena). ``input_shapes`` fixes dynamic input dims (else 1).
    ``requant``: ``float32-exact`` (bit-exact with onnxruntime) or ``fixed-point`` (with TFLite Micro,
    :mod:`edgekiln.codegen.requant_fixed`; ops it cannot match are refused, named).

    >>> from edgekiln.codegen.testmodels import tiny_qdq_model
    >>> res = export_c(tiny_qdq_model("tiny_int8.onnx"), "out/c", prefix="tiny")
    >>> res.plan.arena_bytes, sorted(p.name for p in res.out_dir.glob("tiny.*"))
    (272, ['tiny.c', 'tiny.h'])
    """
    check_prefix(prefix)
    check_mode(requant)
    model = Path(model)
    if not model.is_file():
        raise EdgekilnError(f"{model}: no such ONNX file")
    graph = apply_mode(lower_for_c(model, fuse=fuse, input_shapes=input_shapes), requant)
    plan = plan_memory(graph, reorder=reorder)
    out_dir = Path(out_dir)
    files = write_library(graph, plan, out_dir, prefix)
    return CExport(out_dir, prefix, graph, plan, files, estimate_flash(graph), fused=fuse, requant=requant)


def render_markdown(res: CExport, model: str) -> str:
    from edgekiln.report import md_table

    d = res.to_dict()
    lines = [f"# C export: {model}", "",
             f"- library: `{res.prefix}.h`, `{res.prefix}.c`, `ek_kernels.c/.h`, `CMakeLists.txt`, `main.c`",
             f"- arena (RAM, planned): **{d['arena_bytes']} B** (every tensor in its own buffer: "
             f"{res.plan.naive_bytes} B); I/O buffers {d['io_bytes']} B; total RAM {d['ram_bytes']} B",
             f"- flash: **{d['flash_bytes']} B** = weights {res.flash['weights']} + parameters {res.flash['params']}"
             f" + code (estimate, Cortex-M4 -Os) {res.flash['code_estimate']}",
             f"- MACs: {d['macs']}; schedule reordered for memory: {res.plan.reordered}; "
             f"conv->pool fusion: {res.fused}; requantization: {res.requant}",
             "- layout: NHWC (channels last), batch 1; input quantization: "
             f"scale {d['input']['scale']:.6g}, zero point {d['input']['zero_point']}", "",
             md_table(["step", "op", "kind", "output (NHWC)", "MACs", "const B", "buffer", "live B"],
                      [[o["step"], o["name"], o["kind"], "x".join(map(str, o["output_shape"])), o["macs"],
                        o["const_bytes"], f"{o['location'][0]}+{o['location'][1]}" if o["location"][0] == "arena"
                        else o["location"][0], res.plan.live_bytes[o["step"]]] for o in d["ops"]]),
             "", "![live memory](memory.png)"]
    return "\n".join(lines)


def write_export_report(res: CExport, model: Any) -> Path:
    """Write ``memory.png``, ``report.json`` and ``report.md`` next to the library; the run
    folder's model is ``model``, the QDQ ModelArtifact the library was generated from."""
    from edgekiln.models.run_folder import RunFolder

    plot_live_memory(res.plan, str(res.out_dir / "memory.png"))
    return RunFolder(res.out_dir).write(command="export", model=model, measurements=res.to_dict(),
                                        markdown=render_markdown(res, str(model.path)))
