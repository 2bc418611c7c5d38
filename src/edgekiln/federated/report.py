"""The run folder of ``edgekiln federate``: global model, report.json / report.md, plots.

The folder is a model other commands accept, like an ``edgekiln example`` folder: the
``model`` block (:class:`edgekiln.models.run_folder.RunFolder`) names ``model.onnx``, the torch
factory and ``model.pt``; ``calib.npz`` and
``eval.npz`` are the server's held-out data (never a client's), so ``edgekiln optimize DIR``
can quantize and evaluate the federated model. There is no ``train.npz``: the training data
stayed on the clients.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.federated.server_app import ServerResult

FILES = ["model.pt", "model.onnx", "calib.npz", "eval.npz", "accuracy.png", "traffic.png", "report.json",
         "report.md"]


def write_run_folder(out_dir: str | Path, result: ServerResult, *, runtime: str, wall_seconds: float,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write every file of the run folder (report.json last); return report.json's data."""
    import torch

    from edgekiln.execution.specs import TensorSpec
    from edgekiln.federated.task import build_model, example_splits, partition_indices
    from edgekiln.fileio import atomic_save_npz, atomic_write_bytes
    from edgekiln.models import zoo
    from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact, TorchSource
    from edgekiln.models.examples import EXAMPLES
    from edgekiln.models.run_folder import RunFolder
    from edgekiln.models.torch_export import export_to_onnx

    s = result.settings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = example_splits(s.example, s.seed)
    model = build_model(s.example, s.seed)
    model.load_state_dict(result.state_dict)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out / "model.pt", buf.getvalue())
    export = export_to_onnx(model, splits.input_shape, out / "model.onnx", input_name="input", output_name="logits")
    atomic_save_npz(out / "calib.npz", x=splits.calib_x, y=splits.calib_y)
    atomic_save_npz(out / "eval.npz", x=splits.eval_x, y=splits.eval_y)
    parts = partition_indices(s.example, s.partition, s.clients, s.seed)
    clients = client_summary(result.clients, parts, splits.train_y, splits.num_classes)
    traffic = traffic_totals(result.history)
    first, last = result.history[0], result.history[-1]
    from edgekiln.federated.partition import label_skew

    report: dict[str, Any] = {
        "runtime": runtime, "settings": s.to_dict(), "example": s.example,
        "accuracy": last["accuracy"], "initial_accuracy": first["accuracy"], "metric_name": "accuracy",
        "metric": last["accuracy"], "rounds": result.history, "clients": clients, "traffic": traffic,
        "wall_seconds": round(wall_seconds, 2), "server_seconds": result.seconds,
        "partition": {"spec": s.partition, "sizes": [len(p) for p in parts],
                      "label_skew_tv": label_skew(splits.train_y, parts, splits.num_classes)},
        "privacy": {"mechanism": "central DP, client-side fixed clipping (Flower)", "clipping_norm": s.dp_clip,
                    "noise_multiplier": s.dp_noise} if s.dp_clip is not None else None,
        "params": zoo.count_params(model), "split": splits.sizes(), "preprocessing": splits.preprocessing,
        "files": FILES,
        "export": {"exporter": export["exporter"], "opset": export["opset"], "output_name": "logits",
                   "max_abs_error": export["max_abs_error"]},
    }
    report.update(extra or {})
    model_art = ModelArtifact(
        kind=ONNX_FLOAT, path=out / "model.onnx", inputs=(TensorSpec("input", tuple(splits.input_shape)),),
        torch=TorchSource(factory=f"edgekiln.models.zoo:{EXAMPLES[s.example].builder}", state_dict=out / "model.pt"),
        provenance=({"pass": "federate", "config": {"runtime": runtime, "strategy": s.strategy, "rounds": s.rounds,
                                                    "clients": s.clients, "partition": s.partition,
                                                    "compress": s.compress}},
                    {"pass": "export", "config": {"opset": export["opset"], "exporter": export["exporter"]},
                     "max_abs_error": export["max_abs_error"]}),
        data={"calib": out / "calib.npz", "eval": out / "eval.npz"})
    _plot_accuracy(result.history, out / "accuracy.png", report)
    _plot_traffic(result.history, out / "traffic.png")
    run = RunFolder(out)
    run.write(command="federate", model=model_art, measurements=report, markdown=markdown(report))
    return run.report()


