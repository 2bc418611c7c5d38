"""Does a model fit a device? Flash, RAM, latency and energy against the profile's budgets.

The latency estimate is a roofline (documented in docs/targets.md):

    compute_s = MACs / (peak_macs_per_s[precision] * efficiency)
    memory_s  = bytes_moved / memory_bandwidth_bytes_per_s
    latency   = max(compute_s, memory_s)

with ``bytes_moved = weight_bytes + 2 * activation traffic`` (each activation written once and
read once; the peak activation size stands in for the traffic when nothing better is known).
For int8 on a microcontroller whose profile carries measured ``instructions_per_mac`` (edgekiln's
own C kernels under QEMU, per kernel kind: :mod:`edgekiln.targets.kernel_kinds`), the compute
term is measured instructions instead of a share of the peak:

    compute_s = sum_kind(MACs_kind * instructions_per_mac[kind]) * cycles_per_instruction / clock_hz

Energy = MACs * pJ/MAC + bytes_moved * pJ/byte, when the profile knows those figures; otherwise
it is reported as unknown, never invented.

On microcontrollers weights stay in flash and RAM holds activations and I/O (+ the runtime's
reserve); on Linux-class devices and accelerators the weights are loaded into RAM too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgekiln.targets.kernel_kinds import mcu_instructions
from edgekiln.targets.profiles import DeviceProfile
from edgekiln.targets.units import format_bytes


@dataclass(frozen=True)
class Metric:
    name: str
    value: float | None
    budget: float | None
    unit: str

    @property
    def ok(self) -> bool:
        return self.value is None or self.budget is None or self.value <= self.budget

    @property
    def margin(self) -> float | None:
        return None if self.value is None or self.budget is None else self.budget - self.value

    def describe(self, v: float | None) -> str:
        if v is None:
            return "unknown"
        return format_bytes(v) if self.unit == "bytes" else f"{v:.4g} {self.unit}"

    def to_dict(self) -> dict[str, Any]:
        pct = None if self.margin is None or not self.budget else 100.0 * self.margin / self.budget
        return {"value": self.value, "budget": self.budget, "unit": self.unit, "margin": self.margin,
                "margin_pct": pct, "ok": self.ok}


@dataclass(frozen=True)
class FitReport:
    target: str
    kind: str
    precision: str
    notes: tuple[str, ...]
    metrics: dict[str, Metric] = field(default_factory=dict)
    latency_source: str = "estimate"
    ram_source: str = ""     # where the RAM and flash numbers come from (empty: not stated)
    flash_source: str = ""

    @property
    def fits(self) -> bool:
        return all(m.ok for m in self.metrics.values())

    @property
    def exceeded(self) -> list[str]:
        """One sentence per exceeded budget, saying by how much."""
        out = []
        labels = {"flash": "flash", "ram": "RAM", "latency_ms": "latency", "energy_mj": "energy"}
        for key, m in self.metrics.items():
            if not m.ok:
                over = m.value - m.budget
                out.append(f"{labels[key]}: needs {m.describe(m.value)}, budget {m.describe(m.budget)}, "
                           f"over by {m.describe(over)} ({100 * over / m.budget:.0f}%)")
        return out

    def to_dict(self) -> dict[str, Any]:
        sources = {k: v for k, v in (("ram_source", self.ram_source), ("flash_source", self.flash_source)) if v}
        return {"target": self.target, "kind": self.kind, "precision": self.precision, "fits": self.fits,
                "exceeded": self.exceeded, "notes": list(self.notes), "latency_source": self.latency_source,
                **{k: m.to_dict() for k, m in self.metrics.items()}, **sources}

    def render_markdown(self) -> str:
        from edgekiln.report import md_table

        rows = [[k, m.describe(m.value), m.describe(m.budget), m.describe(m.margin) if m.margin is not None else "-",
                 "yes" if m.ok else "NO"] for k, m in self.metrics.items()]
        verdict = "fits" if self.fits else "does not fit: " + "; ".join(self.exceeded)
        lines = [f"# Fit on {self.target} ({self.kind}, {self.precision})", "",
                 md_table(["budget", "model needs", "device has", "margin", "ok"], rows), "", f"**{verdict}**"]
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def estimate_fit(profile: DeviceProfile, *, weight_bytes: int, peak_activation_bytes: int, io_bytes: int, macs: int,
                 precision: str, code_bytes: int = 0, measured_latency_ms: float | None = None,
                 max_latency_ms: float | None = None, max_energy_mj: float | None = None,
                 max_ram_bytes: int | None = None, max_flash_bytes: int | None = None,
                 macs_by_kind: Mapping[str, int] | None = None,
                 measured_instructions: int | None = None) -> FitReport:
    """Estimate flash, RAM, latency and energy of a model on ``profile``.

    ``macs_by_kind`` (:func:`edgekiln.targets.kernel_kinds.macs_by_kernel_kind`) splits the MACs for
    an MCU profile's measured per-kind instructions per MAC; without it every MAC costs the
    profile's whole-model figure. ``measured_instructions``: this model's own C library counted on the
    profile's emulated CPU (``measure-mcu``, an ``optimize`` run folder's deployment record), used instead.

    >>> from edgekiln.targets.profiles import load_profile
    >>> r = estimate_fit(load_profile("cortex-m4"), weight_bytes=100_000, peak_activation_bytes=20_000,
    ...                  io_bytes=1_000, macs=2_000_000, precision="int8")
    >>> r.fits, r.latency_source   # int8 on an MCU: measured instructions per MAC x the profile's CPI
    (True, 'estimate from measured instructions')
    """
    notes: list[str] = []
    if precision not in profile.precisions:
        fallback = "fp32" if "fp32" in profile.precisions else profile.precisions[0]
        notes.append(f"{profile.name} does not run {precision}; estimated as {fallback}")
        precision = fallback
    mcu = profile.kind == "mcu"
    flash = weight_bytes + code_bytes
    ram = peak_activation_bytes + io_bytes + profile.runtime_overhead_bytes + (0 if mcu else weight_bytes)
    if mcu and not code_bytes:
        notes.append("flash counts weights only (no code size given; the C export reports it)")
    moved = weight_bytes + 2 * peak_activation_bytes
    compute_s = macs / (profile.peak_macs_per_s[precision] * profile.efficiency)
    source = "estimate"
    if mcu and precision == "int8" and measured_instructions and profile.cycles_per_instruction:
        compute_s = measured_instructions * profile.cycles_per_instruction / profile.clock_hz
        source = "measured instructions (emulated CPU)"
        notes.append(f"int8 latency: {measured_instructions:,} instructions of this model's C library counted on the "
                     f"emulated CPU x {profile.cycles_per_instruction} cycles per instruction (assumed) at "
                     f"{profile.clock_hz / 1e6:g} MHz")
    elif mcu and precision == "int8" and profile.instructions_per_mac and profile.cycles_per_instruction:
        instructions = mcu_instructions(profile.instructions_per_mac, macs, macs_by_kind)
        compute_s = instructions * profile.cycles_per_instruction / profile.clock_hz
        source = "estimate from measured instructions"
        notes.append(f"int8 latency: {instructions:,.0f} instructions (edgekiln's C kernels, measured per MAC "
                     f"{'by kernel kind' if macs_by_kind else 'for a whole model'}) x {profile.cycles_per_instruction} "
                     f"cycles per instruction (assumed) at {profile.clock_hz / 1e6:g} MHz")
    memory_s = moved / profile.memory_bandwidth_bytes_per_s
    latency = max(compute_s, memory_s) * 1000.0
    if profile.measured and measured_latency_ms is not None:
        latency, source = measured_latency_ms, "measured"
    pj_mac = profile.energy_pj_per_mac.get(precision)
    energy = None
    if pj_mac is not None:
        energy = (macs * pj_mac + moved * (profile.energy_pj_per_byte or 0.0)) * 1e-9  # pJ -> mJ
    metrics = {
        "flash": Metric("flash", float(flash), float(max_flash_bytes or profile.flash_bytes), "bytes"),
        "ram": Metric("ram", float(ram), float(max_ram_bytes or profile.ram_bytes), "bytes"),
        "latency_ms": Metric("latency_ms", latency, max_latency_ms, "ms"),
        "energy_mj": Metric("energy_mj", energy, max_energy_mj, "mJ"),
    }
    return FitReport(profile.name, profile.kind, precision, tuple(notes), metrics, source)
