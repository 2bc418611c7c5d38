"""C99 emitter: an :class:`IntGraph` plus its :class:`MemoryPlan` -> a self-contained C library.

Files: ``NAME.h`` (API + I/O shape and quantization defines), ``NAME.c`` (weights as
``static const`` arrays, one static arena, straight-line kernel calls), ``ek_kernels.c/.h``
(copied from package data), ``CMakeLists.txt`` and an example/harness ``main.c``. The output
depends only on the graph: the same model gives byte-identical files (no dates, no paths).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np

from edgekiln.codegen.fast_kernels import FastKernel, choose, fast_arrays, scratch
from edgekiln.codegen.ir import IntGraph, Op
from edgekiln.codegen.planner import MemoryPlan
from edgekiln.codegen.requant_fixed import FIXED_ATTR
from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_write_text

#: op kind -> the C parameter struct its call takes.
PARAM_STRUCT = {"conv2d": "ek_conv_params", "fully_connected": "ek_fc_params", "add": "ek_add_params",
                "requantize": "ek_requant_params", "max_pool": "ek_pool_params", "avg_pool": "ek_pool_params",
                "concat": "ek_concat_params", "softmax": "ek_softmax_params",
                "transpose_nchw": "ek_transpose_params", "lut": "ek_lut_params",
                "lut_channel": "ek_lut_channel_params", "gather": "ek_gather_params", "mul": "ek_mul_params",
                "pad": "ek_pad_params", "resize": "ek_resize_params",
                "mean_lut": "ek_mean_lut_params", "add_lut": "ek_add_lut_params"}
#: C parameter struct -> its field names in declaration order (as in ek_kernels.h).
STRUCT_FIELDS = {
    "ek_conv_params": ("in_h in_w in_c out_h out_w out_c k_h k_w stride_h stride_w dil_h dil_w pad_top pad_left "
                       "groups input_zp output_zp act_min act_max"),
    "ek_fc_params": "in_features out_features input_zp output_zp act_min act_max",
    "ek_add_params": ("size a_zp b_zp output_zp left_shift a_mult a_shift b_mult b_shift out_mult out_shift "
                      "act_min act_max"),
    "ek_requant_params": "size input_zp output_zp mult shift act_min act_max",
    "ek_pool_params": ("in_h in_w channels out_h out_w k_h k_w stride_h stride_w pad_top pad_left "
                       "count_include_pad input_zp output_zp mult shift"),
    "ek_concat_params": "outer out_c n_inputs output_zp",
    "ek_softmax_params": "rows depth output_zp inv_mult div_shift",
    "ek_transpose_params": "height width channels",
    "ek_lut_params": "size",
    "ek_lut_channel_params": "size channels",
    "ek_gather_params": "pixels in_c out_c",
    "ek_mul_params": "size b_channels pre_shift output_zp mult shift act_min act_max",
    "ek_pad_params": "in_h in_w channels out_h out_w pad_top pad_left stride_h stride_w value",
    "ek_resize_params": "in_h in_w channels out_h out_w zero_point",
    "ek_mean_lut_params": "pixels channels output_zp mult shift",
    "ek_add_lut_params": "size b_channels output_zp mult shift act_min act_max",
}
_ARRAY_ORDER = {"conv2d": ("weights", "bias", "mult", "shift"), "conv_pool": ("weights", "bias", "mult", "shift"),
                "fully_connected": ("weights", "bias", "mult", "shift"),
                "concat": ("channels", "zps", "mult", "shift"), "softmax": ("lut",),
                "lut": ("table",), "lut_channel": ("table",), "gather": ("index",),
                "mul": ("a_table", "b_table"), "resize": ("y0", "y1", "wy", "x0", "x1", "wx"),
                "mean_lut": ("table",), "add_lut": ("a_table", "b_table"), "constant": ("values",)}
_CTYPE = {np.dtype(np.int8): "int8_t", np.dtype(np.int32): "int32_t"}

KERNEL_FILES = ("ek_kernels.h", "ek_kernels.c", "ek_kernels_dsp.h")


def check_prefix(prefix: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", prefix):
        raise EdgekilnError(f"--prefix {prefix!r} must be a C identifier (letters, digits, _; not starting "
                            "with a digit)")
    return prefix


def kernel_source(name: str) -> str:
    """The text of a packaged C kernel file (``ek_kernels.c`` or ``ek_kernels.h``)."""
    return resources.files("edgekiln.codegen").joinpath("c", name).read_text(encoding="utf-8")


#: the line of ek_kernels.h that selects the requantization mode (see requant_fixed.py).
_MODE_LINE = "#define EK_REQUANT_FIXED_POINT 0"


def set_fixed_point(header: str) -> str:
    """ek_kernels.h's text with the fixed-point requantization mode selected."""
    if header.count(_MODE_LINE) != 1:
        raise EdgekilnError("ek_kernels.h has no single EK_REQUANT_FIXED_POINT line to set")
    return header.replace(_MODE_LINE, "#define EK_REQUANT_FIXED_POINT 1")


