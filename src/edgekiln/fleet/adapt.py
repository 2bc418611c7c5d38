"""Learn on the device into the A/B slots: the adapted model goes live only through the same
seal-and-switch as an install, and only when its gate accepted it.

:func:`adapt_state` holds the state folder's lock (the agent and ``edgekiln learn`` exclude each
other), repairs what a crash left, then lets :func:`edgekiln.runtime.adapt.adapt_bundle` train,
write and gate a candidate of the active bundle straight into the inactive slot (every file
fsynced). Accepted: the slot is sealed with the record of the adaptation (``adaptation`` in the
seal), the ``active`` symlink is switched, and ``state.json`` gets ``adaptation`` plus an
``adapted`` report in the outbox. Rejected: the slot is cleared and only ``state.json`` changes
(``last_adaptation``, an ``adapt_rejected`` report); the active slot, its files and its seal are
never touched. The agent sends the queued report on its next cycle.

The adapted slot keeps the server's version number, so the agent reports ``up-to-date`` and keeps
it until the server assigns a higher version, which supersedes it (``fleet.agent``). A kill -9 at
any point leaves the old slot or the sealed adapted one active; :meth:`SlotStore.recover` completes
the record of an adaptation that was switched before ``state.json`` was written.

Device side: imports the standard library, numpy, ``edgekiln.runtime`` and ``edgekiln.execution`` (never torch, never
the server's modules). ``edgekiln learn STATE --data new.npz --new-classes 8,9`` calls it as
``adapt_state(STATE, x, y, learn=LearnConfig(...), gate=GateConfig(...), new_classes=(8, 9))``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import fsync_dir
from edgekiln.fleet.slots import STATE_FILE, SlotStore, now_iso
from edgekiln.runtime.adapt import GATE_KEYS, adapt_bundle

# What a report's ``adaptation`` may hold (docs/fleet-protocol.md; the server checks it with
# ``fleet.rollout.check_adaptation``): the v1 record of the manifest and the seal, plus the
# reasons of a rejection. Numbers only in ``gate``; never features, samples or weights.
REPORT_KEYS = ("version", "id", "n", "base_sha256", "variant", "scope", "classes_before", "classes_after",
               "samples", "replay_bytes", "created", "gate", "reasons")
__all__ = ["GATE_KEYS", "REPORT_KEYS", "adapt_state", "is_state_folder", "learn_target", "load_samples",
           "report_record"]
MAX_REASONS, MAX_REASON_CHARS = 4, 300
MAX_REPORT_BYTES = 2048   # what the server takes


def is_state_folder(path: str | Path) -> bool:
    """An agent's state folder (``state.json`` or ``slots/``), as opposed to a bundle folder."""
    p = Path(path)
    return (p / STATE_FILE).is_file() or (p / "slots").is_dir()


def report_record(adaptation: dict[str, Any] | None, reasons: Sequence[str] = ()) -> dict[str, Any]:
    """The ``adaptation`` of an ``adapted``/``adapt_rejected`` report: the known keys only, the
    gate's finite numbers, at most four reasons of 300 characters (the server takes 2 KB).

    >>> report_record({"id": "0123456789ab", "scope": "head", "gate": {"old_drop": 0.02, "x": 1}},
    ...               ["old classes dropped 2.0% (budget 1.0%)"])
    {'id': '0123456789ab', 'scope': 'head', 'gate': {'old_drop': 0.02}, 'reasons': ['old classes dropped 2.0% (budget 1.0%)']}
    """
    import math

    record = {k: v for k, v in (adaptation or {}).items() if k in REPORT_KEYS and k not in ("gate", "reasons")}
    if not isinstance(record.get("id"), str) or len(record["id"]) != 12:
        record["id"] = secrets.token_hex(6)
    record = {"id": record.pop("id"), **record}
    gate = (adaptation or {}).get("gate")
    if isinstance(gate, dict):
        record["gate"] = {k: (v if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                              else None) for k, v in gate.items() if k in GATE_KEYS}
    if reasons:
        record["reasons"] = [str(r)[:MAX_REASON_CHARS] for r in list(reasons)[:MAX_REASONS]]
    while len(json.dumps(record, separators=(",", ":"))) > MAX_REPORT_BYTES and record.get("reasons"):
        record["reasons"] = record["reasons"][:-1]   # the gate's numbers say it too
    return record


