"""Staged rollouts (hawkBit-like): waves with a success threshold, pause/resume, automatic halt.

The devices of a group are ordered by a stable hash of ``(rollout_id, device name)``; wave k
selects the first ``ceil(waves[k] * n / 100)`` of them. A selection, once made, is recorded
(``rollout_devices``) and never taken back, so a device that joins later cannot push a selected
one out. Wave k+1 starts when the selected devices' ``installed`` share reaches
``success_threshold``; the rollout halts when the ``failed``/``rolled_back`` share exceeds
``failure_threshold``. Starting a new rollout in a group cancels the group's unfinished ones.

A device's assignment is the newest rollout of its group that selected it, unless that rollout
was halted or cancelled before the device installed it (then the next older one applies).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgekiln.fleet.registry import FleetError, check_name, check_version, target_path

STATES = ("running", "paused", "halted", "done", "cancelled")
ADAPT_STATUSES = ("adapted", "adapt_rejected")   # on-device learning (fleet.adapt): not rollout outcomes
REPORT_STATUSES = ("installed", "failed", "rolled_back", "checking", *ADAPT_STATUSES)
FAILED = ("failed", "rolled_back")


REPORT_KEYS = ("status", "model", "version", "error", "latency_ms", "transfer", "adaptation")
TRANSFER_KINDS = ("delta", "full")
MAX_LATENCY_MS = 1e7
ADAPTATIONS_KEPT = 20        # per device, newest first


def check_report(body: dict[str, Any]) -> tuple[str, str | None, int | None, str | None, dict[str, float]]:
    """A device report as ``(status, model, version, error, latency)``, or a 422 naming the bad field.

    ``latency_ms`` is absent, null, or exactly ``{p50, p95}`` with finite numbers in [0, 1e7]."""
    unknown = sorted(set(body) - set(REPORT_KEYS))
    if unknown:
        raise FleetError(f"report field '{str(unknown[0])[:40]}' is unknown (use {', '.join(REPORT_KEYS)})", 422)
    status = body.get("status")
    if status not in REPORT_STATUSES:
        raise FleetError(f"report status {str(status)[:40]!r} is not one of {', '.join(REPORT_STATUSES)}", 422)
    model = check_name(body["model"], "model") if body.get("model") is not None else None
    version = check_version(body["version"]) if body.get("version") is not None else None
    error = body.get("error")
    if error is not None and not isinstance(error, str):
        raise FleetError("report error must be a string", 422)
    check_transfer(body.get("transfer"))
    if status in ADAPT_STATUSES:
        if model is None or version is None:
            raise FleetError(f"a {status} report needs model and version", 422)
        check_adaptation(body.get("adaptation"))
    elif body.get("adaptation") is not None:
        raise FleetError(f"report field 'adaptation' belongs to {' and '.join(ADAPT_STATUSES)} reports only", 422)
    latency = body.get("latency_ms")
    if latency is None:
        return status, model, version, None if error is None else error[:2000], {}
    if not isinstance(latency, dict) or set(latency) != {"p50", "p95"} or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and 0 <= v <= MAX_LATENCY_MS for v in latency.values()):
        raise FleetError(f"report latency_ms must be {{p50: number, p95: number}}, each in [0, {MAX_LATENCY_MS:g}]",
                         422)
    return status, model, version, None if error is None else error[:2000], {k: float(v) for k, v in latency.items()}


def check_transfer(transfer: Any) -> None:
    """A report's ``transfer``: absent, null, or ``{kind: delta|full, bytes: int >= 0, fallback: str|null}``."""
    if transfer is None:
        return
    if not isinstance(transfer, dict) or set(transfer) != {"kind", "bytes", "fallback"} \
            or transfer["kind"] not in TRANSFER_KINDS or isinstance(transfer["bytes"], bool) \
            or not isinstance(transfer["bytes"], int) or not 0 <= transfer["bytes"] < 2**63 \
            or not (transfer["fallback"] is None or isinstance(transfer["fallback"], str)
                    and len(transfer["fallback"]) <= 200):
        raise FleetError("report transfer must be {kind: delta|full, bytes: integer >= 0, "
                         "fallback: string (at most 200 characters) or null}", 422)


