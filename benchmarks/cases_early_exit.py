"""Bench case ``early_exit``: exit heads on the MNIST CNN, staged execution, average latency.

Two backbones, both trained on the MNIST example's data: the example model itself
(``mnist_cnn``, 2.0M MACs, ~40 us per call here) and the same architecture at 4x width
(``mnist_cnn(width=4)``, 29.6M MACs). Exits sit after the first and second conv blocks. Heads
are distilled from the final head (backbone frozen); thresholds are chosen on the calibration
split (validation data the heads were not trained on) for an accuracy drop of at most
``MAX_DROP``; accuracy and latency are measured on the 1,000 held-out evaluation images, one
image per call (batch 1), one thread.

Three ways to run each image, interleaved round by round so machine noise hits them alike:
the unsplit model (one onnxruntime call), the staged model with its thresholds (early exit),
and the staged model with every threshold above 1 ("no exit taken": what staging costs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.suite import CaseResult

EXITS = (2, 5)           # after block 1 (conv-relu-pool) and block 2 of mnist_cnn
MAX_DROP = 0.003         # threshold choice on validation data; the done-when allows 0.5 points
SPEEDUP_TARGET, OVERHEAD_TARGET, DROP_TARGET = 1.8, 0.03, 0.005


def _example(work: Path) -> Path:
    from edgekiln.models.examples import train_example

    folder = work.parent / "quantization" / "mnist"   # shared with the other MNIST cases
    if not (folder / "model.pt").is_file():
        train_example("mnist", folder, seed=0, quiet=True)
    return folder


def _wide(work: Path, data: Any, epochs: int) -> Path:
    """The example's architecture at 4x width, trained on the same split (cached in ``work``)."""
    import torch

    from edgekiln.fileio import atomic_write_bytes
    from edgekiln.models import zoo
    from edgekiln.models.training import train_classifier

    path = work / "wide" / f"model-e{epochs}.pt"
    if not path.is_file():
        torch.manual_seed(0)
        model = zoo.mnist_cnn(width=4)
        train_classifier(model, data["train"]["x"], data["train"]["y"], epochs=epochs, batch_size=64, lr=2e-3,
                         seed=0, quiet=True, augment=True, description="mnist_cnn width 4")
        import io

        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    return path


