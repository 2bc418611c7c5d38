"""Run a generated C library on an emulated Cortex-M and count its instructions: :func:`run_on_qemu`.

The library is cross-compiled with ``arm-none-eabi-gcc`` into a bare-metal program (the harness in
``ek_mcu_main.c``, the startup in ``ek_mcu_startup.c``, the linker script ``ek_mps2.ld``) that runs
each embedded input, writes the outputs back through semihosting and exits with a status. QEMU runs
it with edgekiln's counting plugin (``ek_count_plugin.c``), which records the executed-instruction
count at every call of the harness's marker function: before and after each inference, and in the
per-step build after each step of the model. Counts are deterministic: the same program gives the
same numbers on every run and every machine with the same QEMU and compiler.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.codegen.mcu.harness import OUTPUT_FILE, render_data_header, write_step_source
from edgekiln.codegen.mcu.toolchain import (
    CPUS,
    build_plugin,
    cflags,
    compile_program,
    elf_sizes,
    linked_sizes,
    package_file,
    require_tools,
    symbol_address,
)
from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_write_text

MARKER = "ek_mcu_mark"
#: host sources of an exported folder that are not part of the library.
HOST_ONLY_SOURCES = ("main.c",)
_SUMMARY = re.compile(r"ek_mcu inferences=(\d+) mismatched=(\d+) stack_bytes=(\d+) arena_bytes=(\d+) status=(\d+)")
#: what the harness's exit status means (ek_mcu_main.c, ek_mcu_startup.c).
_STATUS = {4: "the program faulted (HardFault, bus or usage fault)", 5: "the stack overflowed its 256 KB",
           6: "the outputs could not be written to the host"}


@dataclass
class QemuRun:
    """What :func:`run_on_qemu` measured."""

    cpu: str
    board: str                        # the QEMU machine (-M)
    opt: str
    outputs: np.ndarray               # int8 (N, OUTPUT_SIZE), as the device computed them
    instructions: list[int]           # per inference (+5 of the harness: argument set-up, the calls, the marker's return)
    stack_bytes: int                  # deepest stack use of inference 0, from the stack pointer at the call
    arena_bytes: int
    sizes: dict[str, int]             # the library as linked: text (code + constants), data, bss
    objects: dict[str, dict[str, int]]  # per object file: code, rodata, data, bss (+ libgcc helpers)
    elf_sizes: dict[str, int]         # arm-none-eabi-size of the whole program (harness, newlib, test data)
    cflags: list[str]
    mismatched: int | None = None     # inferences whose output differs from ``expected`` (None: none given)
    #: per-step build, inference 0: instructions of each step with code, its schedule index, the return from invoke
    per_step: list[int] | None = None
    step_indices: list[int] | None = None
    step_return: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "outputs"}
        d["n_inferences"] = len(self.instructions)
        return d


def library_prefix(lib_dir: Path) -> str:
    """NAME of the library in ``lib_dir``: ``report.json``'s prefix, else its one ``NAME.h`` with ``NAME_invoke``."""
    from edgekiln.models.run_folder import RunFolder

    run = RunFolder(lib_dir)
    if run.is_run_folder() and run.report().get("prefix"):
        return str(run.report()["prefix"])
    heads = [p.stem for p in sorted(lib_dir.glob("*.h")) if f"{p.stem}_invoke(" in p.read_text(errors="replace")]
    if len(heads) != 1:
        raise EdgekilnError(f"{lib_dir}: not an edgekiln C library (want one NAME.h declaring NAME_invoke, "
                            f"found {len(heads)})")
    return heads[0]


def _header_define(lib_dir: Path, prefix: str, key: str) -> int:
    text = (lib_dir / f"{prefix}.h").read_text(encoding="utf-8")
    m = re.search(rf"#define {prefix.upper()}_{key} (\d+)", text)
    if m is None:
        raise EdgekilnError(f"{lib_dir / (prefix + '.h')}: no {prefix.upper()}_{key}")
    return int(m.group(1))


def _library_sources(lib_dir: Path) -> list[Path]:
    return [p for p in sorted(lib_dir.glob("*.c")) if p.name not in HOST_ONLY_SOURCES]


def _qemu(elf: Path, cpu: str, work: Path, timeout: float) -> tuple[str, int, list[int]]:
    """Run ``elf`` on the board of ``cpu`` with the counting plugin: (stdout, exit status, marker counts)."""
    # NOTE: QEMU runs in ``work``: every path it is given must be absolute (a relative --out failed)
    elf, work = elf.resolve(), work.resolve()
    counts = work / "counts.txt"
    counts.unlink(missing_ok=True)
    plugin = build_plugin()
    cmd = ["qemu-system-arm", "-M", CPUS[cpu].machine, "-nographic", "-monitor", "none", "-serial", "none",
           "-semihosting-config", "enable=on,target=native", "-kernel", str(elf),
           "-plugin", f"{plugin},marker={symbol_address(elf, MARKER):#x},out={counts}"]
    try:
        r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EdgekilnError(f"{elf.name}: qemu-system-arm -M {CPUS[cpu].machine} did not finish within "
                            f"{timeout:.0f} s") from None
    if not counts.is_file():
        raise EdgekilnError(f"qemu-system-arm -M {CPUS[cpu].machine} did not load the counting plugin: "
                            f"{(r.stderr.strip().splitlines() or ['no message'])[-1][:300]}")
    marks = [int(line.split()[2]) for line in counts.read_text().splitlines() if line.startswith("ek_count mark ")]
    return r.stdout + r.stderr, r.returncode, marks


