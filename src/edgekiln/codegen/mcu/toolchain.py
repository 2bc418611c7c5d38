"""The tools behind ``measure-mcu``: the emulated boards, the cross-compiler flags, the counting plugin
(built once with the host gcc and cached), cross-compiling the harness, and reading section sizes.

>>> CPUS["cortex-m4"].machine
'mps2-an386'
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_write_bytes, build_lock


@dataclass(frozen=True)
class Cpu:
    """One emulated core: the QEMU board that has it and the compiler flags for it."""

    name: str
    machine: str                # qemu-system-arm -M
    flags: tuple[str, ...]      # arm-none-eabi-gcc code-generation flags


CPUS = {
    "cortex-m4": Cpu("cortex-m4", "mps2-an386",
                     ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")),
    # NOTE: QEMU's Cortex-M7 has the double-precision FPU (newlib's v7e-m+dp multilib links with it).
    "cortex-m7": Cpu("cortex-m7", "mps2-an500",
                     ("-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16")),
}
OPT_LEVELS = ("O2", "Os", "O3", "O1", "O0")
#: warnings as errors, as verify-c compiles for the host; sections per function so unused kernels are dropped.
COMMON_CFLAGS = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-ffunction-sections", "-fdata-sections")
LINK_FLAGS = ("--specs=nano.specs", "--specs=rdimon.specs", "-nostartfiles", "-Wl,--gc-sections")
#: Debian package of each tool, for the error that names what to install.
APT_PACKAGES = {"arm-none-eabi-gcc": "gcc-arm-none-eabi libnewlib-arm-none-eabi",
                "arm-none-eabi-size": "binutils-arm-none-eabi", "qemu-system-arm": "qemu-system-arm",
                "gcc": "gcc"}
HARNESS_FILES = ("ek_mcu_main.c", "ek_mcu_startup.c", "ek_mps2.ld")
PLUGIN_FILES = ("ek_count_plugin.c", "ek_qemu_plugin_v1.h")


def tools_missing() -> str | None:
    """Why ``measure-mcu`` cannot run here (the missing tools and their apt packages), or None."""
    missing = [t for t in APT_PACKAGES if shutil.which(t) is None]
    if not missing:
        return None
    pkgs = " ".join(dict.fromkeys(APT_PACKAGES[t] for t in missing))
    return f"{', '.join(missing)} not installed (apt-get install {pkgs}; scripts/system-deps.sh does it)"


def require_tools() -> None:
    why = tools_missing()
    if why:
        raise EdgekilnError(why)


def package_file(name: str) -> Path:
    """A C file or linker script of this package, on disk (the package is installed from a directory)."""
    return Path(str(resources.files("edgekiln.codegen.mcu").joinpath(name)))


def run_tool(cmd: list[str], what: str, cwd: Path | None = None, timeout: float = 600) -> str:
    """Run a build tool; a failure is one line naming ``what`` and the tool's most telling error line."""
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        lines = (r.stderr or r.stdout).splitlines() or [f"exit {r.returncode}"]
        telling = [ln for ln in lines if re.search(r"error|overflow|will not fit|undefined reference", ln, re.I)
                   and "collect2" not in ln]
        line = (telling or lines)[0].strip()[:300]
        hint = " (too much embedded data: fewer inputs with --limit)" if "overflow" in line or "will not fit" in line else ""
        raise EdgekilnError(f"{what} failed: {line}{hint}")
    return r.stdout


def plugin_cache_dir() -> Path:
    from edgekiln.testing.corpus_data import cache_root

    return cache_root() / "qemu-plugin"


def build_plugin() -> Path:
    """The counting plugin as a host shared object, built once per source and gcc version and cached."""
    require_tools()
    sources = b"".join(package_file(n).read_bytes() for n in PLUGIN_FILES)
    gcc_version = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    key = hashlib.sha256(sources + gcc_version.encode()).hexdigest()[:16]
    lib = plugin_cache_dir() / f"libekcount-{key}.so"
    if lib.is_file():
        return lib
    with build_lock(lib):  # concurrent callers (pytest-xdist workers) wait for one build, then reuse it
        if lib.is_file():
            return lib
        tmp = lib.with_name(f".{lib.name}.{os.getpid()}.tmp")
        run_tool(["gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                  f"-I{package_file('ek_qemu_plugin_v1.h').parent}", "-o", str(tmp),
                  str(package_file("ek_count_plugin.c"))], "building the QEMU counting plugin with gcc")
        atomic_write_bytes(lib, tmp.read_bytes())
        tmp.unlink()
    return lib


