"""Every docstring example in ``src/edgekiln`` runs, in ``make test``.

One test per module. A module whose optional dependency is not installed is skipped with the
missing name as the reason; any other import error fails. Examples marked ``# doctest: +SKIP``
are allowed only where they need a file or a server that a docstring cannot make; the count is
capped so the marker does not spread.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "edgekiln"
MODULES = sorted(".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
                 for p in SRC.rglob("*.py") if p.name != "__main__.py")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
# Docstrings whose examples need a model file, a bundle, a server or a tool a docstring cannot
# make (counted as runs of consecutive skipped lines). Lower it when one becomes runnable.
MAX_SKIPPED = 25


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("edgekiln"):
            pytest.skip(f"{name} needs {exc.name}, which is not installed")
        raise


class _Runner(doctest.DocTestRunner):
    """Records an example that stops on an optional dependency that is not installed."""

    missing: str | None = None

    def report_unexpected_exception(self, out, test, example, exc_info):
        exc = exc_info[1]
        if isinstance(exc, ModuleNotFoundError) and exc.name and not exc.name.startswith("edgekiln"):
            self.missing = self.missing or exc.name
        super().report_unexpected_exception(out, test, example, exc_info)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    module = _import(name)
    monkeypatch.chdir(tmp_path)   # examples that write files write them here
    runner = _Runner(optionflags=FLAGS)
    failures: list[str] = []
    # NOTE: the finder keeps only objects defined in `module`, so a re-exported name runs once.
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        out: list[str] = []
        result = runner.run(test, out=out.append, clear_globs=True)
        if result.failed:
            failures.append("".join(out))
    if failures and runner.missing:
        pytest.skip(f"an example in {name} needs {runner.missing}, which is not installed")
    assert not failures, "\n".join(failures)


def test_skipped_examples_are_few_and_commented_out_examples_none():
    skipped, commented = [], []
    for path in sorted(SRC.rglob("*.py")):
        previous = -1
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"(>>>|\.\.\.) .*doctest: \+SKIP", line):
                if i != previous + 1:
                    skipped.append(f"{path.relative_to(SRC.parent)}:{i}")
                previous = i
            if re.match(r"\s*>>> #", line):
                commented.append(f"{path.relative_to(SRC.parent)}:{i}")
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} skipped examples (at most {MAX_SKIPPED}):\n" + \
        "\n".join(skipped)
    assert not commented, "examples commented out instead of run (write them as runnable or as prose):\n" + \
        "\n".join(commented)
