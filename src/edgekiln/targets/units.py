"""Parse and print sizes, durations and bandwidths the way embedded engineers write them.

Sizes follow the embedded convention: ``KB`` and ``KiB`` both mean 1024 bytes (datasheets say
"128 KB SRAM" for 131,072 bytes); ``MB``/``MiB`` mean 1024*1024. Bandwidths are decimal bits
per second (network convention): ``10mbit`` = 10,000,000 bit/s.

>>> parse_bytes("256KB"), parse_bytes("1.5M"), parse_duration_ms("2s"), parse_bandwidth_bps("10mbit")
(262144, 1572864, 2000.0, 10000000.0)
"""

from __future__ import annotations

import re

from edgekiln.errors import EdgekilnError

_SIZE = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
         "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
_TIME = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "": 1.0}
_BW = {"bit": 1, "bps": 1, "kbit": 1e3, "kbps": 1e3, "mbit": 1e6, "mbps": 1e6, "gbit": 1e9, "gbps": 1e9}
_NUM = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def _split(text: str, what: str) -> tuple[float, str]:
    m = _NUM.match(str(text))
    if not m:
        raise EdgekilnError(f"'{text}' is not a {what} (examples: {_EXAMPLES[what]})")
    return float(m.group(1)), m.group(2).lower()


_EXAMPLES = {"size": "256KB, 1MB, 4096", "duration": "50ms, 1s", "bandwidth": "10mbit, 1gbit"}


def parse_bytes(text: str | int) -> int:
    if isinstance(text, int):
        return text
    value, unit = _split(text, "size")
    if unit not in _SIZE:
        raise EdgekilnError(f"'{text}': unknown size unit '{unit}' (use B, KB, MB, GB)")
    return int(round(value * _SIZE[unit]))


def parse_duration_ms(text: str | float) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    value, unit = _split(text, "duration")
    if unit not in _TIME:
        raise EdgekilnError(f"'{text}': unknown time unit '{unit}' (use us, ms, s)")
    return value * _TIME[unit]


def parse_bandwidth_bps(text: str | float) -> float:
    if isinstance(text, (int, float)):
        return float(text)
    value, unit = _split(text, "bandwidth")
    if unit not in _BW:
        raise EdgekilnError(f"'{text}': unknown bandwidth unit '{unit}' (use kbit, mbit, gbit)")
    return value * _BW[unit]


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
