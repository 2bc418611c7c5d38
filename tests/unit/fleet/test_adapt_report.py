"""Reports of on-device adaptations on the server (stored apart from rollouts, checked, shown in
`devices list`), the telemetry key `adapt`, and the recovery of an adaptation killed after its switch."""

from __future__ import annotations

import json
import shutil

import pytest
from fleet_server_helpers import start_server

from edgekiln.cli.fleet_cmd import _device_row
from edgekiln.fleet.adapt import report_record
from edgekiln.fleet.slots import SlotStore
from edgekiln.fleet.telemetry import TelemetryRefused, check_item

RECORD = {"version": 1, "id": "0123456789ab", "n": 1, "base_sha256": "ab" * 32, "variant": "fp32", "scope": "head",
          "classes_before": 8, "classes_after": 10, "samples": 40, "replay_bytes": 65_000,
          "created": "2026-12-07T20:00:00+00:00",
          "gate": {"old_before": 0.99, "old_after": 0.985, "old_drop": 0.005, "budget": 0.01, "new_before": 0.0,
                   "new_after": 0.9, "n_old": 200, "n_new": 10, "health_max_abs_error": 0.0}}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    return start_server(tmp_path_factory.mktemp("adapt-report") / "srv")


def _post(server, headers, body):
    return server.client.post("/v1/device/report", json=body, headers=headers)


def _adapt_rows(server, device):
    return server.app.state.fleet.db.query("SELECT device, model, version, id, status, summary FROM "
                                           "device_adaptations WHERE device = ? ORDER BY seq", (device,))


def test_adaptation_reports_are_stored_apart_and_never_count_as_rollout_outcomes(fleet):
    h = fleet.add_device("cam-1")
    db = fleet.app.state.fleet.db
    # NOTE: the rollout's record of the device is written directly: publishing a bundle for it
    # would only add seconds (tests/unit/fleet/test_rollout.py covers how rollouts record devices)
    db.execute("INSERT INTO rollout_devices (rollout_id, device, wave, status, error, updated) "
               "VALUES (7, 'cam-1', 0, 'installed', NULL, 1.0)")
    assert _post(fleet, h, {"model": "digits", "version": 1, "status": "installed"}).status_code == 200
    before = db.query("SELECT * FROM rollout_devices")
    rejected = report_record({**RECORD, "id": "ffffffffffff"}, ["old classes dropped 3.0% (budget 1.0%)"])
    for status, record in (("adapt_rejected", rejected), ("adapted", RECORD)):
        r = _post(fleet, h, {"model": "digits", "version": 1, "status": status, "adaptation": record})
        assert r.status_code == 200, r.text
    assert db.query("SELECT * FROM rollout_devices") == before, "an adaptation is not a rollout outcome"
    rows = _adapt_rows(fleet, "cam-1")
    assert [(r["device"], r["version"], r["id"], r["status"]) for r in rows] == [
        ("cam-1", 1, "ffffffffffff", "adapt_rejected"), ("cam-1", 1, "0123456789ab", "adapted")]
    assert json.loads(rows[0]["summary"])["reasons"] == ["old classes dropped 3.0% (budget 1.0%)"]
    row = fleet.client.get("/v1/devices", headers=fleet.admin()).json()[0]
    assert (row["status"], row["active_version"], row["adapted"]) == ("installed", 1, "0123456789ab"), row
    assert _device_row(row)[-1] == "0123456789ab"
    assert _device_row({**row, "adapted": None})[-1] == "-"
    # a newer install is not adapted: the old adaptation no longer shows
    assert _post(fleet, h, {"model": "digits", "version": 2, "status": "installed"}).status_code == 200
    assert fleet.client.get("/v1/devices", headers=fleet.admin()).json()[0]["adapted"] is None
    assert fleet.client.delete("/v1/devices/cam-1", headers=fleet.admin()).status_code < 300
    assert _adapt_rows(fleet, "cam-1") == [], "a removed device's adaptation reports go with it"


def test_only_the_newest_twenty_adaptation_reports_are_kept(fleet):
    h = fleet.add_device("cam-2")
    for i in range(23):
        body = {"model": "digits", "version": 1, "status": "adapted", "adaptation": {"id": f"{i:012x}"}}
        assert _post(fleet, h, body).status_code == 200
    ids = [r["id"] for r in _adapt_rows(fleet, "cam-2")]
    assert ids == [f"{i:012x}" for i in range(3, 23)], ids