@dataclass(frozen=True)
class _Build:
    """What every build of one :func:`run_on_qemu` call shares."""

    lib_dir: Path
    prefix: str
    cpu: str
    flags: list[str]
    timeout: float


def _build_and_run(b: _Build, sources: list[Path], work: Path, inputs: np.ndarray,
                   expected: np.ndarray | None) -> tuple[Path, dict[str, int], list[int]]:
    """Compile the harness with ``sources`` in ``work``, run it: (ELF, the harness's summary, marker counts)."""
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(work / "ek_mcu_data.h", render_data_header(b.prefix, inputs, expected))
    harness = [package_file("ek_mcu_startup.c"), package_file("ek_mcu_main.c")]
    elf = compile_program([*harness, *sources], [work, b.lib_dir], work / "prog.elf", b.cpu, b.flags)
    out, status, marks = _qemu(elf, b.cpu, work, b.timeout)
    m = _SUMMARY.search(out)
    if status in _STATUS or m is None or status not in (0, 3):
        why = _STATUS.get(status, f"exit status {status}")
        raise EdgekilnError(f"{b.lib_dir}: on {b.cpu} ({CPUS[b.cpu].machine}) {why}: {out.strip()[-300:]}")
    summary = dict(zip(("inferences", "mismatched", "stack_bytes", "arena_bytes", "status"),
                       (int(v) for v in m.groups()), strict=True))
    return elf, summary, marks


def run_on_qemu(c_dir: str | Path, inputs: np.ndarray, *, cpu: str = "cortex-m4", opt: str = "O2",
                expected: np.ndarray | None = None, per_layer: bool = False, timeout: float = 300.0,
                work_dir: str | Path | None = None, defines: Sequence[str] = ()) -> QemuRun:
    """Cross-compile the C library in ``c_dir`` for ``cpu``, run it on ``inputs`` under QEMU, count.

    ``inputs``: int8 ``(N, NAME_INPUT_SIZE)`` in the library's layout (NHWC; see
    :func:`edgekiln.codegen.verify.quantize_inputs`). ``expected`` (same N, ``NAME_OUTPUT_SIZE``) is
    embedded and compared on the device too (``.mismatched``). ``per_layer`` also builds a copy whose
    invoke calls the marker after every step and runs it on input 0 (``.per_step``). ``work_dir``
    keeps the build (ELF, map, generated harness files); by default a temporary folder. ``defines``
    are preprocessor definitions for every file (``["EK_NO_DSP", "N=4"]`` -> ``-DEK_NO_DSP -DN=4``).

    For example ``run_on_qemu("out/c", quantize_inputs(graph, x), cpu="cortex-m4", opt="Os").outputs``
    are the device's outputs, to compare with the reference.
    """
    require_tools()
    lib_dir = Path(c_dir)
    prefix = library_prefix(lib_dir)
    build = _Build(lib_dir, prefix, cpu, cflags(cpu, opt, defines), timeout)
    in_size, out_size = _header_define(lib_dir, prefix, "INPUT_SIZE"), _header_define(lib_dir, prefix, "OUTPUT_SIZE")
    inputs = np.asarray(inputs)
    if inputs.ndim != 2 or inputs.shape[1] != in_size or inputs.dtype != np.int8 or len(inputs) == 0:
        raise EdgekilnError(f"inputs must be int8 (N >= 1, {in_size}); got {inputs.dtype} {inputs.shape}")
    if expected is not None:
        expected = np.asarray(expected, np.int8).reshape(len(inputs), out_size)
    sources = _library_sources(lib_dir)
    with tempfile.TemporaryDirectory(prefix="ek-mcu-") as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        elf, summary, marks = _build_and_run(build, sources, work / "run", inputs, expected)
        n = len(inputs)
        if len(marks) != 2 * n:
            raise EdgekilnError(f"{elf}: the counting plugin saw {len(marks)} marker calls, expected {2 * n}")
        outputs = np.fromfile(work / "run" / OUTPUT_FILE, np.int8)
        if outputs.size != n * out_size:
            raise EdgekilnError(f"{elf}: {outputs.size} output bytes came back, expected {n * out_size}")
        objects = linked_sizes(elf.with_suffix(".map"), [f"{s.stem}.o" for s in sources])
        lib = [v for k, v in objects.items() if k != "libgcc"]
        run = QemuRun(
            cpu=cpu, board=CPUS[cpu].machine, opt=opt, outputs=outputs.reshape(n, out_size),
            instructions=[marks[2 * k + 1] - marks[2 * k] for k in range(n)], stack_bytes=summary["stack_bytes"],
            arena_bytes=summary["arena_bytes"],
            sizes={"text": sum(o["code"] + o["rodata"] for o in lib), "data": sum(o["data"] for o in lib),
                   "bss": sum(o["bss"] for o in lib)},
            objects=objects, elf_sizes=elf_sizes(elf), cflags=build.flags,
            mismatched=summary["mismatched"] if expected is not None else None)
        if per_layer:
            steps_dir = work / "steps"
            src, indices = write_step_source(lib_dir, prefix, steps_dir / "src")
            step_sources = [src if s.name == f"{prefix}.c" else s for s in sources]
            _, _, smarks = _build_and_run(build, step_sources, steps_dir, inputs[:1],
                                          None if expected is None else expected[:1])
            if len(smarks) != len(indices) + 2:
                raise EdgekilnError(f"per-step build: {len(smarks)} marker calls for {len(indices)} steps")
            deltas = np.diff(smarks).tolist()
            run.per_step, run.step_indices, run.step_return = deltas[:-1], indices, deltas[-1]
    return run
