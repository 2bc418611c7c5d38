"""Presenting a :class:`~edgekiln.models.analysis.ModelAnalysis`: human-readable numbers, the
``inspect`` markdown table and the per-layer plot."""

from __future__ import annotations

from pathlib import Path

from edgekiln.models.analysis import ModelAnalysis


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_count(n: float) -> str:
    """``16_600_000 -> '16.6M'``."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def render_markdown(analysis: ModelAnalysis) -> str:
    """Totals, the per-layer table (constant nodes folded away) and the compatibility section."""
    from edgekiln.report import md_table

    a = analysis
    peak_layer = a.layers[a.peak_step].name if a.layers else "-"
    totals = md_table(["quantity", "value"], [
        ["parameters", f"{a.params:,}"], ["MACs", f"{a.macs:,} ({human_count(a.macs)})"],
        ["model file", human_bytes(a.model_bytes)], ["weights", human_bytes(a.weight_bytes)],
        ["inputs + outputs", human_bytes(a.io_bytes)],
        ["peak activations", f"{human_bytes(a.peak_activation_bytes)} at step {a.peak_step} ({peak_layer})"],
    ])
    shown = [(i, layer) for i, layer in enumerate(a.layers) if not layer.constant]
    rows = [[i, layer.name, layer.op, "x".join(map(str, layer.output_shape or ())) or "?", f"{layer.params:,}",
             f"{layer.macs:,}", f"{layer.activation_bytes:,}"] for i, layer in shown]
    hidden = len(a.layers) - len(shown)
    parts = [
        "# Model analysis", "",
        f"Inputs: {', '.join(f'{k} {list(v)}' for k, v in a.inputs.items())}; shapes from {a.shape_source}.", "",
        totals, "",
        "Peak activations: the RAM a static arena needs for the graph's node order without in-place "
        "reuse (tensors live from their producer to their last consumer; weights excluded).", "",
        "## Layers", "",
        md_table(["step", "name", "op", "output", "params", "MACs", "activation bytes"], rows),
    ]
    if hidden:
        parts += ["", f"{hidden} constant node(s) (weight DequantizeLinear, Constant, ...) are folded and not shown."]
    parts += ["", "## Compatibility", ""]
    for consumer, items in a.unsupported.items():
        what = "stays float" if consumer == "int8-qdq" else "unsupported"
        parts.append(f"- **{consumer}**: " + ("all ops supported" if not items else f"{what}: {_summarize(items)}"))
    return "\n".join(parts) + "\n"


def _summarize(items: list[str], limit: int = 4) -> str:
    by_op: dict[str, list[str]] = {}
    for item in items:
        op, _, name = item.partition(" (")
        by_op.setdefault(op, []).append(name.rstrip(")"))
    parts = []
    for op, names in by_op.items():
        more = f", +{len(names) - limit} more" if len(names) > limit else ""
        parts.append(f"{op} x{len(names)} ({', '.join(names[:limit])}{more})")
    return "; ".join(parts)


def plot_analysis(analysis: ModelAnalysis, path: str | Path) -> Path:
    """One PNG: MACs per layer (bars) above live activation memory per step (with the peak)."""
    from edgekiln.report import new_figure, save_figure

    fig, (ax_macs, ax_mem) = new_figure(9.0, 6.5, nrows=2)
    steps = list(range(len(analysis.layers)))
    ax_macs.bar(steps, [layer.macs for layer in analysis.layers], color="#4c72b0")
    ax_macs.set_ylabel("MACs")
    ax_macs.set_title(f"MACs per layer (total {human_count(analysis.macs)})")
    if 0 < len(steps) <= 40:
        ax_macs.set_xticks(steps)
        ax_macs.set_xticklabels([layer.name for layer in analysis.layers], rotation=90, fontsize=7)
    live = [b / 1024 for b in analysis.live_bytes_per_step]
    ax_mem.step(range(len(live)), live, where="mid", color="#dd8452")
    ax_mem.fill_between(range(len(live)), live, step="mid", alpha=0.3, color="#dd8452")
    ax_mem.axvline(analysis.peak_step, color="k", linestyle="--", linewidth=0.8)
    ax_mem.set_title(f"live activations per step (peak {human_bytes(analysis.peak_activation_bytes)} "
                     f"at step {analysis.peak_step})")
    ax_mem.set_xlabel("step (node index)")
    ax_mem.xaxis.get_major_locator().set_params(integer=True)
    ax_mem.set_ylabel("KiB")
    fig.tight_layout()
    return save_figure(fig, path)
