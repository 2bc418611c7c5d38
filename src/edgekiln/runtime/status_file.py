"""The runtime's status file: what the application's :class:`~edgekiln.runtime.engine.Runtime` is
doing, for the update agent's telemetry (``STATE/runtime-status.json``).

The runtime lives in the application's process, the agent in its own; this small JSON file,
replaced atomically, is how the agent learns the variant in use and its latency. Written at
most every ``every_s`` seconds, so calling :func:`write_status` after every request is cheap.

>>> import tempfile
>>> class Runtime:   # anything with stats(), like edgekiln.runtime.engine.Runtime
...     def stats(self): return {"current": "int8", "int8": {"count": 3, "p50_ms": 1.5, "p95_ms": 2.0}}
>>> path = Path(tempfile.mkdtemp()) / FILE_NAME
>>> write_status(path, Runtime(), now=100.0), write_status(path, Runtime(), now=105.0)   # the second within 10 s
(True, False)
>>> read_status(path, now=110.0)["current"], read_status(path, now=1000.0)
('int8', None)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgekiln.fileio import atomic_write_text

FILE_NAME = "runtime-status.json"
MAX_BYTES = 64 * 1024
_last_write: dict[str, float] = {}


def write_status(path: str | Path, runtime: Any, every_s: float = 10.0, *, now: float | None = None) -> bool:
    """Write ``runtime.stats()`` plus a timestamp ``t`` to ``path`` atomically, unless the last
    write to it was less than ``every_s`` seconds ago. True when written."""
    path = Path(path)
    now = time.time() if now is None else now
    key = str(path.resolve())
    if now - _last_write.get(key, float("-inf")) < every_s:
        return False
    data = {"t": now, **runtime.stats()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, separators=(",", ":"), allow_nan=False, default=_plain))
    _last_write[key] = now
    return True


def read_status(path: str | Path, *, max_age_s: float = 600.0, now: float | None = None) -> dict[str, Any] | None:
    """The status in ``path`` if it exists, parses and is at most ``max_age_s`` old; else None."""
    try:
        raw = Path(path).read_bytes()
        if len(raw) > MAX_BYTES:
            return None
        data = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("t"), int | float):
        return None
    age = (time.time() if now is None else now) - float(data["t"])
    return data if -60.0 <= age <= max_age_s else None


def _plain(value: Any) -> Any:
    return None if value is None else float(value)
