"""Budget-driven architecture search over the lightweight family (`edgekiln search-arch`).

1. **Enumerate** the space: family x width multiplier x depth (blocks) x input resolution x kernel.
2. **Estimate before training**: build each candidate, export it to ONNX, analyse it (parameters,
   MACs, peak live activations) and estimate flash, RAM and latency on the device profile as an
   int8 model (``edgekiln.targets.fit``). Candidates that cannot fit are dropped untrained.
3. **Train the promising ones briefly**: the fitting candidates not dominated on (capacity up,
   estimated latency down, RAM down), spread evenly over the latency range, a few epochs each;
   accuracy on a validation split carved from the training data (the evaluation data is kept
   for the final number).
4. **Pareto set** of the trained candidates on (validation accuracy up, latency down, RAM down),
   and the **best model that fits**: the most accurate, retrained longer on all training data,
   quantized to int8 and checked again against the profile with the real int8 file (for
   microcontrollers: the C backend's static memory plan).

The input resolution is part of the architecture: a candidate at 20x20 is trained on images
resized (area interpolation) to 20x20 and the run folder's data files are written at the selected
resolution, so the device must feed images of that size.
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import BudgetNotMet, EdgekilnError

FAMILIES = ("ds_cnn", "mobilenet_v1_style", "mobilenet_v2_style", "squeezenet_style")


@dataclass(frozen=True, kw_only=True)
class ArchSpace:
    """The grid searched. ``resolution`` empty: the data's own size only."""

    families: tuple[str, ...] = ("ds_cnn", "mobilenet_v1_style", "mobilenet_v2_style")
    width: tuple[float, ...] = (0.25, 0.5, 1.0)      # width multiplier (ds_cnn: 64 channels at 1.0)
    depth: tuple[int, ...] = (2, 4, 6)               # blocks (clipped to what the family has)
    resolution: tuple[int, ...] = ()                 # input side in pixels, e.g. (20, 28)
    kernel: tuple[int, ...] = (3, 5)                 # depthwise / expand kernel size

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise EdgekilnError(f"unknown architecture family {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
        if any(w <= 0 for w in self.width) or any(d < 1 for d in self.depth) or any(k % 2 == 0 for k in self.kernel):
            raise EdgekilnError("width multipliers must be > 0, depths >= 1 and kernel sizes odd")
        if any(r < 8 for r in self.resolution):
            raise EdgekilnError("input resolutions must be at least 8 pixels")


@dataclass(frozen=True, kw_only=True)
class ArchBudget:
    target: str = "cortex-m4"
    max_ram_bytes: int | None = None       # default: the profile's RAM
    max_flash_bytes: int | None = None     # default: the profile's flash
    max_latency_ms: float | None = None    # estimated on the target (int8)


@dataclass(frozen=True, kw_only=True)
class ArchSearchConfig:
    space: ArchSpace = field(default_factory=ArchSpace)
    budget: ArchBudget = field(default_factory=ArchBudget)
    candidates: int = 6           # how many promising candidates are trained briefly
    epochs: int = 3               # brief training of each candidate
    final_epochs: int = 20        # the selected architecture, retrained on all training data
    val_fraction: float = 0.15    # validation split carved from the training data for the ranking
    seed: int = 0
    augment: bool = True          # small random affine transforms while training (images)


@dataclass
class ArchCandidate:
    number: int
    family: str
    kwargs: dict[str, Any]
    resolution: int
    params: int = 0
    macs: int = 0
    flash_bytes: int = 0
    ram_bytes: int = 0
    latency_ms_target_est: float = 0.0
    fits: bool = False
    violations: list[str] = field(default_factory=list)
    trained: bool = False
    val_accuracy: float | None = None
    latency_ms_host: float | None = None
    train_seconds: float | None = None

    @property
    def label(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.kwargs.items() if k not in ("input_size", "in_channels",
                                                                                 "num_classes"))
        return f"{self.family}({args}) @{self.resolution}px"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


@dataclass
class ArchSearchResult:
    candidates: list[ArchCandidate]
    pareto: list[ArchCandidate]
    best: ArchCandidate
    final: dict[str, Any]          # the selected model retrained: files, accuracy fp32/int8, real fit
    seconds: float
    phases: dict[str, float] = field(default_factory=dict)   # seconds: estimate, train, final


def builder_kwargs(family: str, width: float, depth: int, kernel: int, resolution: int, in_channels: int,
                   num_classes: int) -> dict[str, Any]:
    """The zoo builder's keyword arguments for one point of the space."""
    common = {"in_channels": in_channels, "num_classes": num_classes, "input_size": resolution, "kernel_size": kernel}
    if family == "ds_cnn":
        return {**common, "channels": max(8, int(round(64 * width / 8)) * 8), "blocks": depth}
    limit = 6
    return {**common, "width_mult": width, "blocks": min(depth, limit)}


def enumerate_space(space: ArchSpace, input_shape: tuple[int, ...], num_classes: int) -> list[ArchCandidate]:
    """Every distinct point of the grid (depths a family cannot take collapse onto its maximum)."""
    in_channels, side = input_shape[1], input_shape[-1]
    resolutions = space.resolution or (side,)
    seen, out = set(), []
    for family, width, depth, res, kernel in itertools.product(space.families, space.width, space.depth,
                                                               resolutions, space.kernel):
        kwargs = builder_kwargs(family, width, depth, kernel, res, in_channels, num_classes)
        key = (family, tuple(sorted(kwargs.items())))
        if key not in seen:
            seen.add(key)
            out.append(ArchCandidate(number=len(out), family=family, kwargs=kwargs, resolution=res))
    return out


def build(cand: ArchCandidate) -> Any:
    from edgekiln.models.zoo import build as zoo_build

    return zoo_build(cand.family, **cand.kwargs)


def estimate(cand: ArchCandidate, profile: Any, budget: ArchBudget) -> ArchCandidate:
    """Fill flash/RAM/latency estimates for the int8 model on ``profile`` (no training)."""
    import torch

    from edgekiln.models.analysis import analyze
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.targets.fit import estimate_fit

    torch.manual_seed(0)
    model = build(cand).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_to_onnx(model, model.input_shape, path)
        info = analyze(path)
    cand.params, cand.macs = int(info.params), int(info.macs)
    precision = "int8" if "int8" in profile.precisions else "fp32"
    scale = 4 if precision == "int8" else 1
    # NOTE: int8 weights are 1 byte, but int32 biases stay 4: count biases at full size.
    bias_bytes = sum(int(m.bias.numel()) * 4 for m in model.modules() if getattr(m, "bias", None) is not None
                     and isinstance(m.bias, torch.Tensor))
    weight_bytes = (info.weight_bytes - bias_bytes) // scale + bias_bytes
    fit = estimate_fit(profile, weight_bytes=weight_bytes, peak_activation_bytes=info.peak_activation_bytes // scale,
                       io_bytes=info.io_bytes // scale, macs=info.macs, precision=precision,
                       max_latency_ms=budget.max_latency_ms, max_ram_bytes=budget.max_ram_bytes,
                       max_flash_bytes=budget.max_flash_bytes)
    cand.flash_bytes = int(fit.metrics["flash"].value or 0)
    cand.ram_bytes = int(fit.metrics["ram"].value or 0)
    cand.latency_ms_target_est = float(fit.metrics["latency_ms"].value or 0.0)
    cand.violations = [v for v in fit.exceeded if not v.startswith("energy")]
    cand.fits = not cand.violations
    return cand


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` dominates ``b`` when it is no worse everywhere and better somewhere (all minimized)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def front(items: Sequence[Any], key: Callable[[Any], Sequence[float]]) -> list[Any]:
    """The items no other item dominates on ``key`` (every objective minimized).

    >>> front([(1, 5), (2, 2), (3, 3)], key=lambda p: p)
    [(1, 5), (2, 2)]
    """
    keys = [key(i) for i in items]
    return [i for i, k in zip(items, keys, strict=True) if not any(_dominates(o, k) for o in keys if o is not k)]


def promising(fitting: Sequence[ArchCandidate], k: int) -> list[ArchCandidate]:
    """``k`` candidates from the pre-training front (capacity = MACs x params up, latency and RAM
    down), spread evenly over its latency range; the front is topped up by MACs if it is small."""
    if k >= len(fitting):
        return list(fitting)
    pre = front(fitting, key=lambda c: (-math.log(c.macs * max(c.params, 1)), c.latency_ms_target_est, c.ram_bytes))
    pre = sorted(pre, key=lambda c: c.latency_ms_target_est)
    if len(pre) < k:
        rest = sorted((c for c in fitting if c not in pre), key=lambda c: -c.macs)
        return sorted(pre + rest[:k - len(pre)], key=lambda c: c.latency_ms_target_est)
    idx = sorted({round(i * (len(pre) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [len(pre) - 1]
    return [pre[i] for i in idx]


def resize(x: np.ndarray, side: int) -> np.ndarray:
    """NCHW images to ``side`` x ``side`` (area interpolation: an average over each output pixel)."""
    import torch
    from torch.nn import functional as F  # noqa: N812

    if x.shape[-1] == side and x.shape[-2] == side:
        return x
    out = F.interpolate(torch.from_numpy(np.ascontiguousarray(x, np.float32)), size=(side, side), mode="area")
    return out.numpy()


def split_validation(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """A stratified validation split of the training data (fixed by ``seed``)."""
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:max(1, int(round(fraction * (y == c).sum())))]
                          for c in np.unique(y)])
    mask = np.zeros(len(y), bool)
    mask[val] = True
    return x[~mask], y[~mask], x[mask], y[mask]


def _train(cand: ArchCandidate, x: np.ndarray, y: np.ndarray, epochs: int, config: ArchSearchConfig,
           quiet: bool, description: str) -> Any:
    import torch

    from edgekiln.models.training import train_classifier

    torch.manual_seed(config.seed)
    model = build(cand)
    train_classifier(model, x, y, epochs=epochs, lr=3e-3, seed=config.seed, quiet=quiet,
                     augment=config.augment and x.ndim == 4, description=description)
    return model.eval()


def _host_latency(model: Any, work: Path, runs: int = 100) -> float:
    from edgekiln.execution.timing import benchmark
    from edgekiln.models.torch_export import export_to_onnx

    path = work / "candidate.onnx"
    export_to_onnx(model, model.input_shape, path)
    return float(benchmark(path, runs=runs, warmup=min(30, runs)).latency_ms["p50"])


def search_architecture(train_npz: str | Path, eval_npz: str | Path, out: str | Path, config: ArchSearchConfig, *,
                        calib_npz: str | Path | None = None, quiet: bool = False) -> ArchSearchResult:
    """Run the search (module docstring) and write the selected model's files into ``out``.

    Raises :class:`BudgetNotMet` (exit 3) when no point of the space fits the budget.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgekiln.execution.feeds import load_npz
    from edgekiln.models.training import evaluate_accuracy
    from edgekiln.targets.profiles import load_profile

    start = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, evald = load_npz(train_npz), load_npz(eval_npz)
    for name, d in (("train", train), ("eval", evald)):
        if "y" not in d or d["x"].ndim != 4:
            raise EdgekilnError(f"search-arch: the {name} data needs NCHW images 'x' and labels 'y'")
    num_classes = int(max(train["y"].max(), evald["y"].max())) + 1
    profile = load_profile(config.budget.target)
    cands = enumerate_space(config.space, (1, *train["x"].shape[1:]), num_classes)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, disable=quiet, transient=False) as bar:
        task = bar.add_task("estimate cost on " + profile.name, total=len(cands))
        for c in cands:
            estimate(c, profile, config.budget)
            bar.advance(task)
    phases = {"estimate": round(time.monotonic() - start, 1)}
    fitting = [c for c in cands if c.fits]
    if not fitting:
        closest = min(cands, key=lambda c: c.ram_bytes)
        raise BudgetNotMet(f"no architecture in the space fits {profile.name}: the smallest ({closest.label}) "
                           f"needs {'; '.join(closest.violations)}")
    chosen = promising(fitting, config.candidates)
    tx, ty, vx, vy = split_validation(train["x"], train["y"], config.val_fraction, config.seed)
    work = out / "candidates"
    work.mkdir(exist_ok=True)
    with Progress(*columns, disable=quiet, transient=False) as bar:
        task = bar.add_task(f"train {len(chosen)} promising candidates", total=len(chosen))
        for c in chosen:
            t0 = time.monotonic()
            model = _train(c, resize(tx, c.resolution), ty, config.epochs, config, True, f"candidate {c.number}")
            c.val_accuracy = evaluate_accuracy(model, resize(vx, c.resolution), vy)
            c.train_seconds = round(time.monotonic() - t0, 2)
            c.latency_ms_host = _host_latency(model, work)
            c.trained = True
            bar.advance(task)
    phases["train_candidates"] = round(time.monotonic() - start - phases["estimate"], 1)
    trained = [c for c in cands if c.trained]
    pareto = sorted(front(trained, key=lambda c: (-(c.val_accuracy or 0.0), c.latency_ms_target_est, c.ram_bytes)),
                    key=lambda c: c.latency_ms_target_est)
    best = max(trained, key=lambda c: (c.val_accuracy or 0.0, -c.latency_ms_target_est, -c.number))
    final = finalize(best, train, evald, load_npz(calib_npz) if calib_npz else None, out, config, profile, quiet)
    phases["final"] = round(time.monotonic() - start - phases["estimate"] - phases["train_candidates"], 1)
    return ArchSearchResult(cands, pareto, best, final, round(time.monotonic() - start, 1), phases)


def finalize(best: ArchCandidate, train: dict[str, np.ndarray], evald: dict[str, np.ndarray],
             calib: dict[str, np.ndarray] | None, out: Path, config: ArchSearchConfig, profile: Any,
             quiet: bool) -> dict[str, Any]:
    """Retrain the selected architecture on all training data, export FP32 and int8, check the real
    int8 file against the budget, and write the run folder's model and data files."""
    import io

    import torch

    from edgekiln.fileio import atomic_save_npz, atomic_write_bytes
    from edgekiln.models.analysis import analyze
    from edgekiln.models.metrics import evaluate
    from edgekiln.models.torch_export import export_to_onnx
    from edgekiln.passes.quantize import QuantizeConfig, quantize_model
    from edgekiln.search.trial import memory_plan_bytes
    from edgekiln.targets.fit import estimate_fit

    res = best.resolution
    t0 = time.monotonic()
    model = _train(best, resize(train["x"], res), train["y"], config.final_epochs, config, quiet, "final training")
    seconds = round(time.monotonic() - t0, 1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    atomic_write_bytes(out / "model.pt", buf.getvalue())
    export_to_onnx(model, model.input_shape, out / "model.onnx", input_name="input", output_name="logits")
    cal_x = calib["x"] if calib is not None else train["x"][:500]
    cal_y = calib["y"] if calib is not None and "y" in calib else train["y"][:len(cal_x)]
    atomic_save_npz(out / "eval.npz", x=resize(evald["x"], res), y=evald["y"])
    atomic_save_npz(out / "calib.npz", x=resize(cal_x, res), y=cal_y)
    atomic_save_npz(out / "train.npz", x=resize(train["x"], res), y=train["y"])
    q = quantize_model(out / "model.onnx", QuantizeConfig(calibration="auto"), out / "int8", calib=out / "calib.npz")
    info = analyze(q.path)
    arena = memory_plan_bytes(q.path, "onnx-qdq", profile)
    b = config.budget
    fit = estimate_fit(profile, weight_bytes=info.weight_bytes,
                       peak_activation_bytes=arena if arena is not None else info.peak_activation_bytes,
                       io_bytes=0 if arena is not None else info.io_bytes, macs=info.macs, precision="int8",
                       max_latency_ms=b.max_latency_ms, max_ram_bytes=b.max_ram_bytes, max_flash_bytes=b.max_flash_bytes)
    fit_dict = fit.to_dict()
    fits = all(fit_dict[k]["ok"] for k in ("flash", "ram", "latency_ms"))
    return {"seconds": seconds, "epochs": config.final_epochs, "accuracy_fp32": evaluate(out / "model.onnx",
                                                                                          out / "eval.npz"),
            "accuracy_int8": evaluate(q.path, out / "eval.npz"), "int8_model": str(q.path.relative_to(out)),
            "int8_bytes": q.path.stat().st_size, "fp32_bytes": (out / "model.onnx").stat().st_size,
            "ram_source": "C backend memory plan" if arena is not None else "analysis estimate",
            "fit": fit_dict, "fits": fits, "input_shape": list(model.input_shape)}