def library_requant(lib_dir: str | Path) -> str:
    """The requantization mode a written library was generated in, from its ek_kernels.h."""
    header = Path(lib_dir) / "ek_kernels.h"
    text = header.read_text(encoding="utf-8") if header.is_file() else ""
    return "fixed-point" if "#define EK_REQUANT_FIXED_POINT 1" in text else "float32-exact"


def _array(ctype: str, name: str, values: np.ndarray, attr: str = "") -> str:
    suffix = "u" if ctype == "uint32_t" else ""
    flat = [f"{int(v)}{suffix}" for v in np.asarray(values).reshape(-1)]
    rows = [", ".join(flat[i:i + 16]) for i in range(0, len(flat), 16)]
    body = ",\n    ".join(rows)
    return f"static const {ctype} {name}[{len(flat)}]{attr} = {{\n    {body}\n}};\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", name)


def _ptr(plan: MemoryPlan, tensor: str) -> str:
    where, offset = plan.location[tensor]
    if where == "output":
        return f"output + {offset}" if offset else "output"
    if where == "input":
        return f"input + {offset}" if offset else "input"
    return f"arena + {offset}"


def _fast(op: Op, plan: MemoryPlan) -> FastKernel | None:
    return choose(op) if plan.fast_kernels else None


def _op_decls(i: int, op: Op, plan: MemoryPlan) -> str:
    fk = _fast(op, plan)
    if fk is not None:
        return _fast_decls(i, op, fk)
    out = [f"/* step {i}: {op.kind} {_safe(op.name)} */\n"]
    for key in _ARRAY_ORDER.get(op.kind, ()):
        arr = op.arrays[key]
        out.append(_array(_CTYPE[arr.dtype], f"op{i}_{key}", arr))
    if op.kind == "conv_pool":
        out.append(_conv_pool_params(i, op))
    if op.kind in PARAM_STRUCT:
        struct = PARAM_STRUCT[op.kind]
        # NOTE: max_pool shares ek_pool_params with avg_pool and leaves the averaging fields 0.
        attrs = {**dict.fromkeys(STRUCT_FIELDS[struct].split(), 0), **op.attrs} if op.kind == "max_pool" else op.attrs
        fields = ", ".join(f".{f} = {int(attrs[f])}" for f in STRUCT_FIELDS[struct].split())
        out.append(f"static const {struct} op{i}_params = {{ {fields} }};\n")
    return "".join(out)


def _conv_pool_params(i: int, op: Op) -> str:
    from edgekiln.codegen.fuse import split_attrs

    conv, pool = split_attrs(op.attrs)
    cf = ", ".join(f".{f} = {int(conv[f])}" for f in STRUCT_FIELDS["ek_conv_params"].split())
    pf = ", ".join(f".{f} = {int(pool[f])}" for f in STRUCT_FIELDS["ek_pool_params"].split())
    return (f"static const ek_conv_pool_params op{i}_params = {{\n    .conv = {{ {cf} }},\n"
            f"    .pool = {{ {pf} }},\n    .is_avg = {int(op.attrs['pool_is_avg'])}, .rows = {int(op.attrs['rows'])} }};\n")


#: fast kernel -> (function in ek_kernels_dsp.h, its literal arguments after the arrays, by attrs name).
_FAST_ARGS = {
    "conv": ("ek_conv_s8_fast", "in_h in_w in_c out_h out_w out_c k_h k_w stride_h stride_w pad_top pad_left kp "
                                "input_zp output_zp act_min act_max"),
    "conv_maxpool2": ("ek_conv_maxpool2_s8_fast", "in_h in_w in_c pool_out_h pool_out_w out_c k_h k_w stride_h "
                                                  "stride_w pad_top pad_left kp input_zp output_zp act_min act_max"),
    "pointwise": ("ek_gemm_s8_fast", "pixels in_c out_c output_zp act_min act_max"),
    "fc": ("ek_fc_s8_fast", "in_features out_features output_zp act_min act_max"),
    "depthwise": ("ek_depthwise_s8_fast", "in_h in_w in_c out_h out_w k_h k_w stride_h stride_w pad_top pad_left "
                                          "taps_even output_zp act_min act_max"),
}


