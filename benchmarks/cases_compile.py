"""Benchmark cases for pruning, the microcontroller backend, optimize and the on-device runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import peers
from benchmarks.suite import CaseResult
from edgekiln.report import md_table


def mnist_folder(work: Path) -> Path:
    """The MNIST example run folder the cases share (trained once, seed 0)."""
    from edgekiln.models.examples import train_example

    folder = work.parent / "quantization" / "mnist"
    if not (folder / "model.onnx").is_file():
        train_example("mnist", folder, seed=0, quiet=True)
    return folder


def _conv_channels(path: Path) -> list[int]:
    """Output channels of each Conv, in graph order (QDQ models included)."""
    import onnx

    from edgekiln.quant.size import weight_of

    m = onnx.load(str(path))
    inits = {i.name: i for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    found = [weight_of(n, inits, producer) for n in m.graph.node if n.op_type == "Conv"]
    return [int(f[0].dims[0]) if f else -1 for f in found]


def pruning(work: Path, quick: bool) -> CaseResult:
    from edgekiln.models.analysis import analyze
    from edgekiln.models.intake import load_model, run_folder_data
    from edgekiln.models.metrics import evaluate
    from edgekiln.passes.base import PassContext
    from edgekiln.passes.prune import PruneConfig
    from edgekiln.passes.prune import run as prune
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model

    folder = mnist_folder(work)
    art, data = load_model(folder), run_folder_data(folder)
    x = np.load(data["eval"])["x"][:1]
    models: dict[str, Path] = {"FP32 baseline": art.path}

    def pruned(ratio: float, round_to: int | None) -> Path:
        tag = f"prune-{ratio}" + (f"-r{round_to}" if round_to else "")
        ctx = PassContext(work_dir=work / tag, train_path=data["train"], calib_path=data["calib"], quiet=True)
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        return prune(art, PruneConfig(ratio=ratio, finetune_epochs=3 if quick else 6, round_to=round_to), ctx).path

    for ratio in ((0.5,) if quick else (0.4, 0.5, 0.6)):
        models[f"structured prune {int(ratio * 100)}% channels"] = pruned(ratio, None)
        if ratio == 0.5:
            q = quantize_model(models["structured prune 50% channels"], QuantizeConfig(calibration="auto"),
                               work / "prune-int8", calib=data["calib"])
            models["prune 50% + int8"] = q.path
        elif not quick:
            models[f"structured prune {int(ratio * 100)}% channels, counts rounded to 8"] = pruned(ratio, 8)
    # NOTE: timed round-robin (every model in each round) so a busy spell of this shared machine
    # falls on all rows alike; the speed-up column compares rows of the same rounds.
    sessions = {k: peers.onnxruntime_session(p) for k, p in models.items()}
    lat = peers.time_interleaved(sessions, dict.fromkeys(sessions, {"input": x}), warmup=50,
                                 rounds=20 if quick else 100)
    rows = []
    for label, path in models.items():
        info = analyze(path)
        rows.append({"model": label, "accuracy": evaluate(path, data["eval"]), "macs": info.macs, "params": info.params,
                     "channels": _conv_channels(path), "bytes": path.stat().st_size, "p50_ms": lat[label]["p50"],
                     "p90_ms": lat[label]["p90"]})
    base = rows[0]
    for r in rows:
        r["macs_removed"] = 1 - r["macs"] / base["macs"]
        r["drop_points"] = 100 * (base["accuracy"] - r["accuracy"])
        r["size_ratio"] = r["bytes"] / base["bytes"]
        r["speedup_p50"] = base["p50_ms"] / r["p50_ms"]
    table = md_table(["model", "conv channels", "accuracy", "drop (points)", "MACs", "MACs removed", "size ratio",
                      "p50 ms", "p90 ms", "speed-up"],
                     [[r["model"], "/".join(map(str, r["channels"])), f"{r['accuracy']:.4f}", f"{r['drop_points']:.2f}",
                       f"{r['macs']:,}", f"{100 * r['macs_removed']:.0f}%", f"{r['size_ratio']:.3f}",
                       f"{r['p50_ms']:.4f}", f"{r['p90_ms']:.4f}", f"{r['speedup_p50']:.2f}x"] for r in rows])
    md = ("MNIST example CNN; structured L1 channel pruning (Torch-Pruning dependency graph) with fine-tuning on the "
          "4,000 training samples; onnxruntime, 1 thread, batch 1, all rows timed round-robin in the same rounds. "
          "onnxruntime's fast convolution path on this CPU works on blocks of 8/16 channels: channel counts that are "
          "not multiples of 8 can make a pruned network slower despite fewer MACs, which `--round-to 8` avoids.\n\n"
          + table)
    return CaseResult("pruning", "Structured pruning of the MNIST CNN", md, {"rows": rows})


def mcu(work: Path, quick: bool) -> CaseResult:
    from edgekiln.codegen.export import export_c
    from edgekiln.codegen.verify import verify_c
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model

    work.mkdir(parents=True, exist_ok=True)
    folder = mnist_folder(work)
    models = {"MNIST CNN": folder}
    # NOTE: the MobileNet-style model is the quantization case's (trained once, shared); it is
    # trained here the same way when this case runs alone.
    from benchmarks.cases_quant import mobilenet_run

    models["MobileNet-style"] = mobilenet_run(work.parent / "quantization", quick)
    rows = []
    for name, f in models.items():
        q = quantize_model(f / "model.onnx", QuantizeConfig(calibration="minmax"), work / f"{name}-int8",
                           calib=f / "calib.npz").path
        row: dict[str, Any] = {"name": name}
        try:
            from edgekiln.codegen.measure import mcu_report

            row.update(mcu_report(q, work / f"{name}-report"))
        except ImportError:
            from edgekiln.codegen.tflite.tflm import arena_comparison

            res = export_c(q, work / f"{name}-c", prefix="model")
            row.update({"arena_bytes": res.plan.arena_bytes, "ram_bytes": res.to_dict()["ram_bytes"],
                        "tflm": arena_comparison(q, work / f"{name}-tflm")})
        lib = work / f"{name}-lib"
        export_c(q, lib, prefix="model")
        v = verify_c(lib, f / "eval.npz", model=q, valgrind=True, limit=100 if quick else 1000)
        row["verify"] = v.to_dict()
        row["peers_vs_onnxruntime"] = _tflite_peers(q, work / f"{name}-tflite", f / "eval.npz", 100 if quick else 1000)
        rows.append(row)
    (work / "rows.json").write_text(json.dumps(rows, indent=2, default=str))
    from edgekiln.codegen.measure import MARKDOWN_HEADERS, markdown_row

    table = md_table(MARKDOWN_HEADERS, [markdown_row(r["name"], r) for r in rows if "tflm" in r and "callgrind" in r])
    verify = md_table(["model", "passed", "inputs", "top-1 agree", "int8 outputs identical", "max diff (LSB)",
                       "bit-exact vs numpy reference", "valgrind"],
                      [[r["name"], r["verify"]["passed"], r["verify"]["n_inputs"], r["verify"]["top1_agree"],
                        r["verify"]["identical_fraction"], r["verify"]["max_abs_diff"],
                        r["verify"]["exact_vs_numpy_reference"], r["verify"]["valgrind"]] for r in rows])
    peer_rows = [[r["name"], "edgekiln C", r["verify"]["identical_fraction"], r["verify"]["max_abs_diff"]]
                 for r in rows]
    peer_rows += [[r["name"], rt, c["identical_fraction"], c["max_abs_diff_lsb"]]
                  for r in rows for rt, c in r["peers_vs_onnxruntime"].items() if "identical_fraction" in c]
    peers_md = md_table(["model", "runtime (same int8 model)", "int8 outputs identical to onnxruntime",
                         "max diff (LSB)"], peer_rows)
    md = ["Int8 models from `edgekiln quantize --scheme int8` exported with `edgekiln export --to c` (conv+pool "
          "fused by default), verified with `edgekiln verify-c` on the held-out MNIST samples (host gcc, valgrind). "
          "TFLite Micro: the `.tflite` from `edgekiln export --to tflite`; arena as its Python interpreter reports it "
          "and the smallest arena that still runs (bisection in subprocesses). Instructions per inference: callgrind "
          "on the host build (x86-64, -O2), a repeatable proxy, not Cortex-M cycles.", "", table, "", verify, "",
          "Conv and FC requantize as onnxruntime's QLinearConv rounds (float32 scale, ties to even), emulated with "
          "integers only; the outputs that still differ by 1 LSB come from nodes onnxruntime runs in float "
          "(unfused convs next to residual Adds, Add, Gemm), whose float rounding flips values within ~1e-6 of a "
          "rounding boundary. The same eval inputs through the `.tflite` from `edgekiln export --to tflite` in "
          "LiteRT (XNNPACK, float32 requantization like onnxruntime) and TFLite Micro (gemmlowp fixed-point "
          "multipliers with two roundings, whose 1-LSB differences compound through the layers):", "", peers_md, "",
          "Full numbers (flash parts, arm-none-eabi-size sections): `bench/results/mcu.json`."]
    return CaseResult("mcu", "Microcontroller backend: arena, flash, verification, TFLite Micro", "\n".join(md),
                      {"rows": rows})


def _tflite_peers(qdq: Path, out: Path, eval_npz: Path, limit: int) -> dict[str, Any]:
    """LiteRT and TFLite Micro on the exported ``.tflite`` vs onnxruntime on the QDQ model."""
    from edgekiln.codegen.ir import load_qdq
    from edgekiln.codegen.tflite.check import compare_tflite
    from edgekiln.codegen.tflite.writer import write_tflite

    out.mkdir(parents=True, exist_ok=True)
    path = write_tflite(load_qdq(qdq), out / "model.tflite")
    with np.load(eval_npz) as e:
        x = e["x"][:limit]
    return compare_tflite(path, qdq, x)


def optimize_mnist(work: Path, quick: bool) -> CaseResult:
    import json

    from edgekiln.models.metrics import evaluate
    from edgekiln.search.optimize import optimize
    from edgekiln.search.recipe import Recipe
    from edgekiln.search.report import deployment_lines

    folder = mnist_folder(work)
    out = work / "run"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    recipe = Recipe.from_dict({"model": str(folder), "target": "cortex-m7", "constraints": {"max_drop": 0.01},
                               "search": {"trials": 6 if quick else 16, "seed": 0}})
    res = optimize(recipe, out, quiet=True)
    sel = res.selected
    acc = evaluate(out / "model.onnx", folder / "eval.npz")
    base = res.baseline
    dep = json.loads((out / "report.json").read_text())["deployment"]
    raw = {"selected": sel.to_dict(), "baseline": base.to_dict(), "reevaluated_accuracy": acc,
           "size_reduction": base.model_bytes / sel.model_bytes, "trials": len(res.candidates), "deployment": dep}
    md = "\n".join([
        "`edgekiln optimize runs/mnist --target cortex-m7 --max-drop 0.01` (seed 0, "
        f"{len(res.candidates)} trials). Accuracy re-evaluated from the model file on disk.", "",
        md_table(["", "baseline", "selected"], [
            ["pipeline", "FP32", sel.label], ["accuracy", f"{base.metric:.4f}", f"{acc:.4f}"],
            ["size (bytes)", base.model_bytes, sel.model_bytes], ["RAM (bytes)", base.peak_ram_bytes, sel.peak_ram_bytes],
            ["Cortex-M7 latency (ms; selected: measured instructions, see below)", f"{base.latency_ms_target_est:.3f}",
             f"{sel.latency_ms_target_est:.3f}"],
            ["host p50 (ms)", f"{base.latency_ms_host:.4f}", f"{sel.latency_ms_host:.4f}"]]), "",
        f"Selected model: **{raw['size_reduction']:.1f}x smaller**, accuracy drop {100 * (base.metric - acc):.2f} points "
        "(budget 1.00), fits the cortex-m7 profile. The FP32 baseline is not deployable there (edgekiln's C library "
        "is integer-only); every trial is an int8 C library, run on QEMU's Cortex-M7 for its instruction count.",
        "", *[line for line in deployment_lines(dep, "cortex-m7")[2:] if not line.startswith("Per layer")],
        "Per layer: `edgekiln measure-mcu RUN/c --cpu cortex-m7`. QEMU counts executed instructions, not cycles: "
        "the latency assumes the profile's stated cycles per instruction."])
    return CaseResult("optimize", "edgekiln optimize: MNIST for a Cortex-M7, one-point budget", md, raw)


def runtime_adaptive(work: Path, quick: bool) -> CaseResult:
    """Latency-budget switching under a synthetic slowdown, fp32 vs int8 variants; a plot."""
    import shutil

    from edgekiln.fileio import atomic_write_json
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model
    from edgekiln.report import new_figure, save_figure
    from edgekiln.runtime.bundle import build_bundle
    from edgekiln.runtime.engine import Runtime
    from edgekiln.runtime.policies import LatencyBudgetPolicy

    folder = mnist_folder(work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    q = quantize_model(folder / "model.onnx", QuantizeConfig(), work / "int8run", calib=folder / "calib.npz")
    small = work / "small"
    small.mkdir()
    shutil.copyfile(q.path, small / "model.onnx")
    atomic_write_json(small / "report.json", {"artifact": "model.onnx", "metric": 0.975, "latency_ms": 0.05})
    big = work / "big"
    big.mkdir()
    shutil.copyfile(folder / "model.onnx", big / "model.onnx")
    shutil.copyfile(folder / "eval.npz", big / "eval.npz")
    atomic_write_json(big / "report.json", {"artifact": "model.onnx", "metric": 0.98, "latency_ms": 0.1})
    build_bundle([big, small], work / "bundle")
    x = np.load(folder / "eval.npz")["x"][:1]
    budget, n = 2.0, 300 if quick else 600
    traces = {}
    for label, policy in (("fixed largest", None), ("latency budget", LatencyBudgetPolicy(budget_ms=budget))):
        rt = Runtime(work / "bundle", policy=policy, window=50)
        lat = []
        for i in range(n):
            load = n // 4 <= i < 3 * n // 4          # a slowdown hits the FP32 variant in the middle
            rt.slowdown_ms = (2.5 if rt.current == "fp32" else 0.3) if load else 0.0
            rt.infer(x)
            lat.append(rt.monitor.variants[rt.current].window[-1])
        traces[label] = lat
    fig, ax = new_figure(8, 3.5)
    for label, lat in traces.items():
        roll = [np.percentile(lat[max(0, i - 50):i + 1], 95) for i in range(len(lat))]
        ax.plot(roll, label=f"{label} (rolling p95)")
    ax.axhline(budget, color="red", linestyle="--", label="budget")
    ax.set_xlabel("request")
    ax.set_ylabel("ms")
    ax.legend(fontsize=8)
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    save_figure(fig, Path("bench/results/runtime_adaptive.png"))
    mid = slice(n // 4 + 60, 3 * n // 4)
    p95 = {k: float(np.percentile(v[mid], 95)) for k, v in traces.items()}
    md = (f"A bundle with the FP32 and int8 MNIST models; during requests {n // 4}-{3 * n // 4} a synthetic load "
          f"adds 2.5 ms to the FP32 variant (0.3 ms to int8). Budget {budget} ms. p95 under load (after a 60-request "
          f"settling window): fixed largest {p95['fixed largest']:.2f} ms, latency-budget policy "
          f"{p95['latency budget']:.2f} ms.\n\n![adaptive switching](bench/results/runtime_adaptive.png)")
    return CaseResult("runtime", "On-device runtime: latency-budget switching under load", md, {"p95_under_load": p95})
