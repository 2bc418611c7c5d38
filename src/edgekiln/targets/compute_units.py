"""Compute units inside a device: the CPU, a GPU, an NPU or DSP, each with its own throughput, op list and link.

A profile's optional ``units:`` list describes them (docs/targets.md, "Compute units"). A profile without
one has a single implicit ``cpu`` unit made from its top-level figures (:func:`profile_units`), so every
existing profile and every caller of ``estimate_fit`` is unchanged.

>>> from edgekiln.targets.profiles import load_profile
>>> [u.name for u in profile_units(load_profile("raspberry-pi-4"))]
['cpu']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from edgekiln.errors import EdgekilnError
from edgekiln.execution.runtimes import REAL as RUNTIMES  # host units name one of the real runtimes

if TYPE_CHECKING:
    from edgekiln.targets.profiles import DeviceProfile

UNIT_TYPES = ("cpu", "gpu", "npu", "dsp")


@dataclass(frozen=True, kw_only=True)
class Link:
    """How tensors reach a unit from host memory: every segment boundary lands in host memory."""

    bandwidth_bytes_per_s: float
    latency_us: float
    #: a unit sharing DRAM with the CPU still pays a copy at memcpy speed (None: the link bandwidth only)
    copy_bytes_per_s: float | None = None

    def transfer_s(self, nbytes: int) -> float:
        """Seconds to move ``nbytes`` across the link once (latency counted per segment, not here)."""
        rate = self.bandwidth_bytes_per_s if self.copy_bytes_per_s is None else \
            min(self.bandwidth_bytes_per_s, self.copy_bytes_per_s)
        return nbytes / rate


@dataclass(frozen=True, kw_only=True)
class UnitLimits:
    """Shape limits a unit's compiler documents (None/False: no limit)."""

    max_nonunit_dims: int | None = None          # Edge TPU: only the 3 innermost dims may be > 1
    softmax_max_elements: int | None = None      # largest Softmax input (elements)
    softmax_max_rank: int | None = None          # Edge TPU: Softmax on 1-D input only (batch dims of 1 ignored)
    reduce_axes: Literal["spatial"] | None = None  # Mean over x/y only
    pad_axes: Literal["spatial"] | None = None     # Pad over x/y only
    max_kernel: int | None = None                # largest conv/pool kernel side
    static_shapes: bool = False                  # needs every shape known at compile time
    matmul_const_weight: bool = False            # MatMul/Gemm only with a constant weight (FullyConnected)


@dataclass(frozen=True, kw_only=True)
class ComputeUnit:
    name: str
    type: str                                    # cpu | gpu | npu | dsp
    precisions: tuple[str, ...]
    peak_macs_per_s: Mapping[str, float]
    efficiency: float
    memory_bandwidth_bytes_per_s: float
    ops: frozenset[str] | None = None            # None: every ONNX op (minus ops_excluded)
    ops_excluded: frozenset[str] = frozenset()   # with ops=None: "all ops but these"
    ops_name: str = ""                           # the op list's name, for reasons ("the Edge TPU op list")
    limits: UnitLimits = field(default_factory=UnitLimits)
    launch_overhead_us: float = 0.0
    link: Link | None = None                     # None: the unit reads host memory directly (the CPU)
    energy_pj_per_mac: Mapping[str, float] = field(default_factory=dict)
    energy_pj_per_byte: float | None = None
    max_segments: int | None = None              # Edge TPU: the compiler partitions once
    runtime: str | None = None                   # host units: onnxruntime | openvino | litert
    measured: bool = False
    source: str = ""

    def runs(self, op: str) -> bool:
        if self.ops is not None:
            return op in self.ops
        return op not in self.ops_excluded

    def has_energy(self, precision: str) -> bool:
        return precision in self.energy_pj_per_mac