def _fast_decls(i: int, op: Op, fk: FastKernel) -> str:
    """The layer's arrays in the fast kernel's layout and a ``static void op{i}_run`` calling the kernel
    with every shape, stride and zero point as a literal (the compiler specialises the inlined kernel)."""
    arrays = fast_arrays(op, fk)
    scratch = f" (im2col scratch {fk.scratch_bytes} B)" if fk.scratch_bytes else ""
    out = [f"/* step {i}: {op.kind} {_safe(op.name)}: fast kernel {fk.name}{scratch} */\n",
           _array("int8_t", f"op{i}_weights", arrays["weights"], " EK_ALIGN4"),
           _array("int32_t", f"op{i}_bias", arrays["bias"])]
    if "rq" in arrays:
        out.append(_array("uint32_t", f"op{i}_rq", arrays["rq"]))
        rq = f"op{i}_rq, 0, 0"
    else:
        out += [_array("int32_t", f"op{i}_mult", arrays["mult"]), _array("int32_t", f"op{i}_shift", arrays["shift"])]
        rq = f"0, op{i}_mult, op{i}_shift"
    taps = op.attrs.get("k_h", 0) * op.attrs.get("k_w", 0)
    a = dict(op.attrs, kp=fk.kp, pixels=op.attrs.get("out_h", 1) * op.attrs.get("out_w", 1), taps_even=taps + taps % 2)
    fn, names = _FAST_ARGS[fk.name]
    lits = ", ".join(f"{int(a[n])}" for n in names.split())
    pre = f"op{i}_weights, op{i}_bias, {rq}"
    if fk.name == "depthwise":
        if "zp_row" in arrays:
            out.append(_array("int8_t", f"op{i}_zp_row", arrays["zp_row"], " EK_ALIGN4"))
        pre += f", {f'op{i}_zp_row' if 'zp_row' in arrays else 'in'}"
    col = ", uint32_t *col" if fk.scratch_bytes else ""
    out.append(f"EK_LAYER void op{i}_run(const int8_t *in, int8_t *out{col}) {{\n"
               f"    /* {names} */\n"
               f"    {fn}(in, {pre}, out{', col' if col else ''},\n        {lits});\n}}\n")
    return "".join(out)


def _op_call(i: int, op: Op, plan: MemoryPlan) -> str:
    ins = [_ptr(plan, n) for n in op.inputs]
    y = _ptr(plan, op.output)
    p = f"&op{i}_params"
    fk = _fast(op, plan)
    if fk is not None:
        col = f", (uint32_t *)({_ptr(plan, scratch(op)[0])})" if fk.scratch_bytes else ""
        return f"    op{i}_run({ins[0]}, {y}{col});\n"
    if op.kind == "reshape":
        src, dst = plan.location[op.inputs[0]], plan.location[op.output]
        if src == dst:
            return f"    /* step {i}: {_safe(op.name)}: reshape is a view (no code) */\n"
        return (f"    {{ int32_t k; for (k = 0; k < {op.attrs['size']}; ++k) {{ ({y})[k] = ({ins[0]})[k]; }} }}"
                f" /* step {i}: reshape copy */\n")
    if op.kind == "constant":
        return (f"    {{ int32_t k; for (k = 0; k < {op.attrs['size']}; ++k) {{ ({y})[k] = op{i}_values[k]; }} }}"
                f" /* step {i}: constant */\n")
    if op.kind in ("conv2d", "fully_connected"):
        fn = "ek_conv2d" if op.kind == "conv2d" else "ek_fully_connected"
        return f"    {fn}({p}, {ins[0]}, op{i}_weights, op{i}_bias, op{i}_mult, op{i}_shift, {y});\n"
    if op.kind == "conv_pool":
        return (f"    ek_conv_pool({p}, {ins[0]}, op{i}_weights, op{i}_bias, op{i}_mult, op{i}_shift, "
                f"{_ptr(plan, op.scratch)}, {y});\n")
    if op.kind == "add":
        return f"    ek_add({p}, {ins[0]}, {ins[1]}, {y});\n"
    if op.kind == "concat":
        return (f"    {{\n        const int8_t *const ins[{len(ins)}] = {{ {', '.join(ins)} }};\n"
                f"        ek_concat({p}, ins, op{i}_channels, op{i}_zps, op{i}_mult, op{i}_shift, {y});\n    }}\n")
    if op.kind == "softmax":
        return f"    ek_softmax({p}, {ins[0]}, op{i}_lut, {y});\n"
    if op.kind in ("lut", "lut_channel", "mean_lut"):
        return f"    ek_{op.kind}({p}, {ins[0]}, op{i}_table, {y});\n"
    if op.kind == "resize":
        tables = ", ".join(f"op{i}_{k}" for k in ("y0", "y1", "wy", "x0", "x1", "wx"))
        return f"    ek_resize({p}, {ins[0]}, {tables}, {y});\n"
    if op.kind == "add_lut":
        return f"    ek_add_lut({p}, {ins[0]}, {ins[1]}, op{i}_a_table, op{i}_b_table, {y});\n"
    if op.kind == "mul":
        return f"    ek_mul({p}, {ins[0]}, {ins[1]}, op{i}_a_table, op{i}_b_table, {y});\n"
    if op.kind == "gather":
        return f"    ek_gather({p}, {ins[0]}, op{i}_index, {y});\n"
    fn = {"requantize": "ek_requantize", "max_pool": "ek_max_pool", "avg_pool": "ek_avg_pool",
          "transpose_nchw": "ek_transpose_nchw", "pad": "ek_pad"}[op.kind]
    return f"    {fn}({p}, {ins[0]}, {y});\n"


