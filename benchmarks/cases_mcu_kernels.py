"""Benchmark case `mcu_kernels`: edgekiln's generated C measured instruction by instruction on an emulated Cortex-M.

Three int8 models x (Cortex-M4 -O2, Cortex-M4 -Os, Cortex-M7 -O2), each through ``edgekiln export --to c``
(default options) and :func:`edgekiln.codegen.mcu.measure.measure_mcu` (QEMU mps2-an386 / mps2-an500 with
edgekiln's counting plugin): instructions per inference and per MAC, arena, sizes, stack, and the outputs
against the integer reference on every input. Per layer the instructions are grouped by kernel kind
(:mod:`edgekiln.targets.kernel_kinds`): those per-kind instructions per MAC are what the Cortex-M profiles
carry (``instructions_per_mac``), and the table checks the profile's estimate against the measured totals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.suite import CaseResult
from edgekiln.report import md_table
from edgekiln.targets.kernel_kinds import KERNEL_KINDS

#: (cpu, -O level) measured for every model.
CONFIGS = (("cortex-m4", "O2"), ("cortex-m4", "Os"), ("cortex-m7", "O2"))
#: The anchor from issue 21 (TFLite Micro + CMSIS-NN on the same MNIST CNN, same QEMU board, plugin and
#: -O2 flags). Neither TFLM's C++ sources nor CMSIS-NN are on this machine, so it is quoted, not re-measured.
TFLM_CMSIS_MNIST_INSTRUCTIONS = 5_167_984
TFLM_REFERENCE_MNIST_INSTRUCTIONS = 20_944_738
TFLM_MNIST_ARENA_BYTES = 19_256
#: seeded inputs of the DS-CNN (no speech data ships in any package here).
KWS_INPUT_SEED = 1


def _geometry_kind(op: Any) -> str:
    """Kernel kind of a lowered op: conv / depthwise / pointwise / fc / add, or ``other``."""
    from edgekiln.targets.kernel_kinds import kernel_kind

    if op.kind == "fully_connected":
        return "fc"
    if op.kind == "add":   # same-shaped residual add (broadcast adds lower to add_lut)
        return "add"
    if op.kind in ("conv2d", "conv_pool"):
        a = op.attrs
        return kernel_kind(groups=a["groups"], cin_per_group=a["in_c"] // a["groups"], k_h=a["k_h"], k_w=a["k_w"])
    return "other"


def _models(work: Path, quick: bool) -> list[dict[str, Any]]:
    """name, QDQ path, eval .npz and what the inputs are, for each of the three models."""
    from benchmarks.cases_compile import mnist_folder
    from benchmarks.cases_quant import mobilenet_run
    from edgekiln.codegen.testmodels import random_inputs
    from edgekiln.codegen.testmodels_kws import KWS_INPUT_SHAPE, ds_cnn_kws_qdq
    from edgekiln.fileio import atomic_save_npz
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model

    n = 100 if quick else 1000
    out = []
    for name, folder in (("MNIST example CNN", mnist_folder(work)),
                         ("MobileNet-style", mobilenet_run(work.parent / "quantization", quick))):
        q = quantize_model(folder / "model.onnx", QuantizeConfig(calibration="minmax"), work / f"{name}-int8",
                           calib=folder / "calib.npz").path
        out.append({"name": name, "qdq": q, "data": folder / "eval.npz", "n": n,
                    "inputs": f"the first {n} MNIST eval images", "source": f"`edgekiln quantize` (minmax) of {folder}"})
    kws = ds_cnn_kws_qdq(work / "ds_cnn_kws.onnx", seed=0)
    data = atomic_save_npz(work / "kws_inputs.npz", x=random_inputs(KWS_INPUT_SHAPE, n, seed=KWS_INPUT_SEED))
    out.insert(1, {"name": "DS-CNN KWS-shaped", "qdq": kws, "data": data, "n": n,
                   "inputs": f"{n} seeded standard-normal inputs (seed {KWS_INPUT_SEED}; no speech data here)",
                   "source": "`edgekiln.codegen.testmodels_kws.ds_cnn_kws_qdq(seed=0)`"})
    return out


def _tflm_arena(qdq: Path, out: Path) -> dict[str, Any]:
    """TFLite Micro's arena for the same model (its Python interpreter on ``export --to tflite``'s file)."""
    from edgekiln.codegen.tflite.tflm import arena_comparison
    from edgekiln.errors import EdgekilnError

    try:
        return dict(arena_comparison(qdq, out)["tflm"])
    except (EdgekilnError, ImportError) as exc:
        return {"error": str(exc)}


def _export(qdq: Path, out: Path, requant: str, *, fuse: bool) -> Any:
    """``edgekiln export QDQ --to c --requant MODE --out OUT``, as the CLI does it (report.json included:
    measure_mcu reads its fusion flag, requantization mode and op list)."""
    from edgekiln.codegen.export import export_c, write_export_report
    from edgekiln.models.intake import load_model

    art = load_model(qdq)
    res = export_c(art.path, out, prefix="model", input_shapes=art.input_shapes, requant=requant, fuse=fuse)
    write_export_report(res, art)
    return res


def _measure_one(model: dict[str, Any], lib: Path, cpu: str, opt: str, ops: dict[str, Any]) -> dict[str, Any]:
    from edgekiln.codegen.fast_kernels import choose
    from edgekiln.codegen.mcu.measure import measure_mcu

    rep = measure_mcu(lib, cpu=cpu, opt=opt, data=model["data"], model=model["qdq"], limit=model["n"])
    rep["instructions"].pop("per_input", None)
    for row in rep["layers"]:
        op = ops[row["name"]]
        fast = choose(op)
        row["kernel_kind"] = _geometry_kind(op)
        row["fast_kernel"] = fast.name if fast else "portable"
    lib_objects = list(rep["objects"].values())
    rep["code_bytes"] = sum(o["code"] for o in lib_objects)
    rep["constant_bytes"] = sum(o["rodata"] for o in lib_objects)
    return rep


def per_kind(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Pooled over ``rows``' layers: MACs, instructions and instructions per MAC of each kernel kind."""
    acc: dict[str, list[int]] = {}
    for rep in rows:
        for layer in rep["layers"]:
            a = acc.setdefault(layer["kernel_kind"], [0, 0])
            a[0] += layer["macs"]
            a[1] += layer["instructions"]
    return {k: {"macs": m, "instructions": n, "instructions_per_mac": round(n / m, 3) if m else None}
            for k, (m, n) in sorted(acc.items())}


