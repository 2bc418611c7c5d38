"""Build a generated C library (``PREFIX.c``, ``ek_kernels.c``, ``main.c``) with the host gcc and run it
on int8 inputs: the golden tests' host check of the C kernels."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from edgekiln.codegen.verify import HOST_CFLAGS


def host_run(lib: Path, q: np.ndarray, prefix: str = "k") -> np.ndarray:
    """Outputs (one row per input) of the library in ``lib`` on the int8 inputs ``q``, built -pedantic."""
    exe = lib / f"{prefix}_host"
    subprocess.run(["gcc", *HOST_CFLAGS, "-pedantic", "-o", str(exe), str(lib / f"{prefix}.c"),
                    str(lib / "ek_kernels.c"), str(lib / "main.c")], check=True, capture_output=True, text=True)
    q.astype(np.int8).tofile(lib / "in.bin")
    subprocess.run([str(exe), str(lib / "in.bin"), str(lib / "out.bin")], check=True, capture_output=True)
    return np.fromfile(lib / "out.bin", np.int8).reshape(len(q), -1)
