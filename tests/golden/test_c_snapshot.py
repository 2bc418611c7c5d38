"""Golden: the generated C for a tiny checked-in QDQ model matches the snapshot byte for byte.

A generator change that alters the output must update the snapshot deliberately:
``EDGEKILN_UPDATE_SNAPSHOTS=1 pytest tests/golden/test_c_snapshot.py`` rewrites the files.
The QDQ model itself is checked in, so an onnxruntime upgrade cannot move the snapshot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgekiln.codegen.emit import KERNEL_FILES, kernel_source, render_library
from edgekiln.codegen.fuse import lower_for_c
from edgekiln.codegen.planner import plan_memory
from edgekiln.codegen.verify import HOST_CFLAGS

SNAP = Path(__file__).parent / "snapshots"
MODEL = SNAP / "tiny_qdq.onnx"  # made by edgekiln.codegen.testmodels.tiny_qdq_model(seed=0)
GENERATED = ("tiny.h", "tiny.c", "CMakeLists.txt", "main.c")


def _render():
    graph = lower_for_c(MODEL)  # what `export --to c` emits by default (conv->pool fused)
    return render_library(graph, plan_memory(graph), "tiny")


def test_generated_c_matches_snapshot():
    files = _render()
    if os.environ.get("EDGEKILN_UPDATE_SNAPSHOTS") == "1":
        for name in GENERATED:
            (SNAP / name).write_text(files[name], encoding="utf-8")
    for name in GENERATED:
        expected = (SNAP / name).read_text(encoding="utf-8")
        assert files[name] == expected, (f"{name} differs from tests/golden/snapshots/{name}; if the change is "
                                         "intended, rerun with EDGEKILN_UPDATE_SNAPSHOTS=1")
    for name in KERNEL_FILES:
        assert files[name] == kernel_source(name), f"{name} must be copied verbatim"


def test_generation_is_deterministic():
    assert _render() == _render()


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a host C compiler (gcc)")
def test_snapshot_compiles_warning_free(tmp_path):
    for name, text in _render().items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    r = subprocess.run(["gcc", *HOST_CFLAGS, "-pedantic", "-c", "tiny.c", "ek_kernels.c", "main.c"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
