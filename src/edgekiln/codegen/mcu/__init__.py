"""Measurement on an emulated Cortex-M: the generated C library cross-compiled into a bare-metal
program, run under ``qemu-system-arm`` with edgekiln's instruction-counting TCG plugin.

:func:`run_on_qemu` runs a library on given int8 inputs (outputs, instructions per inference and per
step, stack, sizes); :func:`edgekiln.codegen.mcu.measure.measure_mcu` is ``edgekiln measure-mcu``.
"""

from edgekiln.codegen.mcu.runner import QemuRun, run_on_qemu
from edgekiln.codegen.mcu.toolchain import CPUS, OPT_LEVELS, tools_missing

__all__ = ["CPUS", "OPT_LEVELS", "QemuRun", "run_on_qemu", "tools_missing"]