def profile_units(profile: DeviceProfile) -> tuple[ComputeUnit, ...]:
    """The profile's units; without ``units:``, one ``cpu`` unit from its top-level figures."""
    units = getattr(profile, "units", ())
    if units:
        return tuple(units)
    return (ComputeUnit(name="cpu", type="cpu", precisions=tuple(profile.precisions),
                        peak_macs_per_s=dict(profile.peak_macs_per_s), efficiency=profile.efficiency,
                        memory_bandwidth_bytes_per_s=profile.memory_bandwidth_bytes_per_s,
                        energy_pj_per_mac=dict(profile.energy_pj_per_mac),
                        energy_pj_per_byte=profile.energy_pj_per_byte,
                        runtime="onnxruntime" if profile.kind == "host" else None,
                        measured=profile.measured, source=profile.source),)


# ---- YAML -> units (called by profiles._validate) -------------------------------------------------------

_UNIT_REQUIRED = ("name", "type", "precisions", "peak_macs_per_s", "efficiency", "memory_bandwidth_bytes_per_s",
                  "source")
_UNIT_KEYS = frozenset({*_UNIT_REQUIRED, "ops", "limits", "launch_overhead_us", "link", "energy_pj_per_mac",
                        "energy_pj_per_byte", "max_segments", "runtime", "measured"})
_LINK_KEYS = frozenset(f.name for f in fields(Link))
_LIMIT_KEYS = frozenset(f.name for f in fields(UnitLimits))


def _positive(value: Any, where: str, *, zero_ok: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if zero_ok else value > 0)
    if not ok:
        raise EdgekilnError(f"{where} must be a {'non-negative' if zero_ok else 'positive'} number (got {value!r})")
    return float(value)


