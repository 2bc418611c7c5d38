"""Microcontroller targets (profile ``kind: mcu``): a candidate is the C library ``export --to c`` writes.

On a microcontroller edgekiln deploys its own integer C library, so ``optimize`` searches only
pipelines whose result the C backend compiles (int8 QDQ; search/space.py) and judges every
candidate by that library: :func:`c_backend_check` says why a model cannot be compiled (a float
model is then "not deployable", never selected); :func:`measure_candidate` writes the library and,
where ``arm-none-eabi-gcc`` and ``qemu-system-arm`` are installed, runs it on the target's emulated
CPU (QEMU, the counting plugin of ``measure-mcu``): instructions per inference, linked sizes, arena
and stack. The latency on the device is then ``instructions x cycles per instruction / clock``
(the profile's stated CPI), which replaces the roofline estimate in the fit and the selection.
:func:`deploy_c_library` gives the selected model's run folder its library (``c/``), the
``verify-c`` result on the evaluation data and the full ``measure-mcu`` report (``measure-mcu/``).

>>> from edgekiln.targets.profiles import load_profile
>>> emulated_cpu(load_profile("cortex-m7")), emulated_cpu(load_profile("raspberry-pi-4"))
('cortex-m7', None)
>>> round(latency_ms(480_000, load_profile("cortex-m7"), cpi=1.0), 3)   # 480k cycles at 480 MHz
1.0
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

#: the optimization level the candidates are compiled and measured with (the issue's measurements: -O2).
OPT = "O2"
#: evaluation inputs each candidate's and the selected library are run on under QEMU (the same ones, so the
#: counts agree; every output is checked against the integer reference).
DEPLOY_MEASURE_INPUTS = 10
#: inferences of the selected library run under valgrind on the host by verify-c.
VALGRIND_INPUTS = 2
#: where the C library and its measurement go in the optimize run folder.
LIBRARY_DIR, MEASURE_DIR = "c", "measure-mcu"
#: a profile without a stated ``cycles_per_instruction``: one cycle per instruction (single issue, no stalls).
DEFAULT_CPI = 1.0


def emulated_cpu(profile: Any) -> str | None:
    """The QEMU CPU of ``measure-mcu`` that stands for ``profile`` (its ``cpu`` field, else its
    name: ``cortex-m4``, ``cortex-m7``), or None when QEMU has none for it."""
    from edgekiln.codegen.mcu import CPUS

    if getattr(profile, "kind", None) != "mcu":
        return None
    cpu = getattr(profile, "cpu", None) or getattr(profile, "name", "")
    return cpu if cpu in CPUS else None


def cycles_per_instruction(profile: Any) -> tuple[float, str]:
    """The CPI that turns instruction counts into cycles, and where it comes from."""
    cpi = getattr(profile, "cycles_per_instruction", None)
    if cpi:
        return float(cpi), f"the {profile.name} profile's cycles_per_instruction"
    return DEFAULT_CPI, f"assumed {DEFAULT_CPI:g} (the {profile.name} profile states no cycles_per_instruction)"


def latency_ms(instructions: int, profile: Any, cpi: float | None = None) -> float:
    """Milliseconds for ``instructions`` at the profile's clock and CPI."""
    cpi = cycles_per_instruction(profile)[0] if cpi is None else cpi
    return instructions * cpi / float(profile.clock_hz) * 1000.0


def c_backend_check(model_path: Path, kind: str, input_shapes: dict[str, tuple[int, ...]] | None = None
                    ) -> tuple[Any, str | None]:
    """The C backend's footprint of ``model_path`` (:class:`edgekiln.codegen.export.McuFootprint`)
    and None, or None and why the C backend cannot compile it (one line)."""
    from edgekiln.codegen.export import mcu_footprint
    from edgekiln.models.run_folder import precision_of

    if kind != "onnx-qdq":
        return None, (f"not deployable: a {precision_of(kind)} model ({kind}); on a microcontroller edgekiln's C "
                      "library runs int8 QDQ models only")
    try:
        return mcu_footprint(Path(model_path), input_shapes=input_shapes), None
    except EdgekilnError as exc:
        return None, f"not deployable: the C backend cannot compile it ({str(exc)[:240]})"