def render_header(graph: IntGraph, plan: MemoryPlan, prefix: str) -> str:
    up = prefix.upper()
    ti, to = graph.tensors[graph.input], graph.tensors[graph.output]
    lines = [f"/* {prefix}.h: generated by edgekiln (integer-only int8 inference). Do not edit. */",
             f"#ifndef {up}_H", f"#define {up}_H", "", "#include <stdint.h>", "",
             "/* Tensors are NHWC (channels last), batch 1. Quantize the input as",
             " * q = clamp(round_half_even(x / SCALE) + ZERO_POINT, -128, 127). */"]
    several = bool(graph.extra_outputs)
    tags = [("INPUT", ti)] + ([] if several else [("OUTPUT", to)])
    if graph.extra_inputs:
        lines += ["/* Several inputs, packed one after the other in the input buffer: INPUTk_OFFSET;",
                  " * INPUT_SIZE is the whole buffer, INPUT_SCALE/ZERO_POINT those of input 0. */",
                  f"#define {up}_INPUT_COUNT {len(graph.inputs)}"]
        tags += [(f"INPUT{k}", graph.tensors[i]) for k, i in enumerate(graph.inputs)]
    if several:
        lines += ["/* Several outputs, packed one after the other in the output buffer: OUTPUTk_OFFSET. */",
                  f"#define {up}_OUTPUT_COUNT {len(graph.outputs)}", f"#define {up}_OUTPUT_SIZE {graph.output_bytes}"]
        tags += [(f"OUTPUT{k}", graph.tensors[o]) for k, o in enumerate(graph.outputs)]
    for tag, t in tags:
        if tag.startswith("OUTPUT") and several:
            lines.append(f"#define {up}_{tag}_OFFSET {graph.output_offsets[int(tag[6:])]}")
        if tag.startswith("INPUT") and tag != "INPUT":
            lines.append(f"#define {up}_{tag}_OFFSET {graph.input_offsets[int(tag[5:])]}")
        size = graph.input_bytes if tag == "INPUT" else t.size
        lines.append(f"#define {up}_{tag}_SIZE {size}")
        lines.append(f"#define {up}_{tag}_RANK {len(t.shape)}")
        lines += [f"#define {up}_{tag}_DIM{k} {d}" for k, d in enumerate(t.shape)]
        lines.append(f"#define {up}_{tag}_SCALE {t.scale!r}f")
        lines.append(f"#define {up}_{tag}_ZERO_POINT ({t.zero_point})")
    lines += [f"#define {up}_ARENA_BYTES {plan.arena_bytes}", "",
              "/* Run one inference. input: INPUT_SIZE int8 values; output: OUTPUT_SIZE int8 values.",
              " * Returns 0. Not reentrant (one static arena). */",
              f"int {prefix}_invoke(const int8_t *input, int8_t *output);", "", f"#endif /* {up}_H */", ""]
    return "\n".join(lines)