def adapt_state(state_dir: str | Path, x: Any, y: Any, *, learn: Any, gate: Any, new_classes: Sequence[int] = (),
                checkpoint: Callable[[str], None] | None = None, replay_bytes: int | None = None) -> dict[str, Any]:
    """Adapt the active model of the agent's state folder ``state_dir`` to the device samples
    ``(x, y)`` (``learn``: a :class:`~edgekiln.runtime.learner.LearnConfig`; ``gate``: a
    :class:`~edgekiln.runtime.learner.GateConfig`) and activate it if the gate accepts it.
    ``replay_bytes`` caps the bundle's replay buffer (None: all of it).

    Returns ``{"accepted", "status": "adapted"|"rejected", "id", "model", "version", "slot",
    "previous_slot", "reasons", "metrics", "adaptation", "recovered"}``. Raises
    :class:`~edgekiln.errors.EdgekilnError` (exit 2) for a folder with no active model or bad data.
    """
    store = SlotStore(state_dir, checkpoint=checkpoint)
    if not is_state_folder(store.root):
        raise EdgekilnError(f"{store.root}: not an agent state folder (no state.json or slots/)")
    with store.lock():
        recovered = store.recover()
        active = store.active()
        if active is None:
            raise EdgekilnError(f"{store.root}: no active model to adapt (install one with `edgekiln agent` first)")
        slot = store.inactive_name()
        # NOTE: a sealed candidate a crash left here (killed before the switch) is thrown away:
        # the samples are still there, so learning again is the simpler recovery.
        store.clear_slot(slot)
        try:
            result = adapt_bundle(active.path, x, y, learn=learn, gate=gate, new_classes=tuple(new_classes),
                                  out=store.slot_path(slot), durable=True, checkpoint=store.checkpoint,
                                  replay_bytes=_replay(replay_bytes))
        except BaseException:
            if store.slot_path(slot).exists():
                store.clear_slot(slot)   # a refused input (exit 2) leaves nothing half-written behind
            raise
        record = report_record(result.adaptation, result.reasons)
        base = {"id": record["id"], "model": active.model, "version": active.version,
                "previous_slot": active.name, "reasons": list(result.reasons), "metrics": dict(result.metrics),
                "recovered": recovered}
        if not result.accepted:
            store.clear_slot(slot)
            _record(store, active.model, active.version, "adapt_rejected", record,
                    last={"id": record["id"], "status": "rejected", "reasons": record.get("reasons", [])})
            return {**base, "accepted": False, "status": "rejected", "slot": active.name, "adaptation": record}
        fsync_dir(store.slots_dir)
        store.checkpoint("slot-fsynced")
        adaptation = dict(result.adaptation)
        store.seal(slot, model=active.model, version=active.version, target_path=active.target_path,
                   sha256=_bundle_sha256(store, slot), adaptation=adaptation)
        store.switch(slot)
        _record(store, active.model, active.version, "adapted", record, last={"id": record["id"], "status": "adapted"},
                active=(slot, adaptation))
        return {**base, "accepted": True, "status": "adapted", "slot": slot, "adaptation": adaptation}


def _replay(replay_bytes: int | None) -> int | None:
    if replay_bytes is not None and (isinstance(replay_bytes, bool) or not 0 <= int(replay_bytes) < 2**40):
        raise EdgekilnError(f"replay bytes {replay_bytes!r} must be a count of bytes >= 0")
    return None if replay_bytes is None else int(replay_bytes)


def _record(store: SlotStore, model: str, version: int, status: str, record: dict[str, Any], *,
            last: dict[str, Any], active: tuple[str, dict[str, Any]] | None = None) -> None:
    """Write the outcome to ``state.json``: history, ``last_adaptation``, the queued report, and,
    for an activated adaptation, the new active slot and its ``adaptation``."""
    state = store.read_state()
    gate = record.get("gate") or {}
    state["last_adaptation"] = {**last, "time": now_iso()}
    state["history"] = [*state.get("history", []),
                        {"time": now_iso(), "model": model, "version": version, "status": status, "id": record["id"],
                         "old_drop": gate.get("old_drop"), "budget": gate.get("budget"),
                         **({"error": "; ".join(record["reasons"])[:1000]} if record.get("reasons") else {})}]
    state["outbox"] = [*state.get("outbox", []),
                       {"status": status, "model": model, "version": version, "adaptation": record}]
    if active is not None:
        state.update(active_slot=active[0], model=model, active_version=version, adaptation=active[1])
    store.write_state(state)
    store.checkpoint(f"state:{status}")


