"""`make bench`: run the benchmark cases and (re)write BENCHMARKS.md and bench/results/*.json.

    python -m benchmarks.suite [--quick] [--only NAME ...]      (from the repository root)

Each case is a function returning a :class:`CaseResult`; :data:`CASES` lists them. Only the
sections of the cases that ran are replaced in BENCHMARKS.md (between ``<!-- case:NAME -->``
markers), so cases can be re-run one at a time. Thread counts are pinned to 1 before numpy or
torch is imported (the process re-executes itself if they were not set).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PINNED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@dataclass
class CaseResult:
    name: str
    title: str
    markdown: str
    raw: dict[str, Any] = field(default_factory=dict)


def _cases() -> dict[str, Callable[[Path, bool], CaseResult]]:
    from benchmarks import (
        cases_compile,
        cases_compress,
        cases_corpus,
        cases_early_exit,
        cases_federated,
        cases_fleet,
        cases_learn,
        cases_mcu_kernels,
        cases_optimize_corpus,
        cases_optimize_minilm,
        cases_placement,
        cases_quant,
        cases_scoreboard,
        cases_split,
        cases_transfer,
    )

    return {
        "quantization": cases_quant.quantization_cnn,
        "minilm": cases_quant.quantization_minilm,
        "pruning": cases_compile.pruning,
        "distillation": cases_compress.distillation,
        "compress_stack": cases_compress.compress_stack,
        "search_arch": cases_compress.search_arch,
        "mcu": cases_compile.mcu,
        "mcu_kernels": cases_mcu_kernels.mcu_kernels,
        "optimize": cases_compile.optimize_mnist,
        "optimize_minilm": cases_optimize_minilm.optimize_minilm,
        "runtime": cases_compile.runtime_adaptive,
        "early_exit": cases_early_exit.early_exit,
        "split": cases_split.split_netns,
        "fleet": cases_fleet.fleet_load,
        "transfer": cases_transfer.transfer,
        "placement": cases_placement.placement,
        "learn": cases_learn.learn,
        "federated": cases_federated.federated,
        "corpus": cases_corpus.run_corpus,
        "scoreboard": cases_scoreboard.scoreboard,
        "optimize_corpus": cases_optimize_corpus.optimize_corpus,
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("onnxruntime", "openvino", "nncf", "torch", "onnx", "numpy", "ai-edge-litert", "tflite-micro"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "packages": versions}


def replace_section(text: str, name: str, body: str) -> str:
    """Replace (or append) the section of case ``name`` in BENCHMARKS.md text."""
    start, end = f"<!-- case:{name} -->", f"<!-- /case:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip() + "\n\n" + block + "\n"


def header(info: dict[str, Any], command: str) -> str:
    pk = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    return "\n".join([
        "# edgekiln benchmarks", "",
        f"Written by `make bench`; each section ends with its case's run time and date (last update: `{command}` "
        f"on {_dt.date.today().isoformat()}).", "",
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}. Packages: {pk}.", "",
        "Method: batch 1, one thread everywhere (`OMP_NUM_THREADS=1`, onnxruntime intra/inter-op 1, OpenVINO "
        "`INFERENCE_NUM_THREADS=1` with `INFERENCE_PRECISION_HINT=f32`), warm-up before timing, p50 and p90 of "
        "per-call wall time. This machine is shared and noisy: compare the ratios measured in the same run, not "
        "absolute times across runs. Raw numbers: `bench/results/<case>.json`.", "",
    ])


def main(argv: list[str] | None = None) -> int:
    if any(os.environ.get(k) != v for k, v in PINNED.items()):
        os.environ.update(PINNED)
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.suite", *(argv or sys.argv[1:])])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and trials (a smoke run)")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run")
    parser.add_argument("--root", default=".", help="repository root (BENCHMARKS.md and bench/results/ go here)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    cases = _cases()
    chosen = args.only or list(cases)
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        print(f"unknown case(s): {', '.join(unknown)}; known: {', '.join(cases)}", file=sys.stderr)
        return 2
    results_dir = root / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    work = root / "runs" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    info = machine()
    command = "make bench" if not args.only else f"python -m benchmarks.suite --only {' '.join(chosen)}"
    md_path = root / "BENCHMARKS.md"
    from edgekiln.fileio import atomic_write_json, atomic_write_text

    for name in chosen:
        print(f"== {name}", flush=True)
        start = time.monotonic()
        res = cases[name](work / name, args.quick)
        seconds = time.monotonic() - start
        res.raw.update({"case": name, "seconds": round(seconds, 1), "machine": info, "quick": args.quick,
                        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")})
        atomic_write_json(results_dir / f"{name}.json", res.raw)
        body = f"## {res.title}\n\n{res.markdown.strip()}\n\n*Case `{name}`, {seconds:.0f} s" + \
               (", quick mode" if args.quick else "") + f", {res.raw['date']}.*"
        # NOTE: read again at each write: another suite run (another case) may have written its section meanwhile
        text = md_path.read_text() if md_path.is_file() else ""
        text = re.sub(r"^# edgekiln benchmarks.*?(?=<!-- case:|\Z)", "", text, flags=re.S)
        text = replace_section(text, name, body)
        atomic_write_text(md_path, header(info, command) + text.lstrip())
        print(res.markdown, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
