"""The Cortex-M toolchain and QEMU for the tests that run generated C on an emulated Cortex-M: installed
by scripts/system-deps.sh where root and apt-get are available (CI), else the test is skipped with why."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def require_mcu_tools() -> None:
    """Install arm-none-eabi-gcc and qemu-system-arm if missing and possible; skip the test if not."""
    from edgekiln.codegen.mcu import tools_missing

    why = tools_missing()
    if why and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(ROOT / "scripts" / "system-deps.sh")], capture_output=True, timeout=1200)
        why = tools_missing()
        assert why is None, f"scripts/system-deps.sh ran as root with apt-get, still: {why}"
    if why:
        pytest.skip(f"{why}; cannot install here (needs root and apt-get)")