def _bundle_sha256(store: SlotStore, slot: str) -> str:
    """The sha256 of the slot's reproducible tar (what an install seals is the signed tar's)."""
    from edgekiln.fleet.bundle_tar import write_reproducible

    store.download_dir.mkdir(parents=True, exist_ok=True)
    tmp = store.download_dir / f".adapted-{slot}.tar"
    try:
        write_reproducible(store.slot_path(slot), tmp)
        digest = hashlib.sha256()
        with open(tmp, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    finally:
        tmp.unlink(missing_ok=True)


# --- what `edgekiln learn` and `edgekiln.learn` share ---------------------------------------------
def load_samples(path: str | Path) -> tuple[Any, Any]:
    """The device samples of an ``.npz``: ``y`` (class indices) and ``x`` (or the one other array)."""
    import numpy as np

    from edgekiln.execution.feeds import load_npz

    p = Path(path)
    arrays = load_npz(p)   # NOTE: the one npz reader: a missing or unreadable file is a one-line error
    if "y" not in arrays:
        raise EdgekilnError(f"{p}: has no 'y' (the class of each sample); it has {', '.join(arrays) or 'nothing'}")
    others = [k for k in arrays if k != "y"]
    key = "x" if "x" in arrays else (others[0] if len(others) == 1 else None)
    if key is None:
        raise EdgekilnError(f"{p}: name the inputs 'x' (it has {', '.join(others) or 'only y'})")
    x, y = arrays[key], arrays["y"]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x) or len(y) == 0:
        raise EdgekilnError(f"{p}: 'y' must be one integer class per sample of '{key}' ({len(x)} samples, y has "
                            f"shape {list(y.shape)} and dtype {y.dtype})")
    return x, y


def learn_target(target: str | Path, x: Any, y: Any, *, out: str | Path | None, learn: Any, gate: Any,
                 new_classes: Sequence[int] = (), checkpoint: Callable[[str], None] | None = None,
                 replay_bytes: int | None = None) -> dict[str, Any]:
    """``edgekiln learn``: adapt a bundle folder into ``out`` (required), or an agent state folder
    in place through its A/B slots (``out`` refused). Returns the outcome (``"target"``:
    ``bundle`` or ``state``); a rejection is an outcome, not an error."""
    path = Path(target)
    if is_state_folder(path):
        if out is not None:
            raise EdgekilnError(f"{path} is an agent state folder: it is adapted in place through its A/B slots, "
                                "so --out is not taken")
        return {"target": "state", **adapt_state(path, x, y, learn=learn, gate=gate, new_classes=new_classes,
                                                  checkpoint=checkpoint, replay_bytes=replay_bytes)}
    if not (path / "manifest.json").is_file():
        raise EdgekilnError(f"{path}: neither a bundle folder (manifest.json) nor an agent state folder "
                            "(state.json, slots/)")
    if out is None:
        raise EdgekilnError(f"{path} is a bundle folder: give --out NEW_BUNDLE for the adapted copy")
    if Path(out).exists():
        raise EdgekilnError(f"--out {out}: already exists (choose a new folder)")
    result = adapt_bundle(path, x, y, learn=learn, gate=gate, new_classes=tuple(new_classes), out=out,
                          checkpoint=checkpoint, replay_bytes=_replay(replay_bytes))
    record = report_record(result.adaptation, result.reasons)
    return {"target": "bundle", "accepted": result.accepted, "status": "adapted" if result.accepted else "rejected",
            "id": record["id"], "reasons": list(result.reasons), "metrics": dict(result.metrics),
            "adaptation": dict(result.adaptation) if result.accepted else record,
            "out": str(result.out) if result.out else None}