def parse_units(raw: Any, where: str, precisions_known: tuple[str, ...]) -> tuple[ComputeUnit, ...]:
    """Validate a profile's ``units:`` list; errors name the file, the unit and the field."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise EdgekilnError(f"{where}: field 'units' is a non-empty list of units")
    out: list[ComputeUnit] = []
    for i, data in enumerate(raw):
        if not isinstance(data, dict):
            raise EdgekilnError(f"{where}: units[{i}] is a mapping")
        out.append(_parse_unit(data, f"{where}: unit '{data.get('name', i)}'", precisions_known))
    names = [u.name for u in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EdgekilnError(f"{where}: duplicate unit name(s) {', '.join(dup)}")
    return tuple(out)


def _parse_unit(data: dict[str, Any], where: str, precisions_known: tuple[str, ...]) -> ComputeUnit:
    from edgekiln.targets import op_sets

    for key in _UNIT_REQUIRED:
        if data.get(key) is None:
            raise EdgekilnError(f"{where}: missing field '{key}'")
    unknown = sorted(set(data) - _UNIT_KEYS)
    if unknown:
        raise EdgekilnError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if data["type"] not in UNIT_TYPES:
        raise EdgekilnError(f"{where}: field 'type' must be one of {', '.join(UNIT_TYPES)} (got {data['type']!r})")
    precisions = data["precisions"]
    if not isinstance(precisions, list) or not precisions or any(p not in precisions_known for p in precisions):
        raise EdgekilnError(f"{where}: field 'precisions' must list some of {', '.join(precisions_known)}")
    peaks = data["peak_macs_per_s"]
    if not isinstance(peaks, dict):
        raise EdgekilnError(f"{where}: field 'peak_macs_per_s' is a mapping of precision to MAC/s")
    missing = [p for p in precisions if p not in peaks]
    if missing:
        raise EdgekilnError(f"{where}: field 'peak_macs_per_s' has no value for precision(s) {', '.join(missing)}")
    peak = {p: _positive(v, f"{where}: field 'peak_macs_per_s.{p}'") for p, v in peaks.items()}
    eff = _positive(data["efficiency"], f"{where}: field 'efficiency'")
    if eff > 1:
        raise EdgekilnError(f"{where}: field 'efficiency' must be in (0, 1]")
    energy = data.get("energy_pj_per_mac") or {}
    if not isinstance(energy, dict):
        raise EdgekilnError(f"{where}: field 'energy_pj_per_mac' is a mapping of precision to pJ")
    runtime = data.get("runtime")
    if runtime is not None and runtime not in RUNTIMES:
        raise EdgekilnError(f"{where}: field 'runtime' must be one of {', '.join(RUNTIMES)} (got {runtime!r})")
    max_seg = data.get("max_segments")
    if max_seg is not None and (not isinstance(max_seg, int) or isinstance(max_seg, bool) or max_seg < 1):
        raise EdgekilnError(f"{where}: field 'max_segments' must be a positive integer (got {max_seg!r})")
    ops, excluded, ops_name = op_sets.resolve(data.get("ops"), f"{where}: field 'ops'")
    return ComputeUnit(
        name=str(data["name"]), type=data["type"], precisions=tuple(precisions), peak_macs_per_s=peak,
        efficiency=eff, memory_bandwidth_bytes_per_s=_positive(data["memory_bandwidth_bytes_per_s"],
                                                               f"{where}: field 'memory_bandwidth_bytes_per_s'"),
        ops=ops, ops_excluded=excluded, ops_name=ops_name, limits=_parse_limits(data.get("limits"), where),
        launch_overhead_us=_positive(data.get("launch_overhead_us", 0), f"{where}: field 'launch_overhead_us'",
                                     zero_ok=True),
        link=_parse_link(data.get("link"), where),
        energy_pj_per_mac={p: _positive(v, f"{where}: field 'energy_pj_per_mac.{p}'") for p, v in energy.items()},
        energy_pj_per_byte=None if data.get("energy_pj_per_byte") is None else
        _positive(data["energy_pj_per_byte"], f"{where}: field 'energy_pj_per_byte'", zero_ok=True),
        max_segments=max_seg, runtime=runtime, measured=bool(data.get("measured", False)),
        source=str(data["source"]))


def _parse_link(raw: Any, where: str) -> Link | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise EdgekilnError(f"{where}: field 'link' is a mapping (bandwidth_bytes_per_s, latency_us)")
    unknown = sorted(set(raw) - _LINK_KEYS)
    if unknown:
        raise EdgekilnError(f"{where}: field 'link': unknown field(s) {', '.join(unknown)}")
    if raw.get("bandwidth_bytes_per_s") is None:
        raise EdgekilnError(f"{where}: field 'link' needs 'bandwidth_bytes_per_s'")
    copy = raw.get("copy_bytes_per_s")
    return Link(bandwidth_bytes_per_s=_positive(raw["bandwidth_bytes_per_s"], f"{where}: field 'link.bandwidth_bytes_per_s'"),
                latency_us=_positive(raw.get("latency_us", 0), f"{where}: field 'link.latency_us'", zero_ok=True),
                copy_bytes_per_s=None if copy is None else _positive(copy, f"{where}: field 'link.copy_bytes_per_s'"))


def _parse_limits(raw: Any, where: str) -> UnitLimits:
    if raw is None:
        return UnitLimits()
    if not isinstance(raw, dict):
        raise EdgekilnError(f"{where}: field 'limits' is a mapping")
    unknown = sorted(set(raw) - _LIMIT_KEYS)
    if unknown:
        raise EdgekilnError(f"{where}: field 'limits': unknown field(s) {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key in ("max_nonunit_dims", "softmax_max_elements", "softmax_max_rank", "max_kernel"):
        if raw.get(key) is not None:
            out[key] = int(_positive(raw[key], f"{where}: field 'limits.{key}'"))
    for key in ("reduce_axes", "pad_axes"):
        if raw.get(key) is not None:
            if raw[key] != "spatial":
                raise EdgekilnError(f"{where}: field 'limits.{key}' must be 'spatial' or absent (got {raw[key]!r})")
            out[key] = "spatial"
    out["static_shapes"] = bool(raw.get("static_shapes", False))
    out["matmul_const_weight"] = bool(raw.get("matmul_const_weight", False))
    return UnitLimits(**out)