def check_adaptation(record: Any) -> dict[str, Any]:
    """An ``adapted``/``adapt_rejected`` report's ``adaptation`` (docs/fleet-protocol.md): at most
    2 KB of JSON with the keys of :data:`~edgekiln.fleet.adapt.REPORT_KEYS`, typed, finite numbers.
    It is information about the device, never a model: nothing is installed from it."""
    from edgekiln.fleet.adapt import GATE_KEYS, MAX_REPORT_BYTES
    from edgekiln.fleet.adapt import REPORT_KEYS as ADAPTATION_KEYS

    def bad(what: str) -> FleetError:
        return FleetError(f"report adaptation {what}", 422)

    if not isinstance(record, dict):
        raise bad("must be a JSON object")
    if len(json.dumps(record, separators=(",", ":"))) > MAX_REPORT_BYTES:
        raise bad("is larger than 2 KB")
    unknown = sorted(set(record) - set(ADAPTATION_KEYS))
    if unknown:
        raise bad(f"field '{str(unknown[0])[:40]}' is unknown")
    ident = record.get("id")
    if not isinstance(ident, str) or len(ident) != 12 or any(c not in "0123456789abcdef" for c in ident):
        raise bad("id must be 12 lowercase hex digits")
    for key, value in record.items():
        if not _adaptation_field_ok(key, value, GATE_KEYS):
            raise bad(f"{key} {str(value)[:40]!r} has the wrong type or range")
    return record


def _adaptation_field_ok(key: str, value: Any, gate_keys: tuple[str, ...]) -> bool:
    if key == "id":
        return True   # checked above
    if key == "scope":
        return value in ("head", "last-block")
    if key == "gate":
        return isinstance(value, dict) and set(value) <= set(gate_keys) and all(
            v is None or _finite(v, 1e12) for v in value.values())
    if key == "reasons":
        return isinstance(value, list) and len(value) <= 8 and all(isinstance(r, str) and len(r) <= 500 for r in value)
    if key in ("base_sha256", "variant", "created"):
        return isinstance(value, str) and len(value) <= 80 and value.isprintable()
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53


