"""``edgekiln measure-mcu``: instructions per inference (total and per layer), sizes, arena, stack and
output agreement of a generated C library on an emulated Cortex-M4 or M7.

The expected outputs come from the integer reference (:func:`edgekiln.codegen.reference.run_graph`)
of the QDQ model the library was exported from; the inputs from ``--data`` (the first ``limit``
samples) or, without it, seeded uniform int8 inputs.

For example ``measure_mcu("runs/mnist-c", cpu="cortex-m7", opt="Os")["layers"]`` lists each step's
instructions and instructions per MAC.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.codegen.mcu.runner import QemuRun, library_prefix, run_on_qemu
from edgekiln.codegen.mcu.toolchain import CPUS, cflags, require_tools
from edgekiln.errors import EdgekilnError

DEFAULT_LIMIT = 10
SYNTHETIC_SEED = 0


def find_library(path: Path) -> Path:
    """``path`` itself when it holds a C library, else its ``c/`` subfolder (a run folder with one)."""
    for cand in (path, path / "c"):
        if cand.is_dir() and any(cand.glob("*.h")) and (cand / "ek_kernels.c").is_file():
            return cand
    raise EdgekilnError(f"{path}: no C library here or in {path / 'c'} (write one with `edgekiln export MODEL --to c`)")


def _export_meta(lib_dir: Path) -> dict[str, Any]:
    from edgekiln.models.run_folder import RunFolder

    run = RunFolder(lib_dir)
    return run.report() if run.is_run_folder() else {}


def _model(lib_dir: Path, model: str | Path | None, meta: dict[str, Any]) -> tuple[Path, dict[str, Any] | None]:
    """The QDQ model the library was exported from and the input shapes it was exported with."""
    from edgekiln.models.run_folder import RunFolder

    shapes = None
    if model is not None:
        path = Path(model)
    elif meta:
        try:
            art = RunFolder(lib_dir).read()
        except EdgekilnError as exc:
            raise EdgekilnError(f"{exc}; pass --model") from None
        path, shapes = Path(art.path), dict(art.input_shapes)
    else:
        raise EdgekilnError(f"{lib_dir}: no report.json naming the QDQ model it was exported from; pass --model")
    if not path.is_file():
        raise EdgekilnError(f"{path}: no such QDQ model; pass --model")
    return path, shapes


def _inputs(graph: Any, data: str | Path | None, limit: int) -> tuple[np.ndarray, str]:
    """int8 inputs in the library's layout, ``(N, input_bytes)``, and where they came from."""
    from edgekiln.codegen.verify import quantize_inputs
    from edgekiln.execution.feeds import load_npz

    if data is None:
        rng = np.random.default_rng(SYNTHETIC_SEED)
        q = rng.integers(-128, 128, size=(limit, graph.input_bytes), dtype=np.int16).astype(np.int8)
        return q, f"uniform random int8 (seed {SYNTHETIC_SEED})"
    arrays = load_npz(data)
    names = [name for name, _ in graph.onnx_inputs]
    if len(names) == 1 and names[0] not in arrays and "x" in arrays:
        arrays = {names[0]: arrays["x"]}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise EdgekilnError(f"{data}: no array for input(s) {', '.join(missing)} (arrays: {', '.join(arrays)})")
    feeds = {n: arrays[n][:limit] for n in names}
    for name, shape in graph.onnx_inputs:
        if tuple(feeds[name].shape[1:]) != tuple(shape[1:]):
            raise EdgekilnError(f"{data}: {name} has shape {feeds[name].shape[1:]}, the model expects {tuple(shape[1:])}")
    q = quantize_inputs(graph, feeds if len(names) > 1 else feeds[names[0]])
    return q.reshape(len(q), -1), f"{data} (first {len(q)})"