def first_inputs(graph: Any, eval_path: str | Path | None, n: int) -> tuple[np.ndarray, str]:
    """Up to ``n`` evaluation samples as int8 in the library's layout, ``(N, input_bytes)``, and
    where they came from (zeros when the data cannot feed the model)."""
    from edgekiln.codegen.verify import quantize_inputs
    from edgekiln.execution.feeds import load_npz

    names = [name for name, _ in graph.onnx_inputs]
    try:
        arrays = load_npz(eval_path) if eval_path else {}
    except EdgekilnError:
        arrays = {}
    if len(names) == 1 and names[0] not in arrays and "x" in arrays:
        arrays = {names[0]: arrays["x"]}
    if not all(name in arrays for name in names):
        return np.zeros((1, graph.input_bytes), np.int8), "zeros (the evaluation data has no array per input)"
    feeds = {k: arrays[k][:n] for k in names}
    q = quantize_inputs(graph, feeds if len(names) > 1 else feeds[names[0]])
    return q.reshape(len(q), -1), f"{Path(str(eval_path)).name} (first {len(q)})"


def measure_candidate(model_path: Path, profile: Any, work_dir: Path, *, eval_path: str | Path | None,
                      input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Write ``model_path``'s C library into ``work_dir/c`` and run it under QEMU on the first
    evaluation inputs (as many as :func:`deploy_c_library` measures, so the counts are the same),
    checked against the integer reference. Returns the candidate's ``mcu`` record:
    ``instructions`` (of input 0, as measure-mcu reports), ``latency_ms`` (at the profile's clock
    and CPI), ``text``/``data``/``bss``, ``code_bytes``/``const_bytes`` (libgcc helpers included),
    ``arena_bytes``, ``stack_bytes``, ``io_bytes``, ``outputs_match``; or ``skipped`` (no
    emulated CPU, tools missing) or ``error`` (the library could not be written or run) with why."""
    from edgekiln.codegen.export import export_c
    from edgekiln.codegen.mcu import run_on_qemu
    from edgekiln.codegen.reference import run_graph

    cpu, why = _emulator(profile)
    if cpu is None:
        return {"skipped": why}
    lib = Path(work_dir) / LIBRARY_DIR
    shutil.rmtree(lib, ignore_errors=True)
    try:
        res = export_c(model_path, lib, prefix="model", input_shapes=input_shapes)
        q, source = first_inputs(res.graph, eval_path, DEPLOY_MEASURE_INPUTS)
        expected = np.stack([run_graph(res.graph, qi).reshape(-1) for qi in q])
        run = run_on_qemu(lib, q, cpu=cpu, opt=OPT, expected=expected)
    except EdgekilnError as exc:
        return {"cpu": cpu, "opt": OPT, "error": str(exc)[:300]}
    cpi, cpi_source = cycles_per_instruction(profile)
    instructions = int(run.instructions[0])
    objects = run.objects.values()   # the library's objects and the libgcc helpers linked in
    return {
        "cpu": cpu, "board": run.board, "opt": OPT, "instructions": instructions,
        "instructions_per_mac": round(instructions / res.graph.macs, 3) if res.graph.macs else None,
        "instructions_range": [int(min(run.instructions)), int(max(run.instructions))],
        "cycles_per_instruction": cpi, "cpi_source": cpi_source, "clock_hz": float(profile.clock_hz),
        "latency_ms": latency_ms(instructions, profile, cpi),
        **run.sizes, "code_bytes": int(sum(o["code"] for o in objects)),
        "const_bytes": int(sum(o["rodata"] + o["data"] for o in objects)),
        "arena_bytes": int(run.arena_bytes), "stack_bytes": int(run.stack_bytes),
        "io_bytes": int(res.graph.input_bytes + res.graph.output_bytes),
        "outputs_match": bool(run.mismatched == 0 and np.array_equal(run.outputs, expected)), "inputs": source,
    }


def _emulator(profile: Any) -> tuple[str | None, str]:
    """The emulated CPU that runs ``profile``'s C library (``cortex-m4``/``cortex-m7``), or None and why not."""
    from edgekiln.codegen.mcu import CPUS, tools_missing

    cpu = emulated_cpu(profile)
    if cpu is None:
        return None, f"no emulated CPU for profile {profile.name} (measure-mcu has {', '.join(CPUS)})"
    missing = tools_missing()
    return (None, missing) if missing else (cpu, "")


def measured_violation(record: dict[str, Any]) -> str | None:
    """Why a measured library must not be selected (it faulted, or computed other outputs than the
    integer reference), or None."""
    if "error" in record:
        return f"C library on the emulated {record.get('cpu')}: {record['error']}"
    if record.get("outputs_match") is False:
        return f"C library on the emulated {record.get('cpu')}: outputs differ from the integer reference"
    return None


def deploy_c_library(out: Path, model: Any, profile: Any, eval_path: str | Path | None) -> dict[str, Any]:
    """Give the optimize run folder ``out`` the selected model's C library and its evidence.

    ``model`` is the selected :class:`~edgekiln.models.artifact.ModelArtifact` (``out/model.onnx``).
    Writes ``out/c/`` (what ``edgekiln export out --to c`` writes, with its report), runs
    ``verify-c`` on ``eval_path`` and, with the tools installed, ``measure-mcu`` for the target's
    CPU (the run folder ``out/measure-mcu/``). Returns the run folder's ``deployment`` record; a step that
    fails is recorded with its error, not raised (the selection stands and is reported).
    """
    import dataclasses

    from edgekiln.codegen.export import export_c, write_export_report

    lib = out / LIBRARY_DIR
    shutil.rmtree(lib, ignore_errors=True)
    try:
        res = export_c(model.path, lib, prefix="model", input_shapes=model.input_shapes)
        # NOTE: the library's folder names the model only; the data stays in the optimize folder.
        write_export_report(res, dataclasses.replace(model, data={}))
    except EdgekilnError as exc:
        return {"library": None, "error": f"export --to c failed: {exc}"}
    d = res.to_dict()
    record: dict[str, Any] = {
        "library": LIBRARY_DIR, "prefix": res.prefix, "requant": d.get("requant", "float32-exact"),
        "arena_bytes": d["arena_bytes"], "ram_bytes": d["ram_bytes"], "flash_bytes_estimate": d["flash_bytes"],
        "macs": d["macs"], "verify_c": _verify(lib, eval_path),
        "measured": _measure(lib, profile, eval_path, out / MEASURE_DIR),
    }
    return record


def _verify(lib: Path, eval_path: str | Path | None) -> dict[str, Any]:
    from edgekiln.codegen.verify import verify_c

    if not eval_path:
        return {"skipped": "no evaluation data"}
    if shutil.which("gcc") is None:
        return {"skipped": "no host C compiler (gcc) to build the library with"}
    try:
        v = verify_c(lib, eval_path, valgrind_inputs=VALGRIND_INPUTS).to_dict()
    except EdgekilnError as exc:
        return {"error": str(exc)[:300]}
    keep = ("passed", "n_inputs", "top1_agree", "identical_fraction", "max_abs_diff", "exact_vs_numpy_reference",
            "onnxruntime_mode", "valgrind", "thresholds")
    return {"data": Path(str(eval_path)).name, **{k: v[k] for k in keep}}


def _measure(lib: Path, profile: Any, eval_path: str | Path | None, folder: Path) -> dict[str, Any]:
    from edgekiln.codegen.mcu.measure import measure_mcu, render_markdown
    from edgekiln.models.run_folder import RunFolder

    cpu, why = _emulator(profile)
    if cpu is None:
        return {"skipped": why}
    try:
        rep = measure_mcu(lib, cpu=cpu, opt=OPT, data=eval_path, limit=DEPLOY_MEASURE_INPUTS)
    except EdgekilnError as exc:
        return {"cpu": cpu, "opt": OPT, "error": str(exc)[:300]}
    shutil.rmtree(folder, ignore_errors=True)
    RunFolder(folder).write(command="measure-mcu", model=None, measurements=rep,
                                       markdown=render_markdown(rep))
    cpi, cpi_source = cycles_per_instruction(profile)
    n = rep["instructions_per_inference"]
    return {
        "cpu": cpu, "board": rep["board"], "opt": OPT, "instructions_per_inference": n,
        "instructions_per_mac": rep["instructions_per_mac"], "instructions_range": [rep["instructions"]["min"],
                                                                                   rep["instructions"]["max"]],
        "cycles_per_instruction": cpi, "cpi_source": cpi_source, "clock_hz": float(profile.clock_hz),
        "latency_ms_est": latency_ms(n, profile, cpi), **{k: rep["sizes"][k] for k in ("text", "data", "bss")},
        "arena_bytes": rep["arena_bytes"], "stack_bytes": rep["stack_bytes"], "outputs_match": rep["outputs_match"],
        # NOTE: the data file by name: the run folder holds its own copy (eval.npz)
        "inputs": {"source": f"{Path(str(eval_path)).name} (first {rep['inputs']['n']})" if eval_path
                   else rep["inputs"]["source"], "n": rep["inputs"]["n"]},
        "report": f"{MEASURE_DIR}/report.md",
    }