def traffic_totals(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Total bytes down/up over all rounds and the uplink compression ratio."""
    down = sum(int(h.get("bytes_down", 0)) for h in history)
    up = sum(int(h.get("bytes_up", 0)) for h in history)
    float_up = sum(int(h.get("float_bytes_up", 0)) for h in history)
    return {"bytes_down": down, "bytes_up": up, "float_bytes_up": float_up,
            "uplink_ratio": (float_up / up) if up else None}


def client_summary(records: list[dict[str, Any]], parts: list[np.ndarray], train_y: np.ndarray,
                   num_classes: int) -> list[dict[str, Any]]:
    """Per client over the run: samples, label mix, rounds joined, mean update norm, bytes sent."""
    rows = []
    for pid, idx in enumerate(parts):
        mine = [r for r in records if r["partition_id"] == pid]
        counts = np.bincount(train_y[idx], minlength=num_classes)
        top = np.argsort(-counts)[:2]
        rows.append({
            "partition_id": pid, "samples": len(idx), "label_counts": counts.tolist(),
            "top_classes": [int(c) for c in top if counts[c] > 0],
            "rounds": len(mine), "node_ids": sorted({int(r["node_id"]) for r in mine}),
            "mean_update_norm": float(np.mean([r["received_update_norm"] for r in mine])) if mine else None,
            "mean_local_update_norm": float(np.mean([r["local_update_norm"] for r in mine])) if mine else None,
            "max_update_norm": float(max(r["received_update_norm"] for r in mine)) if mine else None,
            "bytes_up": int(sum(r["bytes_up"] for r in mine)),
            "weight_share": len(idx) / max(1, sum(len(p) for p in parts)),
        })
    return rows


def markdown(r: dict[str, Any]) -> str:
    from edgekiln.report import md_table

    s, t = r["settings"], r["traffic"]
    comp = "off" if s["compress"] == "none" else f"int8 update delta, per {s['granularity']} scale"
    dp = ("off" if not r.get("privacy") else
          f"clip {r['privacy']['clipping_norm']}, noise multiplier {r['privacy']['noise_multiplier']}")
    summary = [
        ["runtime", f"Flower {r['runtime']}"],
        ["strategy", s["strategy"] + (f" (mu {s['proximal_mu']})" if s["strategy"] == "fedprox" else "")],
        ["clients / rounds / local epochs", f"{s['clients']} / {s['rounds']} / {s['local_epochs']}"],
        ["client training", f"{s['optimizer']}, lr {s['lr']:g} ({s['lr_decay']} over rounds), batch {s['batch_size']}"],
        ["partition", f"{s['partition']} (label skew, mean TV distance: {r['partition']['label_skew_tv']:.3f})"],
        ["update compression", comp], ["differential privacy", dp],
        ["accuracy: initial -> final", f"{r['initial_accuracy']:.4f} -> {r['accuracy']:.4f}"],
        ["bytes down / up (all rounds)", f"{t['bytes_down']:,} / {t['bytes_up']:,}"],
        ["uplink vs float32 weights", f"{t['uplink_ratio']:.2f}x smaller" if t["uplink_ratio"] else "-"],
        ["wall time", f"{r['wall_seconds']:.1f} s (server loop {r['server_seconds']:.1f} s)"],
    ]
    for key, label in (("centralized", "centralized training, same data"), ("uncompressed", "uncompressed run")):
        if key in r:
            summary.append([label, f"{r[key]['accuracy']:.4f}"])
    rounds = [[h["round"], f"{h['accuracy']:.4f}", f"{h['loss']:.4f}", f"{h.get('bytes_down', 0):,}",
               f"{h.get('bytes_up', 0):,}", h.get("replies", 0), f"{h['elapsed_s']:.1f}"] for h in r["rounds"]]
    clients = [[c["partition_id"], c["samples"], ", ".join(map(str, c["top_classes"])), c["rounds"],
                f"{c['mean_update_norm']:.3f}" if c["mean_update_norm"] is not None else "-",
                f"{c['bytes_up']:,}"] for c in r["clients"]]
    return "\n".join([
        f"# edgekiln federate: {r['example']}", "",
        md_table(["", "value"], summary), "",
        "![accuracy per round](accuracy.png)", "",
        "## Rounds", "",
        "Accuracy and loss of the global model on the server's held-out split after each round "
        "(round 0: the initial model).", "",
        md_table(["round", "accuracy", "loss", "bytes down", "bytes up", "replies", "elapsed s"], rounds), "",
        "![communication per round](traffic.png)", "",
        "## Clients", "",
        "Update norm: L2 norm of (weights the server received - global weights), mean over the rounds "
        "the client took part in (after clipping and int8 compression when enabled).", "",
        md_table(["client", "samples", "top classes", "rounds", "mean update norm", "bytes up"], clients), "",
        "## Files", "",
        md_table(["file", "contents"], [
            ["model.pt / model.onnx", "the final global model (state_dict / ONNX, input `input`, output `logits`)"],
            ["calib.npz / eval.npz", "the server's held-out data (no client data leaves the clients)"],
            ["accuracy.png / traffic.png", "accuracy per round; bytes per round up and down"]]), "",
        "Use the folder as a model: `edgekiln optimize --model DIR ...`, `edgekiln quantize DIR --out Q`.", "",
    ])


def _plot_accuracy(history: list[dict[str, Any]], path: Path, report: dict[str, Any]) -> None:
    from matplotlib.ticker import MaxNLocator

    from edgekiln.report import new_figure, save_figure

    fig, ax = new_figure(6, 3.5)
    ax.plot([h["round"] for h in history], [h["accuracy"] for h in history], marker="o", label="federated (global)")
    for key, style in (("centralized", "--"), ("uncompressed", ":")):
        if key in report:
            ax.axhline(report[key]["accuracy"], linestyle=style, color="gray", label=key)
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def _plot_traffic(history: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    from edgekiln.report import new_figure, save_figure

    rows = [h for h in history if h["round"] > 0]
    fig, ax = new_figure(6, 3.5)
    x = np.array([h["round"] for h in rows])
    ax.bar(x - 0.2, [h.get("bytes_down", 0) / 1e6 for h in rows], 0.4, label="down (server -> clients)")
    ax.bar(x + 0.2, [h.get("bytes_up", 0) / 1e6 for h in rows], 0.4, label="up (clients -> server)")
    ax.set_xlabel("round")
    ax.set_ylabel("MB per round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    save_figure(fig, path)