BAD = [
    ({"status": "adapted", "model": "digits", "version": 1}, "must be a JSON object"),
    ({"status": "adapted", "adaptation": RECORD}, "needs model and version"),
    ({"status": "installed", "model": "digits", "version": 1, "adaptation": RECORD}, "adapted and adapt_rejected"),
    ({"status": "adapted", "model": "digits", "version": 1, "adaptation": {**RECORD, "id": "XYZ"}}, "12 lowercase"),
    ({"status": "adapted", "model": "digits", "version": 1, "adaptation": {**RECORD, "weights": [1]}},
     "'weights' is unknown"),
    ({"status": "adapted", "model": "digits", "version": 1, "adaptation": {**RECORD, "samples": -1}}, "samples"),
    ({"status": "adapted", "model": "digits", "version": 1, "adaptation": {**RECORD, "n": True}}, "n 'True'"),
    ({"status": "adapted", "model": "digits", "version": 1, "adaptation": {**RECORD, "scope": "all"}}, "scope"),
    ({"status": "adapted", "model": "digits", "version": 1,
      "adaptation": {**RECORD, "gate": {**RECORD["gate"], "old_drop": 1e300}}}, "gate"),
    ({"status": "adapted", "model": "digits", "version": 1,
      "adaptation": {**RECORD, "gate": {"features": 1.0}}}, "gate"),
    ({"status": "adapt_rejected", "model": "digits", "version": 1,
      "adaptation": {**RECORD, "reasons": ["x" * 400] * 6}}, "larger than 2 KB"),
]


def test_malformed_adaptation_reports_are_refused_with_422(fleet):
    h = fleet.add_device("cam-3")
    for body, message in BAD:
        r = _post(fleet, h, body)
        assert r.status_code == 422 and message in r.text, (body, r.status_code, r.text)
    assert _adapt_rows(fleet, "cam-3") == []


def test_the_report_record_keeps_the_known_keys_and_fits_the_server():
    record = report_record({**RECORD, "extra": 1, "gate": {**RECORD["gate"], "shift": 2.0, "old_after": float("nan")}},
                           ["r" * 1000] * 9)
    assert set(record) == set(RECORD) | {"reasons"} and "shift" not in record["gate"], record
    assert record["gate"]["old_after"] is None and len(record["reasons"]) == 4
    assert len(json.dumps(record)) <= 2048, len(json.dumps(record))
    assert len(report_record(None)["id"]) == 12


def test_the_report_record_drops_reasons_until_it_fits(monkeypatch):
    import edgekiln.fleet.adapt as fleet_adapt

    monkeypatch.setattr(fleet_adapt, "MAX_REPORT_BYTES", 1200)
    record = report_record(RECORD, ["r" * 300] * 4)
    size = len(json.dumps(record, separators=(",", ":")))
    assert size <= 1200 and len(record["reasons"]) == 2, (size, len(record["reasons"]))


def test_the_telemetry_key_adapt_is_checked():
    item = {"t": 1, "adapt": "0123456789ab"}
    assert check_item(dict(item)) == item
    assert check_item({"t": 1, "adapt": None}) == {"t": 1, "adapt": None}
    for bad in (12, "x" * 17, "", "a\nb"):
        with pytest.raises(TelemetryRefused) as refused:
            check_item({"t": 1, "adapt": bad})
        assert refused.value.reason == "bad_type", (bad, refused.value)


def test_recovery_completes_an_adaptation_killed_after_its_switch(tmp_path):
    """The switch is the commit point; state.json and the report come after it and are rebuilt
    from the seal (a kill at ``symlink-renamed``)."""
    store = SlotStore(tmp_path / "state")
    store.ensure_layout()
    store.slot_path("a").mkdir()
    (store.slot_path("a") / "manifest.json").write_text("{}")   # recovery reads seals, not models
    store.seal("a", model="digits", version=1, target_path="digits/1/bundle.tar", sha256="0" * 64)
    store.switch("a")
    store.write_state({**store.read_state(), "model": "digits", "active_version": 1, "active_slot": "a"})
    assert store.recover() == []
    shutil.copytree(store.slot_path("a"), store.slot_path("b"))
    store.seal("b", model="digits", version=1, target_path="digits/1/bundle.tar", sha256="1" * 64,
               adaptation={**RECORD, "private": "not for the server"})
    store.switch("b")                                   # killed here: state.json still says slot a
    notes = store.recover()
    assert notes == ["adaptation 0123456789ab had been switched before the crash: completed"], notes
    state = store.read_state()
    assert (state["active_slot"], state["adaptation"]["id"], state["last_adaptation"]["status"]) == \
        ("b", "0123456789ab", "adapted"), state
    assert state["outbox"][-1]["status"] == "adapted" and "private" not in state["outbox"][-1]["adaptation"]
    assert state["history"][-1]["status"] == "adapted", state["history"]
    assert store.recover() == [], "a second recovery finds nothing to do"
    assert store.active().adaptation["id"] == "0123456789ab"
