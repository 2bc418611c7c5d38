"""`edgekiln bench`: latency percentiles, throughput, peak RSS increase and size of a model
on one runtime, measured the same way for every runtime.

Method: load the session (RSS measured before and peak after), warm up ``warmup`` calls, then
time ``runs`` calls one by one with ``time.perf_counter_ns``. Percentiles use linear
interpolation between order statistics (numpy's default). Threads are set explicitly.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError


@dataclass
class BenchResult:
    runtime: str
    runtime_version: str
    model: str
    latency_ms: dict[str, float]
    throughput: float              # inferences per second (batch * 1000 / mean ms)
    model_bytes: int
    peak_rss_bytes: int
    threads: int
    batch: int
    runs: int
    warmup: int
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not samples:
            d.pop("samples_ms")
        return d


def latency_stats(samples_ms: np.ndarray) -> dict[str, float]:
    """min/mean/std/p50/p90/p99 in ms.

    >>> latency_stats(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))["p90"]
    4.6
    """
    s = np.asarray(samples_ms, dtype=np.float64)
    return {"min": float(s.min()), "mean": float(s.mean()), "std": float(s.std()),
            "p50": float(np.percentile(s, 50)), "p90": float(np.percentile(s, 90)), "p99": float(np.percentile(s, 99)),
            "max": float(s.max())}


def model_size(path: str | Path) -> int:
    """File size, plus an ONNX external-data side file (``X.onnx.data``) or OpenVINO ``.bin``."""
    p = Path(path)
    size = p.stat().st_size
    for side in (p.with_suffix(p.suffix + ".data"), p.with_suffix(".bin")):
        if side.is_file() and side != p:
            size += side.stat().st_size
    return size


def make_inputs(session: Any, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, shape, dtype in zip(session.input_names, session.input_shapes, session.input_dtypes, strict=True):
        dims = list(shape)
        if dims and dims[0] is None:
            dims[0] = batch
        if any(d is None for d in dims):
            raise EdgekilnError(f"input '{name}' has dynamic dimensions {shape}; give a fixed shape when exporting")
        if np.issubdtype(dtype, np.integer):
            feeds[name] = rng.integers(0, 100, size=dims).astype(dtype)
        else:
            feeds[name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def benchmark(model_path: str | Path, *, runtime: str = "onnxruntime", threads: int = 1, batch: int = 1,
              warmup: int = 50, runs: int = 200, progress: bool = False, inputs: dict[str, np.ndarray] | None = None,
              seed: int = 0) -> BenchResult:
    """Benchmark one model on one runtime.

    >>> r = benchmark("model.onnx", runs=100)    # doctest: +SKIP
    >>> r.latency_ms["p50"], r.peak_rss_bytes     # doctest: +SKIP
    """
    from edgekiln.bench.memory import peak_rss_bytes, reset_peak, rss_bytes
    from edgekiln.bench.runtimes import load_session, version

    path = Path(model_path)
    if not path.is_file():
        raise EdgekilnError(f"{path}: file not found")
    if runs < 1 or warmup < 0 or threads < 1 or batch < 1:
        raise EdgekilnError("bench: runs, threads and batch must be >= 1 and warmup >= 0")
    reset_peak()
    before = rss_bytes()
    session = load_session(path, runtime, threads=threads)
    feeds = inputs if inputs is not None else make_inputs(session, batch, seed)
    for _ in range(warmup):
        session.run(feeds)
    samples = np.empty(runs)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn(f"[bold]bench {runtime}"), BarColumn(), MofNCompleteColumn(), disable=not progress,
                  transient=True) as bar:
        task = bar.add_task("", total=runs)
        for i in range(runs):
            start = time.perf_counter_ns()
            session.run(feeds)
            samples[i] = (time.perf_counter_ns() - start) / 1e6
            if progress and i % 10 == 0:
                bar.update(task, completed=i + 1)
    stats = latency_stats(samples)
    return BenchResult(runtime=runtime, runtime_version=version(runtime), model=str(path), latency_ms=stats,
                       throughput=batch * 1000.0 / stats["mean"], model_bytes=model_size(path),
                       peak_rss_bytes=max(0, peak_rss_bytes() - before), threads=threads, batch=batch, runs=runs,
                       warmup=warmup, samples_ms=samples.tolist())


def compare(model_path: str | Path, runtimes: list[str], **kwargs: Any) -> list[BenchResult | dict[str, Any]]:
    """Benchmark on several runtimes; unavailable or incompatible ones come back as
    ``{"runtime": name, "skipped": reason}``."""
    from edgekiln.bench.runtimes import available_runtimes, skip_reason

    avail = available_runtimes()
    out: list[BenchResult | dict[str, Any]] = []
    for name in runtimes:
        reason = skip_reason(name, model_path, avail)
        if reason:
            out.append({"runtime": name, "skipped": reason})
            continue
        out.append(benchmark(model_path, runtime=name, **kwargs))
    return out