def cflags(cpu: str, opt: str, defines: Sequence[str] = ()) -> list[str]:
    """The compiler flags for ``cpu`` at ``-opt`` (plus ``-D`` of each of ``defines``)."""
    if cpu not in CPUS:
        raise EdgekilnError(f"--cpu {cpu!r}: choose one of {', '.join(CPUS)}")
    if opt not in OPT_LEVELS:
        raise EdgekilnError(f"--opt {opt!r}: choose one of {', '.join(OPT_LEVELS)}")
    return [*CPUS[cpu].flags, f"-{opt}", *COMMON_CFLAGS, *(f"-D{d}" for d in defines)]


def compile_program(sources: list[Path], include_dirs: list[Path], elf: Path, cpu: str, flags: list[str]) -> Path:
    """Cross-compile each source to ``<stem>.o`` beside ``elf`` and link them with the harness startup;
    the linker map (``.map`` beside the ELF) names each object, for :func:`linked_sizes`."""
    incs = [f"-I{d}" for d in include_dirs]
    objects = []
    for src in sources:
        obj = elf.parent / f"{src.stem}.o"
        run_tool(["arm-none-eabi-gcc", *flags, *incs, "-c", str(src), "-o", str(obj)],
                 f"arm-none-eabi-gcc {src.name} ({' '.join(f for f in flags if f.startswith(('-mcpu', '-O')))})")
        objects.append(str(obj))
    run_tool(["arm-none-eabi-gcc", *CPUS[cpu].flags, "-T", str(package_file("ek_mps2.ld")), *LINK_FLAGS,
              f"-Wl,-Map={elf.with_suffix('.map')}", "-o", str(elf), *objects], f"linking {elf.name} ({cpu})")
    return elf


def symbol_address(elf: Path, name: str) -> int:
    out = run_tool(["arm-none-eabi-nm", str(elf)], "arm-none-eabi-nm")
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == name:
            return int(parts[0], 16) & ~1
    raise EdgekilnError(f"{elf}: no symbol {name}")


def elf_sizes(elf: Path) -> dict[str, int]:
    """``arm-none-eabi-size`` (Berkeley format) of the whole program: text, data, bss."""
    out = run_tool(["arm-none-eabi-size", str(elf)], "arm-none-eabi-size").splitlines()
    text, data, bss = (int(v) for v in out[1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


_MAP_ENTRY = re.compile(r"^\s*(\.\S+|COMMON)?\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+(\S+\.o\)?)\s*$")


def linked_sizes(map_file: Path, objects: list[str]) -> dict[str, dict[str, int]]:
    """Bytes each object contributes to the linked program, from the linker map (sections dropped by
    ``--gc-sections`` do not count): ``{object: {"code", "rodata", "data", "bss"}}``, plus ``"libgcc"``:
    the compiler's helper routines the program pulls in (64-bit division for the library's kernels).

    NOTE: the whole ELF also holds newlib, the harness and the embedded test inputs; these are the
    numbers of the model library alone, as a firmware that links it would pay them.
    """
    sizes = {o: dict.fromkeys(("code", "rodata", "data", "bss"), 0) for o in [*objects, "libgcc"]}
    section = ""
    in_discarded = True
    for line in map_file.read_text(errors="replace").splitlines():
        if line.startswith("Linker script and memory map"):
            in_discarded = False
            continue
        if in_discarded:
            continue
        m = _MAP_ENTRY.match(line)
        if m is None:
            stripped = line.strip()
            if stripped.startswith(".") and len(stripped.split()) == 1:
                section = stripped  # a long section name sits alone on its line
            continue
        section = m.group(1) or section
        obj = "libgcc" if "libgcc.a(" in m.group(4) else Path(m.group(4)).name
        if obj not in sizes or int(m.group(2), 16) == 0:
            continue
        size = int(m.group(3), 16)
        kind = ("code" if section.startswith(".text") else "rodata" if section.startswith(".rodata")
                else "data" if section.startswith(".data") else "bss" if section.startswith((".bss", "COMMON"))
                else None)
        if kind:
            sizes[obj][kind] += size
    return sizes