def _layers(run: QemuRun, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per schedule step: its op, MACs and instructions (0 for a step with no code)."""
    counts = dict(zip(run.step_indices or [], run.per_step or [], strict=True))
    rows = []
    for op in ops:
        n = counts.get(op["step"], 0)
        rows.append({"step": op["step"], "name": op["name"], "kind": op["kind"], "macs": op["macs"],
                     "instructions": n, "instructions_per_mac": round(n / op["macs"], 3) if op["macs"] else None})
    return rows


def _tool_versions() -> dict[str, str]:
    def first_line(cmd: list[str]) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout.splitlines() or ["unknown"])[0].strip()
    return {"qemu": first_line(["qemu-system-arm", "--version"]), "gcc": first_line(["arm-none-eabi-gcc", "--version"])}


def measure_mcu(path: str | Path, *, cpu: str = "cortex-m4", opt: str = "O2", data: str | Path | None = None,
                model: str | Path | None = None, limit: int = DEFAULT_LIMIT,
                build_dir: str | Path | None = None) -> dict[str, Any]:
    """Measure the C library in ``path`` (or ``path/c``) on QEMU's board for ``cpu``; see the module doc.

    Returns the report: ``instructions_per_inference`` (input 0) and its spread over the inputs,
    ``layers`` (instructions and instructions/MAC per step, from a build that marks every step),
    ``sizes`` (the library as linked: text = code + constants, data, bss), ``arena_bytes``,
    ``stack_bytes``, ``outputs_match`` and the tools' versions. ``build_dir`` keeps the ELF files.
    """
    from edgekiln.codegen.emit import library_requant
    from edgekiln.codegen.fuse import lower_for_c
    from edgekiln.codegen.planner import plan_memory
    from edgekiln.codegen.reference import run_graph
    from edgekiln.codegen.requant_fixed import apply_mode

    require_tools()
    cflags(cpu, opt)  # an unknown --cpu or --opt fails before any work
    if limit < 1:
        raise EdgekilnError(f"--limit {limit}: need at least 1 input")
    lib_dir = find_library(Path(path))
    meta = _export_meta(lib_dir)
    model_path, shapes = _model(lib_dir, model, meta)
    # the expected outputs come from the reference of the export's requantization mode
    requant = meta.get("requant", library_requant(lib_dir))
    graph = apply_mode(lower_for_c(model_path, fuse=bool(meta.get("fused", True)), input_shapes=shapes), requant)
    q, source = _inputs(graph, data, limit)
    expected = np.stack([run_graph(graph, qi).reshape(-1) for qi in q])
    run = run_on_qemu(lib_dir, q, cpu=cpu, opt=opt, expected=expected, per_layer=True,
                      work_dir=Path(build_dir) if build_dir else None)
    ops = meta.get("ops") or [{"step": i, "name": op.name, "kind": op.kind, "macs": op.macs}
                              for i, op in enumerate(plan_memory(graph).schedule)]
    layers = _layers(run, ops)
    total = run.instructions[0]
    step_sum = sum(r["instructions"] for r in layers)
    identical = float((run.outputs == expected).mean())
    return {
        "library": str(lib_dir), "prefix": library_prefix(lib_dir), "model_path": str(model_path),
        "requant": requant,
        "cpu": cpu, "board": CPUS[cpu].machine, "opt": opt, "cflags": run.cflags, "tools": _tool_versions(),
        "inputs": {"source": source, "n": len(q)},
        "macs": int(graph.macs), "instructions_per_inference": total,
        "instructions_per_mac": round(total / graph.macs, 3) if graph.macs else None,
        "instructions": {"min": min(run.instructions), "max": max(run.instructions),
                         "mean": round(float(np.mean(run.instructions)), 1), "per_input": run.instructions},
        "layers": layers,
        "layers_total": step_sum, "harness_overhead": step_sum + (run.step_return or 0) - total,
        "sizes": run.sizes, "objects": run.objects, "elf_sizes": run.elf_sizes,
        "arena_bytes": run.arena_bytes, "stack_bytes": run.stack_bytes,
        "ram_bytes": run.sizes["bss"] + run.sizes["data"] + run.stack_bytes,
        "outputs_match": bool(run.mismatched == 0 and identical == 1.0),
        "mismatched_inferences": run.mismatched, "identical_fraction": identical,
        "method": (f"arm-none-eabi-gcc -{opt} {' '.join(CPUS[cpu].flags)}; qemu-system-arm -M {CPUS[cpu].machine} "
                   "with edgekiln's instruction-counting TCG plugin (executed guest instructions, not cycles); "
                   "per layer from a second build that calls a marker after every step"),
    }


def render_markdown(rep: dict[str, Any]) -> str:
    from edgekiln.report import md_table

    s = rep["sizes"]
    lines = [f"# measure-mcu: {rep['library']} on {rep['cpu']} ({rep['board']}, -{rep['opt']})", "",
             f"- instructions per inference: **{rep['instructions_per_inference']:,}** "
             f"({rep['instructions_per_mac']} per MAC, {rep['macs']:,} MACs); over {rep['inputs']['n']} inputs "
             f"{rep['instructions']['min']:,} .. {rep['instructions']['max']:,}",
             f"- outputs match the integer reference ({rep['requant']}): **{rep['outputs_match']}** "
             f"({rep['identical_fraction']:.2%} of int8 outputs identical; inputs: {rep['inputs']['source']})",
             f"- library as linked: text {s['text']:,} B (code + constants), data {s['data']:,} B, bss {s['bss']:,} B; "
             f"arena {rep['arena_bytes']:,} B; stack high-water of one inference {rep['stack_bytes']:,} B",
             f"- method: {rep['method']}; {rep['tools']['qemu']}; {rep['tools']['gcc']}", "",
             md_table(["step", "op", "kind", "MACs", "instructions", "per MAC", "share"],
                      [[r["step"], r["name"], r["kind"], f"{r['macs']:,}", f"{r['instructions']:,}",
                        r["instructions_per_mac"] if r["instructions_per_mac"] is not None else "-",
                        f"{r['instructions'] / max(rep['layers_total'], 1):.1%}"] for r in rep["layers"]]),
             "", f"Per-layer counts come from a build with a marker call after every step: they sum to "
             f"{rep['layers_total']:,}, {rep['harness_overhead']} instructions of marker calls more than the total.",
             "", md_table(["object", "code B", "constants B", "data B", "bss B"],
                          [[k, v["code"], v["rodata"], v["data"], v["bss"]] for k, v in rep["objects"].items()])]
    return "\n".join(lines) + "\n"
