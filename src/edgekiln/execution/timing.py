"""Timing: one loop for every latency edgekiln reports (`edgekiln bench`, the search's trials,
its final round, the benchmark suite).

Method: warm up ``warmup`` calls, then time calls one by one with ``time.perf_counter_ns``.
Several models are timed round-robin (a few calls of each in turn), so load from other
processes on a shared machine falls on all of them alike. Percentiles use linear interpolation
between order statistics (numpy's default). Threads are set explicitly by the sessions.

>>> calls = {"a": lambda: None, "b": lambda: None}
>>> {k: len(v) for k, v in time_round_robin(calls, rounds=3, warmup=1, per_turn=2).items()}
{'a': 6, 'b': 6}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
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


def latency_stats(samples_ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    """min/mean/std/p50/p90/p99/max in ms.

    >>> latency_stats(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))["p90"]
    4.6
    """
    s = np.asarray(samples_ms, dtype=np.float64)
    return {"min": float(s.min()), "mean": float(s.mean()), "std": float(s.std()),
            "p50": float(np.percentile(s, 50)), "p90": float(np.percentile(s, 90)), "p99": float(np.percentile(s, 99)),
            "max": float(s.max())}


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 0,
               progress: Callable[[int], None] | None = None,
               clock: Callable[[], int] = time.perf_counter_ns) -> np.ndarray:
    """Milliseconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones. ``progress(i)`` is
    called every 10 calls (outside the timed region); ``clock`` returns nanoseconds.

    >>> len(time_calls(lambda: None, runs=5, warmup=2))
    5
    """
    for _ in range(warmup):
        fn()
    samples = np.empty(runs)
    for i in range(runs):
        start = clock()
        fn()
        samples[i] = (clock() - start) / 1e6
        if progress is not None and i % 10 == 0:
            progress(i + 1)
    return samples


def time_round_robin(calls: Mapping[str, Callable[[], Any]], *, rounds: int, warmup: int = 0,
                     per_turn: int = 1, clock: Callable[[], int] = time.perf_counter_ns) -> dict[str, np.ndarray]:
    """Milliseconds per call of every function in ``calls``: each warmed up ``warmup`` times, then
    ``rounds`` rounds in which each takes ``per_turn`` timed calls in turn. ``clock`` returns
    nanoseconds (``time.thread_time_ns`` measures this thread's CPU time instead of wall time)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples = {name: np.empty(rounds * per_turn) for name in calls}
    for r in range(rounds):
        for name, fn in calls.items():
            out = samples[name]
            for k in range(per_turn):
                start = clock()
                fn()
                out[r * per_turn + k] = (clock() - start) / 1e6
    return samples


def time_round_robin_wall_and_cpu(calls: Mapping[str, Callable[[], Any]], *, rounds: int, warmup: int = 0,
                                  per_turn: int = 1) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`time_round_robin` reading two clocks around each call: wall time and this process's
    CPU time (ms). With one-thread runtimes the CPU time is the call's latency on an idle core:
    another process taking the core adds to the wall time only (on this 2-core machine with 5 busy
    processes, MobileNetV3-S on OpenVINO: wall p50 7.0 ms, CPU 2.0 ms, quiet wall 1.7 ms).

    >>> wall, cpu = time_round_robin_wall_and_cpu({"a": lambda: None}, rounds=3)
    >>> len(wall["a"]), len(cpu["a"])
    (3, 3)
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    wall = {name: np.empty(rounds * per_turn) for name in calls}
    cpu = {name: np.empty(rounds * per_turn) for name in calls}
    for r in range(rounds):
        for name, fn in calls.items():
            for k in range(per_turn):
                w0, c0 = time.perf_counter_ns(), time.process_time_ns()
                fn()
                c1, w1 = time.process_time_ns(), time.perf_counter_ns()
                wall[name][r * per_turn + k] = (w1 - w0) / 1e6
                cpu[name][r * per_turn + k] = (c1 - c0) / 1e6
    return wall, cpu


def model_size(path: str | Path) -> int:
    """Bytes of a model file plus its side files: every ONNX external-data file it names, or an
    OpenVINO ``.xml``'s ``.bin``."""
    p = Path(path)
    size = p.stat().st_size
    sides: set[Path] = set()
    if p.suffix == ".xml":
        sides.add(p.with_suffix(".bin"))
    elif p.suffix == ".onnx":
        sides |= _external_files(p)
    return size + sum(s.stat().st_size for s in sides if s.is_file() and s != p)


def _external_files(path: Path) -> set[Path]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX file onnx reads: count only the file itself
        return set()
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors += [a.t for a in node.attribute if a.HasField("t")]
    files = set()
    for t in tensors:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc:
                files.add(path.parent / loc)
    return files


def benchmark(model_path: str | Path, *, runtime: str = "onnxruntime", threads: int = 1, batch: int = 1,
              warmup: int = 50, runs: int = 200, progress: bool = False, inputs: dict[str, np.ndarray] | None = None,
              input_shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0) -> BenchResult:
    """Latency percentiles, throughput, peak RSS increase and size of one model on one runtime.
    Feeds are ``inputs``, else random ones for the session's inputs (``input_shapes`` fixes
    dynamic dimensions; an unknown first dimension is ``batch``).

    >>> import tempfile
    >>> from edgekiln.testing.tiny import tiny_conv_onnx
    >>> r = benchmark(tiny_conv_onnx(tempfile.mkdtemp() + "/m.onnx"), warmup=2, runs=10)
    >>> r.runs, r.latency_ms["p50"] > 0, r.model_bytes > 0
    (10, True, True)
    """
    from edgekiln.execution.feeds import random_feeds, specs_from_session
    from edgekiln.execution.memory import peak_rss_bytes, reset_peak, rss_bytes
    from edgekiln.execution.runtimes import load_session, runtime_version

    path = Path(model_path)
    if not path.is_file():
        raise EdgekilnError(f"{path}: file not found")
    if runs < 1 or warmup < 0 or threads < 1 or batch < 1:
        raise EdgekilnError("bench: runs, threads and batch must be >= 1 and warmup >= 0")
    reset_peak()
    before = rss_bytes()
    session = load_session(path, runtime, threads=threads, input_shapes=input_shapes)
    feeds = inputs if inputs is not None else random_feeds(specs_from_session(session, input_shapes, batch), seed=seed)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn(f"[bold]bench {runtime}"), BarColumn(), MofNCompleteColumn(), disable=not progress,
                  transient=True) as bar:
        task = bar.add_task("", total=runs)
        samples = time_calls(lambda: session.run(feeds), runs, warmup,
                             progress=(lambda i: bar.update(task, completed=i)) if progress else None)
    stats = latency_stats(samples)
    return BenchResult(runtime=runtime, runtime_version=runtime_version(runtime), model=str(path), latency_ms=stats,
                       throughput=batch * 1000.0 / stats["mean"], model_bytes=model_size(path),
                       peak_rss_bytes=max(0, peak_rss_bytes() - before), threads=threads, batch=batch, runs=runs,
                       warmup=warmup, samples_ms=samples.tolist())


def compare(model_path: str | Path, runtimes: Sequence[str], **kwargs: Any) -> list[BenchResult | dict[str, Any]]:
    """:func:`benchmark` on several runtimes; unavailable or incompatible ones come back as
    ``{"runtime": name, "skipped": reason}``."""
    from edgekiln.execution.runtimes import available_runtimes, skip_reason

    avail = available_runtimes()
    out: list[BenchResult | dict[str, Any]] = []
    for name in runtimes:
        reason = skip_reason(name, model_path, avail)
        if reason:
            out.append({"runtime": name, "skipped": reason})
            continue
        out.append(benchmark(model_path, runtime=name, **kwargs))
    return out