def _finite(value: Any, limit: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and abs(value) <= limit


@dataclass(frozen=True, kw_only=True)
class RolloutSpec:
    """What ``POST /v1/rollouts`` asks for."""

    model: str
    version: int
    group: str
    waves: tuple[float, ...] = (100.0,)          # cumulative percentages of the group, ascending
    success_threshold: float = 1.0               # installed share that lets the next wave start
    failure_threshold: float = 0.2               # failed share above which the rollout halts

    def check(self) -> RolloutSpec:
        check_name(self.model, "model")
        check_version(self.version)
        check_name(self.group, "group")
        waves = tuple(float(w) for w in self.waves)
        if not waves or len(waves) > 100 or any(not 0 < w <= 100 for w in waves) or list(waves) != sorted(waves):
            raise FleetError(f"waves {list(self.waves)} must be ascending percentages in (0, 100]", 422)
        for name in ("success_threshold", "failure_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise FleetError(f"{name} {value!r} must be a fraction in [0, 1]", 422)
        return self


def rank_key(rollout_id: int, device: str) -> str:
    return hashlib.sha256(f"{rollout_id}:{device}".encode()).hexdigest()


class Rollouts:
    """Rollout state machine over the database; every method is one transaction."""

    def __init__(self, db: Any, clock: Callable[[], float]) -> None:
        self.db, self.clock = db, clock

    def start(self, spec: RolloutSpec) -> dict[str, Any]:
        spec.check()
        with self.db.transaction(write_lock=True) as tx:
            if not tx.query("SELECT 1 FROM versions WHERE model = ? AND version = ?", (spec.model, spec.version)):
                raise FleetError(f"{spec.model} version {spec.version} is not published", 404)
            if not tx.query("SELECT 1 FROM groups WHERE name = ?", (spec.group,)):
                raise FleetError(f"group '{spec.group}' does not exist (add a device to it first)", 404)
            tx.execute("UPDATE rollouts SET state = 'cancelled', reason = 'superseded by a newer rollout' "
                       "WHERE group_name = ? AND state IN ('running', 'paused')", (spec.group,))
            rid = tx.query("INSERT INTO rollouts (model, version, group_name, waves, success_threshold, "
                           "failure_threshold, state, wave, created) VALUES (?, ?, ?, ?, ?, ?, 'running', 0, ?) "
                           "RETURNING id", (spec.model, spec.version, spec.group, json.dumps(list(spec.waves)),
                                            float(spec.success_threshold), float(spec.failure_threshold),
                                            self.clock()))[0]["id"]
            self._select(tx, self._row(tx, rid))
            self._evaluate(tx, self._row(tx, rid))
        return self.status(int(rid))

    def _row(self, tx: Any, rid: int) -> dict[str, Any]:
        rows = tx.query("SELECT * FROM rollouts WHERE id = ?", (rid,))
        if not rows:
            raise FleetError(f"rollout {rid} does not exist", 404)
        row = dict(rows[0])
        row["waves"] = json.loads(row["waves"])
        return row

    def _select(self, tx: Any, r: dict[str, Any]) -> None:
        """Record the devices the current wave selects (running and done rollouts only)."""
        if r["state"] not in ("running", "done"):
            return
        rows = tx.query("SELECT name, model, active_version FROM devices WHERE group_name = ?", (r["group_name"],))
        rows.sort(key=lambda row: rank_key(r["id"], row["name"]))
        count = math.ceil(r["waves"][r["wave"]] * len(rows) / 100 - 1e-9)
        chosen = {row["device"] for row in tx.query("SELECT device FROM rollout_devices WHERE rollout_id = ?",
                                                    (r["id"],))}
        for row in rows[:count]:
            if row["name"] not in chosen:
                # NOTE: a device already running this exact version will not install it again (nor report
                # it), so it counts as installed at once.
                has_it = row["model"] == r["model"] and row["active_version"] == r["version"]
                tx.execute("INSERT INTO rollout_devices (rollout_id, device, wave, status, updated) "
                           "VALUES (?, ?, ?, ?, ?)",
                           (r["id"], row["name"], r["wave"], "installed" if has_it else None, self.clock()))

    def _evaluate(self, tx: Any, r: dict[str, Any]) -> None:
        """Halt on too many failures; start the next wave (or finish) on enough successes."""
        while r["state"] == "running":
            rows = tx.query("SELECT status FROM rollout_devices WHERE rollout_id = ?", (r["id"],))
            if not rows:
                return
            failed = sum(row["status"] in FAILED for row in rows)
            installed = sum(row["status"] == "installed" for row in rows)
            if failed / len(rows) > r["failure_threshold"]:
                tx.execute("UPDATE rollouts SET state = 'halted', reason = ? WHERE id = ?",
                           (f"failure rate {failed}/{len(rows)} exceeds {r['failure_threshold']:g}", r["id"]))
                return
            if installed / len(rows) < r["success_threshold"]:
                return
            if r["wave"] + 1 >= len(r["waves"]):
                tx.execute("UPDATE rollouts SET state = 'done' WHERE id = ?", (r["id"],))
                return
            tx.execute("UPDATE rollouts SET wave = wave + 1 WHERE id = ?", (r["id"],))
            r = self._row(tx, r["id"])
            self._select(tx, r)

    def set_paused(self, rid: int, paused: bool) -> dict[str, Any]:
        with self.db.transaction(write_lock=True) as tx:
            r = self._row(tx, rid)
            want, have = ("paused", "running") if paused else ("running", "paused")
            if r["state"] == want:
                pass
            elif r["state"] != have:
                raise FleetError(f"rollout {rid} is {r['state']}; only a {have} rollout can be "
                                 f"{'paused' if paused else 'resumed'}", 409)
            else:
                tx.execute("UPDATE rollouts SET state = ? WHERE id = ?", (want, rid))
                r["state"] = want
                self._select(tx, r)
                self._evaluate(tx, r)
        return self.status(rid)

    def status(self, rid: int) -> dict[str, Any]:
        with self.db.transaction() as tx:
            r = self._row(tx, rid)
            sel = {row["device"]: row for row in tx.query(
                "SELECT device, wave, status, error FROM rollout_devices WHERE rollout_id = ?", (rid,))}
            devices = tx.query("SELECT name, active_version, model, last_seen FROM devices WHERE group_name = ? "
                               "ORDER BY name", (r["group_name"],))
        out = []
        for d in devices:
            s = sel.get(d["name"])
            out.append({"name": d["name"], "selected": s is not None, "wave": None if s is None else s["wave"],
                        "status": None if s is None else s["status"], "version": d["active_version"],
                        "error": None if s is None else s["error"], "last_seen": d["last_seen"]})
        return {"id": int(r["id"]), "model": r["model"], "version": int(r["version"]), "group": r["group_name"],
                "state": r["state"], "reason": r["reason"], "wave": int(r["wave"]), "waves": r["waves"],
                "success_threshold": r["success_threshold"], "failure_threshold": r["failure_threshold"],
                "devices": out}

    def list(self) -> list[dict[str, Any]]:
        return [{**r, "group": r.pop("group_name"), "waves": json.loads(r["waves"])}
                for r in self.db.query("SELECT id, model, version, group_name, state, wave, waves FROM rollouts "
                                       "ORDER BY id")]

    # -- the device side -----------------------------------------------------------------------
    def assignment(self, device: str, group: str) -> dict[str, Any]:
        rows = self.db.query(
            "SELECT r.id, r.model, r.version, r.state, rd.status FROM rollouts r JOIN rollout_devices rd "
            "ON rd.rollout_id = r.id WHERE rd.device = ? AND r.group_name = ? ORDER BY r.id DESC", (device, group))
        return _pick(rows)

    def assignments(self, tx: Any = None) -> dict[str, dict[str, Any]]:
        """Every device's :meth:`assignment` (``{}`` when none) in one query, by the same rule."""
        sql = ("SELECT d.name AS device, r.id, r.model, r.version, r.state, rd.status FROM devices d "
               "LEFT JOIN rollout_devices rd ON rd.device = d.name "
               "LEFT JOIN rollouts r ON r.id = rd.rollout_id AND r.group_name = d.group_name "
               "ORDER BY d.name, r.id DESC")
        rows = (tx or self.db).query(sql)
        by_device: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_device.setdefault(row["device"], [])
            if row["id"] is not None:
                by_device[row["device"]].append(row)
        return {device: _pick(picked) for device, picked in by_device.items()}

    def was_assigned(self, device: str, model: str, version: int) -> bool:
        return bool(self.db.query(
            "SELECT 1 FROM rollout_devices rd JOIN rollouts r ON r.id = rd.rollout_id "
            "WHERE rd.device = ? AND r.model = ? AND r.version = ?", (device, model, version)))

    def device_joined(self, group: str) -> None:
        """Offer the group's current rollouts to a device that joined later, by the same rule."""
        with self.db.transaction(write_lock=True) as tx:
            for row in tx.query("SELECT id FROM rollouts WHERE group_name = ? AND state IN ('running', 'done')",
                                (group,)):
                r = self._row(tx, row["id"])
                self._select(tx, r)
                self._evaluate(tx, r)

    def report(self, device: str, group: str, body: dict[str, Any]) -> None:
        status, model, version, error, latency = check_report(body)
        now = self.clock()
        if status in ADAPT_STATUSES:
            self._adaptation(device, status, str(model), int(version or 0), body["adaptation"], now)
            return
        with self.db.transaction(write_lock=True) as tx:
            sets, params = ["last_seen = ?", "status = ?"], [now, status]
            if status == "installed" and model is not None and version is not None:
                sets += ["model = ?", "active_version = ?"]
                params += [model, version]
            if status in FAILED:
                sets.append("last_error = ?")
                params.append(error or status)
            if latency:
                sets += ["latency_p50 = ?", "latency_p95 = ?"]
                params += [latency["p50"], latency["p95"]]
            tx.execute(f"UPDATE devices SET {', '.join(sets)} WHERE name = ?", (*params, device))
            if model is None or version is None or status == "checking":
                return
            for row in tx.query(
                    "SELECT r.id FROM rollouts r JOIN rollout_devices rd ON rd.rollout_id = r.id WHERE rd.device = ? "
                    "AND r.group_name = ? AND r.model = ? AND r.version = ?", (device, group, model, version)):
                tx.execute("UPDATE rollout_devices SET status = ?, error = ?, updated = ? "
                           "WHERE rollout_id = ? AND device = ?", (status, error, now, row["id"], device))
                self._evaluate(tx, self._row(tx, row["id"]))

    def _adaptation(self, device: str, status: str, model: str, version: int, record: dict[str, Any],
                    now: float) -> None:
        """Keep the device's newest :data:`ADAPTATIONS_KEPT` adaptation reports. ``rollout_devices``
        and the device's install status are not touched: an adaptation is not a rollout outcome."""
        with self.db.transaction(write_lock=True) as tx:
            tx.execute("UPDATE devices SET last_seen = ? WHERE name = ?", (now, device))
            tx.execute("INSERT INTO device_adaptations (device, received, model, version, id, status, summary) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (device, now, model, version, record["id"], status,
                                                        json.dumps(record, separators=(",", ":"))))
            tx.execute("DELETE FROM device_adaptations WHERE device = ? AND seq NOT IN (SELECT seq FROM "
                       "device_adaptations WHERE device = ? ORDER BY seq DESC LIMIT ?)",
                       (device, device, ADAPTATIONS_KEPT))


def _pick(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The assignment among a device's rollouts (newest first): the newest that is running, paused
    or done, or that the device installed before it was halted or cancelled."""
    for row in rows:
        if row["state"] in ("running", "paused", "done") or row["status"] == "installed":
            return {"model": row["model"], "version": int(row["version"]),
                    "target_path": target_path(row["model"], int(row["version"])), "rollout_id": int(row["id"])}
    return {}
