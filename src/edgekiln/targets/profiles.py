"""Device profiles: YAML data files, validated on load, each naming its sources.

Built-in profiles live next to this module; users add their own as YAML files in
``$EDGEKILN_PROFILES_DIR`` or ``~/.config/edgekiln/profiles/``, or pass a path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgekiln.errors import EdgekilnError

if TYPE_CHECKING:
    from edgekiln.targets.compute_units import ComputeUnit

BUILTIN_DIR = Path(__file__).parent / "profiles"
KINDS = ("mcu", "linux", "accelerator", "host")
PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str                                   # mcu | linux | accelerator | host
    flash_bytes: int                            # program/model storage (flash, eMMC, SD)
    ram_bytes: int                              # RAM usable by the model (activations; on linux-class also weights)
    clock_hz: float
    cores: int
    precisions: tuple[str, ...]
    peak_macs_per_s: dict[str, float]           # per precision
    memory_bandwidth_bytes_per_s: float
    efficiency: float                           # share of peak a real kernel reaches (documented assumption)
    #: mcu, int8: executed instructions per MAC of edgekiln's C kernels, measured per kernel kind
    #: (targets/kernel_kinds.py: conv, depthwise, pointwise, fc, add per element, ``model`` for the rest); replaces
    #: ``efficiency`` for int8 when given, with ``cycles_per_instruction`` turning instructions into time
    instructions_per_mac: dict[str, float] = field(default_factory=dict)
    cycles_per_instruction: float | None = None  # an assumption (QEMU counts instructions, not cycles)
    runtime_overhead_bytes: int = 0             # RAM/flash the runtime or firmware keeps for itself
    energy_pj_per_mac: dict[str, float] = field(default_factory=dict)   # empty: unknown
    energy_pj_per_byte: float | None = None
    measured: bool = False                      # host: latency is measured, not estimated
    source: str = ""
    #: the compute units inside the device (targets/compute_units.py); empty: one implicit ``cpu`` unit
    units: tuple[ComputeUnit, ...] = ()
    path: str = ""


_REQUIRED = ("name", "description", "kind", "flash_bytes", "ram_bytes", "clock_hz", "cores", "precisions",
             "peak_macs_per_s", "memory_bandwidth_bytes_per_s", "efficiency", "source")


def _search_dirs() -> list[Path]:
    dirs = [BUILTIN_DIR]
    env = os.environ.get("EDGEKILN_PROFILES_DIR")
    if env:
        dirs.append(Path(env))
    dirs.append(Path.home() / ".config" / "edgekiln" / "profiles")
    return [d for d in dirs if d.is_dir()]


def list_profiles() -> list[DeviceProfile]:
    """Built-in profiles, then user profiles (a user profile with a built-in's name replaces it)."""
    found: dict[str, DeviceProfile] = {}
    for d in _search_dirs():
        for path in sorted(d.glob("*.yaml")):
            prof = load_profile_file(path)
            found[prof.name] = prof
    return list(found.values())


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A profile by name, or from a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return load_profile_file(path)
    for prof in list_profiles():
        if prof.name == str(name_or_path):
            return prof
    known = ", ".join(p.name for p in list_profiles())
    raise EdgekilnError(f"unknown target '{name_or_path}'; known: {known} (or give a profile .yaml file)")


def load_profile_file(path: str | Path) -> DeviceProfile:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EdgekilnError(f"{path}: profile file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EdgekilnError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EdgekilnError(f"{path}: a profile is a YAML mapping")
    if data.get("name") == "host" and data.get("measured"):
        data = _fill_host(data)
    return _validate(data, path)


def _validate(data: dict[str, Any], path: Path) -> DeviceProfile:
    from edgekiln.targets.compute_units import parse_units
    from edgekiln.targets.units import parse_bytes

    where = str(path)
    for key in _REQUIRED:
        if key not in data or data[key] is None:
            raise EdgekilnError(f"{where}: missing field '{key}'")
    known = {f.name for f in fields(DeviceProfile)} - {"path"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise EdgekilnError(f"{where}: unknown field(s) {', '.join(unknown)}")
    out = dict(data)
    for key in ("flash_bytes", "ram_bytes", "runtime_overhead_bytes"):
        if key in out:
            try:
                out[key] = parse_bytes(out[key])
            except EdgekilnError as exc:
                raise EdgekilnError(f"{where}: field '{key}': {exc}") from None
    for key in ("flash_bytes", "ram_bytes", "clock_hz", "cores", "memory_bandwidth_bytes_per_s", "efficiency"):
        if not isinstance(out[key], (int, float)) or isinstance(out[key], bool) or out[key] <= 0:
            raise EdgekilnError(f"{where}: field '{key}' must be a positive number (got {out[key]!r})")
    if out["kind"] not in KINDS:
        raise EdgekilnError(f"{where}: field 'kind' must be one of {', '.join(KINDS)} (got {out['kind']!r})")
    if not 0 < out["efficiency"] <= 1:
        raise EdgekilnError(f"{where}: field 'efficiency' must be in (0, 1]")
    precisions = out["precisions"]
    if not isinstance(precisions, list) or not precisions or any(p not in PRECISIONS for p in precisions):
        raise EdgekilnError(f"{where}: field 'precisions' must list some of {', '.join(PRECISIONS)}")
    peaks = out["peak_macs_per_s"]
    if not isinstance(peaks, dict) or any(p not in peaks for p in precisions):
        raise EdgekilnError(f"{where}: field 'peak_macs_per_s' needs a value for each precision in 'precisions'")
    for p, v in peaks.items():
        if not isinstance(v, (int, float)) or v <= 0:
            raise EdgekilnError(f"{where}: field 'peak_macs_per_s.{p}' must be a positive number")
    out["precisions"] = tuple(precisions)
    out["peak_macs_per_s"] = {k: float(v) for k, v in peaks.items()}
    out["energy_pj_per_mac"] = {k: float(v) for k, v in (out.get("energy_pj_per_mac") or {}).items()}
    out["instructions_per_mac"] = _instructions_per_mac(out, where)
    out["units"] = parse_units(out.get("units"), where, PRECISIONS)
    return DeviceProfile(**out, path=str(path))


def _instructions_per_mac(data: dict[str, Any], where: str) -> dict[str, float]:
    """The measured figures, checked: known kinds, positive numbers, ``model`` and a CPI with them."""
    from edgekiln.targets.kernel_kinds import KERNEL_KINDS, MODEL_KIND

    ipm = data.get("instructions_per_mac") or {}
    if not isinstance(ipm, dict):
        raise EdgekilnError(f"{where}: field 'instructions_per_mac' is a mapping of kernel kind to a number")
    if not ipm:
        return {}
    kinds = (*KERNEL_KINDS, MODEL_KIND)
    unknown = sorted(set(ipm) - set(kinds))
    if unknown:
        raise EdgekilnError(f"{where}: field 'instructions_per_mac': unknown kind(s) {', '.join(unknown)} "
                            f"(known: {', '.join(kinds)})")
    if MODEL_KIND not in ipm:
        raise EdgekilnError(f"{where}: field 'instructions_per_mac' needs '{MODEL_KIND}' (a whole model's figure)")
    for k, v in ipm.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise EdgekilnError(f"{where}: field 'instructions_per_mac.{k}' must be a positive number (got {v!r})")
    cpi = data.get("cycles_per_instruction")
    if not isinstance(cpi, (int, float)) or isinstance(cpi, bool) or cpi <= 0:
        raise EdgekilnError(f"{where}: field 'instructions_per_mac' needs 'cycles_per_instruction', a positive "
                            f"number (got {cpi!r})")
    return {k: float(v) for k, v in ipm.items()}


def _fill_host(data: dict[str, Any]) -> dict[str, Any]:
    """The host profile's RAM, disk and cores come from this machine."""
    import shutil

    out = dict(data)
    out["cores"] = os.cpu_count() or 1
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        out["ram_bytes"] = int(pages * size)
    except (ValueError, OSError):
        pass
    out["flash_bytes"] = int(shutil.disk_usage(Path.home()).free)
    return out