def profile_figures(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The ``instructions_per_mac`` a profile carries: per kind, and ``model`` = all models' instructions / MACs."""
    figures = {k: v["instructions_per_mac"] for k, v in per_kind(rows).items() if k in KERNEL_KINDS}
    figures["model"] = round(sum(r["instructions_per_inference"] for r in rows) / sum(r["macs"] for r in rows), 3)
    return figures


def _estimate_check(rows: list[dict[str, Any]], ipm: dict[str, float]) -> list[dict[str, Any]]:
    """Each model's instructions as a profile carrying ``ipm`` estimates them (ONNX MAC split) vs measured."""
    from edgekiln.models.analysis import analyze
    from edgekiln.targets.kernel_kinds import macs_by_kernel_kind, mcu_instructions

    out = []
    for rep in rows:
        info = analyze(rep["model_path"])
        est = mcu_instructions(ipm, info.macs, macs_by_kernel_kind(rep["model_path"], info.layers))
        out.append({"model": rep["model"], "estimated": round(est), "measured": rep["instructions_per_inference"],
                    "ratio": round(est / rep["instructions_per_inference"], 3)})
    return out


def mcu_kernels(work: Path, quick: bool) -> CaseResult:
    from edgekiln.codegen.mcu.toolchain import tools_missing

    work.mkdir(parents=True, exist_ok=True)
    missing = tools_missing()
    if missing:
        md = f"Not run: {missing} (install with `scripts/system-deps.sh`)."
        return CaseResult("mcu_kernels", TITLE, md, {"skipped": missing})
    from edgekiln.codegen.requant_fixed import REQUANT_MODES
    from edgekiln.errors import EdgekilnError

    rows: list[dict[str, Any]] = []
    exports: dict[str, Any] = {}
    tflm: dict[str, Any] = {}
    for model in _models(work, quick):
        tflm[model["name"]] = _tflm_arena(model["qdq"], work / f"{model['name']}-tflm")
        for requant in REQUANT_MODES:
            key = f"{model['name']} ({requant})"
            lib = work / f"{model['name']}-{requant}-c"
            try:
                res = _export(model["qdq"], lib, requant, fuse=True)
            except EdgekilnError as exc:
                # NOTE: fixed-point refuses a fused conv -> average pool (TFLM rounds the two steps apart);
                # the same model exports unfused (`--no-fuse`) in that mode: measure that
                try:
                    res = _export(model["qdq"], lib, requant, fuse=False)
                    exports[key] = {"fused_refused": str(exc)}
                except EdgekilnError as exc2:
                    exports[key] = {"model": model["name"], "requant": requant, "refused": str(exc2)}
                    continue
            exports[key] = {**exports.get(key, {}), "model": model["name"], "requant": requant, "fused": res.fused,
                            "arena_bytes": res.plan.arena_bytes,
                            "scratch_bytes_max": max(res.plan.scratch_bytes.values(), default=0),
                            "source": model["source"], "inputs": model["inputs"]}
            ops = {op.name: op for op in res.graph.ops}
            for cpu, opt in CONFIGS:
                rep = _measure_one(model, lib, cpu, opt, ops)
                rep["model"], rep["fused"] = model["name"], res.fused
                rows.append(rep)
                print(f"  {key} {cpu} -{opt}: {rep['instructions_per_inference']:,} instructions, "
                      f"identical {rep['identical_fraction']:.4f}", flush=True)
    # NOTE: the profiles describe the default export (float32-exact requantization)
    by_config = {f"{cpu} -{opt}": [r for r in rows if r["cpu"] == cpu and r["opt"] == opt
                                   and r["requant"] == REQUANT_MODES[0]] for cpu, opt in CONFIGS}
    kinds = {cfg: per_kind(rs) for cfg, rs in by_config.items()}
    figures = {cfg: profile_figures(rs) for cfg, rs in by_config.items()}
    checks = {cpu: _estimate_check(by_config[f"{cpu} -O2"], figures[f"{cpu} -O2"]) for cpu in ("cortex-m4", "cortex-m7")}
    raw = {"rows": rows, "exports": exports, "tflm_arena": tflm, "per_kind": kinds, "profile_figures": figures, "estimate_check": checks,
           "anchor": {"tflm_cmsis_nn_mnist_instructions": TFLM_CMSIS_MNIST_INSTRUCTIONS,
                      "tflm_reference_mnist_instructions": TFLM_REFERENCE_MNIST_INSTRUCTIONS,
                      "tflm_mnist_arena_bytes": TFLM_MNIST_ARENA_BYTES, "source": "issue 21 (not re-measured here)"}}
    return CaseResult("mcu_kernels", TITLE, render(raw), raw)


TITLE = "Microcontroller kernels on an emulated Cortex-M (QEMU)"


def _fmt(v: float | None, spec: str = ",") -> str:
    return "-" if v is None else format(v, spec)


def done_when(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 21's targets for the MNIST CNN, checked on every measured configuration of it."""
    out = []
    for r in rows:
        if r["model"] != "MNIST example CNN":
            continue
        checks = {"instructions <= 0.8x TFLM+CMSIS-NN (4,134,000)": r["instructions_per_inference"] <= 4_134_000,
                  "arena <= 0.5x TFLM (9,628 B)": r["arena_bytes"] <= 9_628,
                  "code <= 8 KB": r["code_bytes"] <= 8 * 1024,
                  f"outputs 100% identical on {r['inputs']['n']} eval images": r["identical_fraction"] == 1.0}
        verdict = "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items())
        out.append(f"- {r['requant']}, {r['cpu']} -{r['opt']}: {verdict}")
    return out


def render(raw: dict[str, Any]) -> str:
    rows, exports = raw["rows"], raw["exports"]
    main = []
    for r in rows:
        vs = ""
        if r["model"] == "MNIST example CNN":
            vs = f"{r['instructions_per_inference'] / TFLM_CMSIS_MNIST_INSTRUCTIONS:.2f}x"
        s = r["sizes"]
        t = raw["tflm_arena"].get(r["model"], {})
        t_arena = f"{t['reported_bytes']:,} / {t['smallest_running_bytes']:,}" if "reported_bytes" in t else "-"
        mode = r["requant"] + ("" if r.get("fused", True) else ", --no-fuse")
        main.append([r["model"], mode, f"{r['cpu'].removeprefix('cortex-').upper()} -{r['opt']}",
                     f"{r['macs']:,}",
                     f"{r['instructions_per_inference']:,}", r["instructions_per_mac"], vs or "-",
                     f"{r['arena_bytes']:,}", t_arena, f"{r['code_bytes']:,}", f"{s['text']:,} / {s['data']:,} / {s['bss']:,}",
                     r["stack_bytes"], f"{r['identical_fraction']:.2%} of {r['inputs']['n']}"])
    anchor = [["MNIST example CNN", "M4 -O2", "TFLite Micro + CMSIS-NN (issue 21)", f"{TFLM_CMSIS_MNIST_INSTRUCTIONS:,}",
               f"{TFLM_CMSIS_MNIST_INSTRUCTIONS / 2_015_360:.2f}", f"{TFLM_MNIST_ARENA_BYTES:,}"],
              ["MNIST example CNN", "M4 -O2", "TFLite Micro reference kernels (issue 21)",
               f"{TFLM_REFERENCE_MNIST_INSTRUCTIONS:,}", f"{TFLM_REFERENCE_MNIST_INSTRUCTIONS / 2_015_360:.2f}",
               f"{TFLM_MNIST_ARENA_BYTES:,}"]]
    kind_rows = []
    for cfg, kinds in raw["per_kind"].items():
        for k in (*KERNEL_KINDS, "other"):
            if k in kinds:
                v = kinds[k]
                kind_rows.append([cfg, k, f"{v['macs']:,}", f"{v['instructions']:,}",
                                  _fmt(v["instructions_per_mac"], "")])
    layer_rows = [[r["model"], x["name"], x["kind"], x["kernel_kind"], x["fast_kernel"], f"{x['macs']:,}",
                   f"{x['instructions']:,}", _fmt(x["instructions_per_mac"], "")]
                  for r in rows if r["cpu"] == "cortex-m4" and r["opt"] == "O2" and r["requant"] == "float32-exact"
                  for x in r["layers"] if x["instructions"]]
    check_rows = [[cpu, c["model"], f"{c['estimated']:,}", f"{c['measured']:,}", c["ratio"]]
                  for cpu, cs in raw["estimate_check"].items() for c in cs]
    seen: dict[str, dict[str, Any]] = {}
    for v in exports.values():
        seen.setdefault(v["model"], v)
    models = "; ".join(f"**{k}**: {v['source']}, inputs: {v['inputs']}" for k, v in seen.items() if "source" in v)
    arenas = "; ".join(f"{k}: largest im2col/row scratch {v['scratch_bytes_max']:,} B (inside the arena)"
                       for k, v in exports.items() if "scratch_bytes_max" in v)
    refused = [f"{k}: export refused: {v['refused']}" for k, v in exports.items() if "refused" in v]
    refused += [f"{k}: the fused export was refused ({v['fused_refused']}), measured with `--no-fuse`"
                for k, v in exports.items() if "fused_refused" in v]
    md = [
        "Each model goes through `edgekiln export --to c` (default options: conv -> pool fusion on) and "
        "`edgekiln measure-mcu` (`measure_mcu()`): `arm-none-eabi-gcc -O2|-Os` with `-mcpu=cortex-m4 -mthumb "
        "-mfloat-abi=hard -mfpu=fpv4-sp-d16` (M7: `-mcpu=cortex-m7 -mfpu=fpv5-d16`), run under `qemu-system-arm "
        "-M mps2-an386` (M4) / `mps2-an500` (M7) with edgekiln's instruction-counting TCG plugin. Counts are "
        "executed instructions of one inference (input 0; other inputs differ by ~0.01%), exact and repeatable, "
        "not cycles. Arena = the planned static arena, im2col scratch included; code = machine code of the "
        "library's objects (+ libgcc helpers), constants excluded; text = code + constants (weights), from the "
        "linker map; stack = high-water mark of one inference. Identical = int8 outputs equal to edgekiln's "
        "integer reference of the same requantization mode on every input, computed on the device.", "",
        f"Models: {models}. Scratch: {arenas}." + (" " + "; ".join(refused) + "." if refused else ""), "",
        md_table(["model", "requantization", "CPU", "MACs", "instructions / inference", "per MAC",
                  "vs TFLM+CMSIS-NN", "arena B", "TFLM arena B (reported / smallest running)", "code B",
                  "text / data / bss B", "stack B", "outputs identical"], main), "",
        "Issue 21's targets on the MNIST example CNN:", "", *done_when(rows), "",
        "The anchor (issue 21: same MNIST CNN, same board, plugin and -O2 flags). TFLite Micro's and CMSIS-NN's "
        "sources are not on this machine, so these are quoted, not re-measured; the arena is the issue's figure "
        "(TFLite Micro's Python interpreter; for the model measured here it reports the arena in the table above):", "",
        md_table(["model", "CPU", "implementation", "instructions / inference", "per MAC", "arena B"], anchor), "",
        "Instructions per MAC by kernel kind (float32-exact exports, all three models pooled; conv includes the "
        "fused conv -> pool layers; `add` = residual additions, per element; `other` = the remaining layers: "
        "pools, concatenations, ..., whose 'MACs' are the elements they pool or copy):", "",
        md_table(["CPU", "kernel kind", "MACs", "instructions", "per MAC"], kind_rows), "",
        "The Cortex-M profiles carry these figures (`instructions_per_mac`, M4 -O2 for `cortex-m4`, M7 -O2 for "
        "`cortex-m7`; `model` = the three models' instructions / MACs) and `edgekiln fits` estimates int8 latency "
        "from them. The estimate with this run's figures (each model's ONNX MACs split by kind; layers without a "
        "MAC kernel are not covered) against the measured totals:", "",
        md_table(["profile", *KERNEL_KINDS, "model"],
                 [[cfg, *(f.get(k, "-") for k in (*KERNEL_KINDS, "model"))] for cfg, f in raw["profile_figures"].items()]),
        "",
        md_table(["profile", "model", "estimated instructions", "measured", "ratio"], check_rows), "",
        "Per layer on M4 -O2, float32-exact (fast kernel = the variant `codegen/fast_kernels.py` chose; "
        "portable = `ek_kernels.c`):",
        "", md_table(["model", "layer", "op", "kernel kind", "fast kernel", "MACs", "instructions", "per MAC"],
                     layer_rows), "",
        "Raw numbers: `bench/results/mcu_kernels.json`."]
    return "\n".join(md)
