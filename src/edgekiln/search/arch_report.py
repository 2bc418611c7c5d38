"""The run folder of `edgekiln search-arch`: report.json/md, the Pareto plot, and the ``model``
block that lets the next command (quantize, prune, export) read the selected model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekiln.search.arch import ArchCandidate, ArchSearchConfig, ArchSearchResult


def plot_pareto(result: ArchSearchResult, path: Path, max_latency_ms: float | None) -> Path:
    """Validation accuracy vs estimated target latency of the trained candidates (colour: RAM),
    the Pareto set joined by a line, the selected model circled."""
    from edgekiln.report import new_figure, save_figure

    fig, ax = new_figure(8, 4.5)
    trained = [c for c in result.candidates if c.trained]
    sc = ax.scatter([c.latency_ms_target_est for c in trained], [c.val_accuracy for c in trained],
                    c=[c.ram_bytes / 1024 for c in trained], cmap="viridis", s=40, zorder=3)
    fig.colorbar(sc, ax=ax, label="estimated RAM (KiB, int8)")
    pts = sorted(result.pareto, key=lambda c: c.latency_ms_target_est)
    ax.plot([c.latency_ms_target_est for c in pts], [c.val_accuracy for c in pts], color="tab:red", linewidth=1,
            label="Pareto set (accuracy, latency, RAM)", zorder=2)
    b = result.best
    ax.scatter([b.latency_ms_target_est], [b.val_accuracy], s=160, facecolors="none", edgecolors="black",
               label=f"selected: {b.label}", zorder=4)
    if max_latency_ms is not None:
        ax.axvline(max_latency_ms, color="grey", linestyle="--", label="latency budget")
    ax.set_xlabel("estimated latency on the target (ms, int8)")
    ax.set_ylabel("validation accuracy (brief training)")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def _row(c: ArchCandidate) -> list[Any]:
    return [c.number, c.label, f"{c.params:,}", f"{c.macs:,}", f"{c.flash_bytes:,}", f"{c.ram_bytes:,}",
            f"{c.latency_ms_target_est:.3f}", "-" if c.val_accuracy is None else f"{c.val_accuracy:.4f}",
            "-" if c.latency_ms_host is None else f"{c.latency_ms_host:.4f}"]


def write_arch_report(out: Path, result: ArchSearchResult, config: ArchSearchConfig,
                      baseline: dict[str, Any] | None) -> dict[str, Any]:
    from edgekiln.compress.report import measure
    from edgekiln.execution.specs import TensorSpec
    from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact, TorchSource
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.report import md_table

    final = result.final
    selected = measure(out / "model.onnx", out / "eval.npz", runs=200)
    plots = [plot_pareto(result, out / "pareto.png", config.budget.max_latency_ms).name]
    fit = final["fit"]
    before = baseline or {}
    data: dict[str, Any] = {
        "target": config.budget.target, "budget": _budget(config, fit), "fits": final["fits"],
        "metric_name": "accuracy", "metric": final["accuracy_fp32"], "metric_int8": final["accuracy_int8"],
        "metric_before": before.get("metric"), "params_before": before.get("params"),
        "macs_before": before.get("macs"), "latency_ms_before": before.get("latency_ms"),
        "params": selected["params"], "macs": selected["macs"], "latency_ms": selected["latency_ms"],
        "latency_ms_p90": selected["latency_ms_p90"], "int8_bytes": final["int8_bytes"],
        "flash_bytes": fit["flash"]["value"], "ram_bytes": fit["ram"]["value"], "ram_source": final["ram_source"],
        "latency_ms_target_est": fit["latency_ms"]["value"], "fit": fit,
        "selected": result.best.to_dict(), "pareto": [c.to_dict() for c in result.pareto],
        "candidates": [c.to_dict() for c in result.candidates], "space_size": len(result.candidates),
        "fitting": sum(c.fits for c in result.candidates), "trained": sum(c.trained for c in result.candidates),
        "search_seconds": result.seconds, "phase_seconds": dict(result.phases), "final_training": {k: final[k] for k in ("seconds", "epochs")},
        "input_shape": final["input_shape"], "config": _config_dict(config), "plots": plots,
        "int8_artifact": final["int8_model"],
    }
    model = ModelArtifact(
        kind=ONNX_FLOAT, path=out / "model.onnx", inputs=(TensorSpec("input", tuple(final["input_shape"])),),
        torch=TorchSource(factory=_factory(result.best.family), factory_kwargs=dict(result.best.kwargs),
                          state_dict=out / "model.pt"),
        provenance=({"pass": "search-arch", "config": _config_dict(config), "selected": result.best.label},),
        data={k: out / f"{k}.npz" for k in ("calib", "eval", "train")})
    headers = ["#", "architecture", "params", "MACs", "flash (B)", "RAM (B)", "target ms (est.)", "val acc",
               "host p50 ms"]
    verdict = "fits" if final["fits"] else "does NOT fit"
    md = [f"# search-arch for {config.budget.target}", "",
          f"Selected **{result.best.label}**: accuracy {final['accuracy_fp32']:.4f} (FP32) / "
          f"{final['accuracy_int8']:.4f} (int8) on the evaluation data; the int8 model {verdict}: flash "
          f"{fit['flash']['value']:,.0f} of {fit['flash']['budget']:,.0f} B, RAM {fit['ram']['value']:,.0f} of "
          f"{fit['ram']['budget']:,.0f} B ({final['ram_source']}), estimated latency "
          f"{fit['latency_ms']['value']:.3f} ms.", "",
          f"Space: {len(result.candidates)} architectures, {data['fitting']} fit the budget before training, "
          f"{data['trained']} trained for {config.epochs} epochs; the selected one retrained for "
          f"{config.final_epochs} epochs. Search time {result.seconds:.0f} s. The input resolution is "
          f"{final['input_shape'][-1]}x{final['input_shape'][-2]}: eval.npz/calib.npz here are at that size.", "",
          "## Pareto set (validation accuracy, target latency, RAM)", "", md_table(headers, map(_row, result.pareto)),
          "", "## Trained candidates", "", md_table(headers, map(_row, [c for c in result.candidates if c.trained])),
          "", *[f"![{p}]({p})" for p in plots]]
    run = RunFolder(out)
    run.write(command="search-arch", model=model, measurements=data, markdown="\n".join(md))
    return run.report()


def _factory(family: str) -> str:
    from edgekiln.models.zoo import BUILDERS

    fn = BUILDERS[family]
    return f"{fn.__module__}:{fn.__name__}"


def _budget(config: ArchSearchConfig, fit: dict[str, Any]) -> dict[str, Any]:
    return {"max_ram_bytes": fit["ram"]["budget"], "max_flash_bytes": fit["flash"]["budget"],
            "max_latency_ms": config.budget.max_latency_ms}


def _config_dict(config: ArchSearchConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(config)