def _evaluate(label: str, width: int, state: Path, data: dict[str, dict[str, np.ndarray]], out: Path, *,
              head_epochs: int, rounds: int, images: int) -> dict[str, Any]:
    import torch

    from edgekiln.compress.early_exit import attach_exits, choose_thresholds, export_stages, train_exits
    from edgekiln.execution import ort_session, time_calls  # sessions: 1 intra-op, 1 inter-op thread
    from edgekiln.models import zoo
    from edgekiln.models.analysis import analyze
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.runtime.bound import BoundSession, bind_chain
    from edgekiln.runtime.early_exit import StagedRunner

    torch.manual_seed(0)
    model = zoo.mnist_cnn(width=width)
    model.load_state_dict(torch.load(state, weights_only=True))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    export_to_onnx(model, (1, 1, 28, 28), out / "model.onnx", input_name="input", output_name="logits")
    staged = attach_exits(model, EXITS, (1, 1, 28, 28), 10, pool=7)
    train_exits(staged, data["train"]["x"], epochs=head_epochs, seed=0)
    paths = export_stages(staged, (1, 1, 28, 28), out / "stages")
    bare = [ort_session(p) for p in export_stages(staged, (1, 1, 28, 28), out / "bare", heads=False)]

    probe = StagedRunner(paths, [1.01] * len(EXITS))
    val = probe.all_exits(data["calib"]["x"])
    choice = choose_thresholds(val[:-1], val[-1], data["calib"]["y"], max_drop=MAX_DROP)
    early = StagedRunner(paths, choice["thresholds"])
    never = StagedRunner(paths, [1.01] * len(EXITS))
    full_sess = ort_session(out / "model.onnx")

    # NOTE: every run calls onnxruntime the same way: buffers bound once for the batch-1 shape
    # (what StagedRunner does for its stages), so the ratios compare the models, not the calls.
    full_bound = BoundSession(full_sess, np.zeros((1, 1, 28, 28), np.float32))
    bare_chain = bind_chain(bare, np.zeros((1, 1, 28, 28), np.float32))

    def full(r: np.ndarray) -> np.ndarray:
        np.copyto(full_bound.input, r)
        return full_bound()[0]

    def split_only(r: np.ndarray) -> np.ndarray:
        np.copyto(bare_chain[0].input, r)
        for stage in bare_chain[:-1]:
            stage()
        return bare_chain[-1]()[0]

    x, y = data["eval"]["x"][:images], data["eval"]["y"][:images]
    rows = [x[i:i + 1].copy() for i in range(len(x))]
    runs = {"full": full, "early exit": lambda r: early(r)[0],
            "staged, no exit": lambda r: never(r)[0], "split, no heads": split_only}
    preds = {name: np.array([int(fn(r).argmax()) for r in rows]) for name, fn in runs.items()}
    times: dict[str, list[np.ndarray]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            for r in rows[:50]:
                fn(r)                                   # warm-up
            # NOTE: every image once, in order, so sample i is image i in each round.
            each = iter(rows)
            times[name].append(time_calls(lambda fn=fn, each=each: fn(next(each)), runs=len(rows)))
    early.exits_taken = [0] * len(paths)
    for r in rows:
        early(r)
    share = [n / len(rows) for n in early.exits_taken]
    stage_macs = [analyze(p).macs for p in paths]
    cum = np.cumsum(stage_macs)
    # NOTE: per image, the fastest of the rounds, then the mean over images: the average
    # latency the issue asks for, without the multi-millisecond stalls that other processes on
    # a shared machine add at random (they hit whichever run is on the CPU at the time).
    per_image = {k: np.min(np.stack(v), axis=0) for k, v in times.items()}
    mean = {k: float(v.mean()) for k, v in per_image.items()}
    ratio = {k: mean["full"] / v for k, v in mean.items()}
    acc = {k: float((p == y).mean()) for k, p in preds.items()}
    return {
        "label": label, "width": width, "full_macs": analyze(out / "model.onnx").macs,
        "avg_macs_early_exit": float(np.dot(share, cum)), "exit_share": share, "thresholds": choice["thresholds"],
        "validation": {k: choice[k] for k in ("accuracy", "full_accuracy")}, "accuracy": acc,
        "drop_points": 100 * (acc["full"] - acc["early exit"]), "mean_ms": mean,
        "p50_ms": {k: float(np.median(np.concatenate(v))) for k, v in times.items()},
        "p90_ms": {k: float(np.percentile(np.concatenate(v), 90)) for k, v in times.items()},
        "speedup": ratio["early exit"], "no_exit_overhead": 1 / ratio["staged, no exit"] - 1,
        "split_only_overhead": 1 / ratio["split, no heads"] - 1,
        "images": len(rows), "rounds": rounds,
    }


def early_exit(work: Path, quick: bool) -> CaseResult:
    from edgekiln.report import md_table

    folder = _example(work)
    data = {k: dict(np.load(folder / f"{k}.npz")) for k in ("train", "calib", "eval")}
    wide_state = _wide(work, data, epochs=2 if quick else 5)
    kw = {"head_epochs": 5 if quick else 15, "rounds": 3 if quick else 5, "images": 300 if quick else 1000}
    results = [_evaluate("MNIST example (mnist_cnn)", 1, folder / "model.pt", data, work / "w1", **kw),
               _evaluate("mnist_cnn, 4x width", 4, wide_state, data, work / "w4", **kw)]
    rows = []
    for r in results:
        for k in ("full", "early exit", "staged, no exit", "split, no heads"):
            macs = r["full_macs"] if k == "full" else r["avg_macs_early_exit"] if k == "early exit" else None
            rows.append([r["label"], k, 100 * r["accuracy"][k], f"{macs / 1e6:.2f}M" if macs else
                         "full + heads" if k == "staged, no exit" else "full",
                         1000 * r["mean_ms"][k], 1000 * r["p50_ms"][k], 1000 * r["p90_ms"][k]])
    verdict = []
    for r in results:
        ok = (r["speedup"] >= SPEEDUP_TARGET, r["drop_points"] <= 100 * DROP_TARGET,
              r["no_exit_overhead"] <= OVERHEAD_TARGET)
        verdict.append([r["label"], f"{r['speedup']:.2f}x", f"{r['drop_points']:+.1f}",
                        f"{100 * r['no_exit_overhead']:+.1f}% ({100 * r['split_only_overhead']:+.1f}% without heads)",
                        " / ".join(f"{100 * s:.1f}%" for s in r["exit_share"]),
                        ", ".join(f"{t:.3f}" for t in r["thresholds"]),
                        "met" if all(ok) else "not met: " + ", ".join(
                            n for n, good in zip(("speedup", "accuracy", "overhead"), ok, strict=True) if not good)])
    md = "\n\n".join([
        f"Exits after conv blocks 1 and 2; heads = fixed average pool to 7x7 + linear, distilled from the final "
        f"head (backbone frozen). Thresholds chosen on the 500 calibration images for <= {100 * MAX_DROP:.1f} "
        f"points drop; measured on {results[0]['images']} held-out images, batch 1, one thread, "
        f"{results[0]['rounds']} interleaved rounds; mean us = mean over images of each image's fastest round "
        f"(p50/p90 over all calls). Every run calls onnxruntime the same way: input and outputs bound once to "
        f"batch-1 buffers (I/O binding), the stages chained through them.",
        md_table(["model", "run", "accuracy %", "avg MACs", "mean us", "p50 us", "p90 us"], rows),
        md_table(["model", "speedup (mean)", "accuracy drop (points)", "staged cost, no exit",
                  "exit share (exit 1 / exit 2 / full)", "thresholds", f"done-when (>= {SPEEDUP_TARGET}x, "
                  f"<= {100 * DROP_TARGET:.1f} pt, <= {100 * OVERHEAD_TARGET:.0f}%)"], verdict),
        "The no-exit cost is measured, not modelled: 'split, no heads' runs the bare backbone stages one "
        "onnxruntime session after another (what staging costs by itself); 'staged, no exit' adds the exit heads "
        "and the confidence test between stages. On the ~40 us example model each boundary's extra call is a large "
        "share of the whole inference; the 4x-wide model shows how much of it remains when compute dominates.",
    ])
    return CaseResult("early_exit", "Early exit: staged MNIST CNN, average latency vs the full model", md,
                      {"results": results, "max_drop_validation": MAX_DROP})