def render_source(graph: IntGraph, plan: MemoryPlan, prefix: str) -> str:
    arena = max(plan.arena_bytes, 4)
    parts = [f"/* {prefix}.c: generated by edgekiln. Do not edit.\n"
             f" * {len(plan.schedule)} steps, arena {plan.arena_bytes} bytes, weights {graph.weight_bytes} bytes. */\n",
             f'#include "{prefix}.h"\n#include "ek_kernels.h"\n'
             + ('#include "ek_kernels_dsp.h"\n' if any(_fast(op, plan) for op in plan.schedule) else "") + "\n",
             "/* One static arena for all intermediate tensors; the union keeps it 4-byte aligned. */\n",
             f"static union {{\n    int32_t align;\n    int8_t bytes[{arena}];\n}} {prefix}_arena;\n\n"]
    parts += [_op_decls(i, op, plan) + "\n" for i, op in enumerate(plan.schedule) if op.kind != "reshape"]
    parts.append(f"int {prefix}_invoke(const int8_t *input, int8_t *output) {{\n")
    parts.append(f"    int8_t *const arena = {prefix}_arena.bytes;\n")
    uses_arena = any(w == "arena" for w, _ in plan.location.values())
    if not uses_arena:
        parts.append("    (void)arena;\n")
    parts += [_op_call(i, op, plan) for i, op in enumerate(plan.schedule)]
    parts.append("    return 0;\n}\n")
    return "".join(parts)


def render_cmake(prefix: str) -> str:
    return f"""cmake_minimum_required(VERSION 3.13)
project({prefix} C)

# The generated library: C99, no malloc, no OS, no floating point in the int8 path.
add_library({prefix} STATIC {prefix}.c ek_kernels.c)
target_include_directories({prefix} PUBLIC ${{CMAKE_CURRENT_SOURCE_DIR}})
set_target_properties({prefix} PROPERTIES C_STANDARD 99 C_STANDARD_REQUIRED ON C_EXTENSIONS OFF)

# Host example / test harness (uses stdio); not built when cross-compiling for a device.
if(NOT CMAKE_CROSSCOMPILING)
  add_executable({prefix}_example main.c)
  target_link_libraries({prefix}_example PRIVATE {prefix})
endif()
"""


def render_main(prefix: str) -> str:
    up = prefix.upper()
    return f"""/* Example and host test harness for {prefix} (generated by edgekiln).
 *   {prefix}_example                  run once on an all-zero-point input and print the output
 *   {prefix}_example IN.bin OUT.bin   read N * {up}_INPUT_SIZE int8 bytes, write N outputs */
#include <stdio.h>
#include "{prefix}.h"

static int8_t input[{up}_INPUT_SIZE];
static int8_t output[{up}_OUTPUT_SIZE];

int main(int argc, char **argv) {{
    int i;
    if (argc == 3) {{
        FILE *fin = fopen(argv[1], "rb");
        FILE *fout = fopen(argv[2], "wb");
        long n = 0;
        if (fin == NULL || fout == NULL) {{
            fprintf(stderr, "cannot open %s or %s\\n", argv[1], argv[2]);
            return 2;
        }}
        while (fread(input, 1, sizeof input, fin) == sizeof input) {{
            {prefix}_invoke(input, output);
            if (fwrite(output, 1, sizeof output, fout) != sizeof output) {{
                return 3;
            }}
            n++;
        }}
        fclose(fin);
        fclose(fout);
        printf("ran %ld inferences\\n", n);
        return 0;
    }}
    for (i = 0; i < {up}_INPUT_SIZE; ++i) {{
        input[i] = (int8_t){up}_INPUT_ZERO_POINT;
    }}
    {prefix}_invoke(input, output);
    for (i = 0; i < {up}_OUTPUT_SIZE; ++i) {{
        printf("%d%s", output[i], i + 1 < {up}_OUTPUT_SIZE ? " " : "\\n");
    }}
    return 0;
}}
"""


def render_library(graph: IntGraph, plan: MemoryPlan, prefix: str) -> dict[str, str]:
    """All files of the C library as ``{file name: text}`` (deterministic)."""
    check_prefix(prefix)
    if any(plan.location[o][0] != "output" for o in graph.outputs):
        raise EdgekilnError("the model's output is its input (no computation): nothing to export")
    files = {f"{prefix}.h": render_header(graph, plan, prefix), f"{prefix}.c": render_source(graph, plan, prefix)}
    files.update({name: kernel_source(name) for name in KERNEL_FILES})
    if any(op.attrs.get(FIXED_ATTR) for op in graph.ops):  # the multipliers are TFLM's: the kernels must know
        files["ek_kernels.h"] = set_fixed_point(files["ek_kernels.h"])
    files["CMakeLists.txt"] = render_cmake(prefix)
    files["main.c"] = render_main(prefix)
    return files


def write_library(graph: IntGraph, plan: MemoryPlan, out_dir: str | Path, prefix: str) -> list[Path]:
    """Write :func:`render_library`'s files into ``out_dir`` atomically; return their paths."""
    out_dir = Path(out_dir)
    return [atomic_write_text(out_dir / name, text) for name, text in render_library(graph, plan, prefix).items()]
