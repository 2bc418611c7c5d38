"""Staged rollouts: waves and thresholds, pause/resume, automatic halt, late joiners, device status."""

from __future__ import annotations

import math

import pytest
from fleet_server_helpers import bundle_tar, start_server

from edgekiln.fleet.rollout import rank_key


@pytest.fixture
def fleet(tmp_path):
    server = start_server(tmp_path / "srv")
    server.publish(bundle_tar(tmp_path, 1), version=1)
    server.publish(bundle_tar(tmp_path, 2, seed=1), version=2)
    return server


def _devices(server, n, group="lab"):
    return {f"cam-{i:02d}": server.add_device(f"cam-{i:02d}", group) for i in range(n)}


def _start(server, **body):
    r = server.client.post("/v1/rollouts", json={"model": "digits", "group": "lab", **body}, headers=server.admin())
    assert r.status_code == 201, r.text
    return r.json()


def _report(server, headers, status, version=2, **extra):
    r = server.client.post("/v1/device/report", json={"model": "digits", "version": version, "status": status, **extra},
                           headers=headers)
    assert r.status_code == 200, r.text


def _status(server, rid):
    return server.client.get(f"/v1/rollouts/{rid}", headers=server.admin()).json()


def _assigned(server, headers):
    return server.client.get("/v1/device/assignment", headers=headers).json()


def test_a_percentage_selects_the_stable_hash_order_of_the_group(fleet):
    devs = _devices(fleet, 10)
    ro = _start(fleet, version=2, waves=[30])
    order = sorted(devs, key=lambda n: rank_key(ro["id"], n))
    selected = sorted(d["name"] for d in ro["devices"] if d["selected"])
    assert selected == sorted(order[:math.ceil(0.3 * 10)]), selected
    for name, h in devs.items():
        a = _assigned(fleet, h)
        assert (a.get("version") == 2) == (name in selected), (name, a)
    assert _assigned(fleet, devs[selected[0]]) == {"model": "digits", "version": 2,
                                                   "target_path": "digits/2/bundle.tar", "rollout_id": ro["id"]}


def test_waves_advance_only_when_the_success_threshold_is_reached(fleet):
    devs = _devices(fleet, 10)
    ro = _start(fleet, version=2, waves=[20, 60, 100], success_threshold=0.5, failure_threshold=0.5)
    wave0 = [d["name"] for d in ro["devices"] if d["selected"]]
    assert len(wave0) == 2 and ro["wave"] == 0
    _report(fleet, devs[wave0[0]], "checking")
    assert _status(fleet, ro["id"])["wave"] == 0
    _report(fleet, devs[wave0[0]], "installed")      # 1/2 installed = 0.5 >= 0.5: wave 1 starts
    st = _status(fleet, ro["id"])
    assert st["wave"] == 1 and sum(d["selected"] for d in st["devices"]) == 6, st
    for d in [d["name"] for d in st["devices"] if d["selected"]][:3]:
        _report(fleet, devs[d], "installed")
    st = _status(fleet, ro["id"])
    assert st["wave"] == 2 and sum(d["selected"] for d in st["devices"]) == 10 and st["state"] == "running", st
    for d in devs:
        _report(fleet, devs[d], "installed")
    assert _status(fleet, ro["id"])["state"] == "done"


def test_the_rollout_halts_when_failures_exceed_the_threshold_and_devices_fall_back(fleet):
    devs = _devices(fleet, 4)
    base = _start(fleet, version=1)
    for h in devs.values():
        _report(fleet, h, "installed", version=1)
    assert _status(fleet, base["id"])["state"] == "done"
    ro = _start(fleet, version=2, waves=[100], failure_threshold=0.25)
    names = list(devs)
    _report(fleet, devs[names[0]], "installed")
    _report(fleet, devs[names[1]], "rolled_back", error="health check: max abs error 1000 > 0.001")
    assert _status(fleet, ro["id"])["state"] == "running"          # 1/4 = 0.25 does not exceed 0.25
    _report(fleet, devs[names[2]], "failed", error="download: hash mismatch")
    st = _status(fleet, ro["id"])
    assert st["state"] == "halted" and "2/4" in st["reason"], st
    # a device that installed v2 keeps it; the others are assigned v1 again
    assert _assigned(fleet, devs[names[0]])["version"] == 2
    for name in names[1:]:
        assert _assigned(fleet, devs[name])["version"] == 1, name
    errors = {d["name"]: d["error"] for d in st["devices"]}
    assert errors[names[1]].startswith("health check") and errors[names[2]].startswith("download")
    # a halted rollout cannot be resumed
    assert fleet.client.post(f"/v1/rollouts/{ro['id']}/resume", headers=fleet.admin()).status_code == 409


def test_pause_stops_new_waves_and_resume_continues(fleet):
    devs = _devices(fleet, 4)
    ro = _start(fleet, version=2, waves=[25, 100], success_threshold=1.0)
    first = next(d["name"] for d in ro["devices"] if d["selected"])
    assert fleet.client.post(f"/v1/rollouts/{ro['id']}/pause", headers=fleet.admin()).json()["state"] == "paused"
    _report(fleet, devs[first], "installed")
    st = _status(fleet, ro["id"])
    assert st["wave"] == 0 and sum(d["selected"] for d in st["devices"]) == 1, st
    assert _assigned(fleet, devs[first])["version"] == 2            # already selected devices keep it
    st = fleet.client.post(f"/v1/rollouts/{ro['id']}/resume", headers=fleet.admin()).json()
    assert st["state"] == "running" and st["wave"] == 1 and all(d["selected"] for d in st["devices"]), st


def test_late_joiners_get_the_groups_current_rollout(fleet):
    devs = _devices(fleet, 2)
    ro = _start(fleet, version=2, waves=[100])
    late = fleet.add_device("cam-late", "lab")
    assert _assigned(fleet, late)["version"] == 2
    st = _status(fleet, ro["id"])
    assert {d["name"] for d in st["devices"] if d["selected"]} == {*devs, "cam-late"}
    # a device in another group is not offered it
    assert _assigned(fleet, fleet.add_device("elsewhere", "other")) == {}


def test_a_new_rollout_cancels_the_unfinished_one(fleet):
    _devices(fleet, 2)
    first = _start(fleet, version=1)
    second = _start(fleet, version=2)
    assert _status(fleet, first["id"])["state"] == "cancelled" and second["state"] == "running"


def test_device_status_records_version_last_seen_error_and_latency(fleet):
    devs = _devices(fleet, 1)
    h = devs["cam-00"]
    _start(fleet, version=2)
    fleet.clock.now += 10
    _assigned(fleet, h)
    row = fleet.client.get("/v1/devices", headers=fleet.admin()).json()[0]
    assert row["last_seen"] == fleet.clock.now and row["active_version"] is None
    fleet.clock.now += 10
    _report(fleet, h, "installed", latency_ms={"p50": 1.5, "p95": 3.25})
    row = fleet.client.get("/v1/devices", headers=fleet.admin()).json()[0]
    assert row == {**row, "active_version": 2, "model": "digits", "last_seen": fleet.clock.now,
                   "latency_ms": {"p50": 1.5, "p95": 3.25}, "last_error": None}
    _report(fleet, h, "failed", version=3, error="disk full")
    row = fleet.client.get("/v1/devices", headers=fleet.admin()).json()[0]
    assert row["last_error"] == "disk full" and row["active_version"] == 2


@pytest.mark.parametrize("body", [{"waves": [50, 20]}, {"waves": [0]}, {"waves": [120]}, {"waves": "50"},
                                  {"success_threshold": 1.5}, {"failure_threshold": -0.1}, {"version": 7},
                                  {"group": "nope"}])
def test_bad_rollouts_are_refused(fleet, body):
    _devices(fleet, 1)
    r = fleet.client.post("/v1/rollouts", json={"model": "digits", "version": 2, "group": "lab", **body},
                          headers=fleet.admin())
    assert r.status_code in (404, 422), (body, r.status_code, r.text)


def test_bad_reports_are_refused(fleet):
    h = _devices(fleet, 1)["cam-00"]
    for body in ({"status": "exploded"}, {"status": "installed", "model": "../x", "version": 1},
                 {"status": "failed", "error": 5}, {"status": "installed", "latency_ms": {"p50": "fast"}},
                 {"status": "checking", "transfer": {"kind": "rsync", "bytes": 1, "fallback": None}},
                 {"status": "checking", "transfer": {"kind": "full", "bytes": -1, "fallback": None}},
                 {"status": "checking", "transfer": {"kind": "full", "bytes": True, "fallback": None}},
                 {"status": "checking", "transfer": {"kind": "full", "bytes": 1}},
                 {"status": "checking", "transfer": {"kind": "full", "bytes": 1, "fallback": 7}},
                 {"status": "checking", "transfer": "delta"}):
        r = fleet.client.post("/v1/device/report", json=body, headers=h)
        assert r.status_code == 422 and r.json()["detail"], (body, r.text)
    for transfer in ({"kind": "delta", "bytes": 1234, "fallback": None},
                     {"kind": "full", "bytes": 10**9, "fallback": "base changed"}, None):
        _report(fleet, h, "installed", transfer=transfer)


def test_devices_already_running_the_version_count_as_installed(fleet):
    devs = _devices(fleet, 2)
    first = _start(fleet, version=2)
    for h in devs.values():
        _report(fleet, h, "installed")
    assert _status(fleet, first["id"])["state"] == "done"
    again = _start(fleet, version=2, waves=[50, 100])   # e.g. re-run after a config change
    assert again["state"] == "done" and all(d["status"] == "installed" for d in again["devices"]), again


LATENCY_CASES = [
    (b'{"p50": 1.5}', 422, "latency_ms must be {p50: number, p95: number}"),
    (b'{"p50": 1.5, "p95": "x"}', 422, "latency_ms must be"),
    (b'{"p50": -1, "p95": 2}', 422, "latency_ms must be"),
    (b'{"p50": 1, "p95": 1e8}', 422, "latency_ms must be"),
    (b'{"p50": 1, "p95": 1e999}', 400, "out of range"),       # refused by the JSON parser already
    (b'{"p50": NaN, "p95": 2}', 400, "NaN is not JSON"),
]


def test_reports_with_odd_latencies_or_unknown_fields_are_refused_and_stored_nan_is_harmless(fleet):
    h = _devices(fleet, 2)["cam-00"]
    for raw, status, reason in LATENCY_CASES:
        body = b'{"model": "digits", "version": 1, "status": "installed", "latency_ms": ' + raw + b"}"
        r = fleet.client.post("/v1/device/report", content=body, headers=h)
        assert r.status_code == status and reason in r.json()["detail"], (raw, r.status_code, r.text)
    r = fleet.client.post("/v1/device/report", json={"status": "checking", "rogue": 1}, headers=h)
    assert r.status_code == 422 and "'rogue' is unknown" in r.json()["detail"], r.text
    _report(fleet, h, "installed", version=1, latency_ms={"p50": 1.25, "p95": 2.5})
    fleet.app.state.fleet.db.execute("UPDATE devices SET latency_p50 = ?, latency_p95 = ? WHERE name = 'cam-01'",
                                     (math.nan, 3.0))  # a row written before reports were checked
    r = fleet.client.get("/v1/devices", headers=fleet.admin())
    assert r.status_code == 200, r.text
    assert {d["name"]: d["latency_ms"] for d in r.json()} == {"cam-00": {"p50": 1.25, "p95": 2.5}, "cam-01": None}


def test_devices_list_rows_print_nothing_for_odd_values():
    from edgekiln.cli.fleet_cmd import _device_row

    odd = {"name": "cam", "group": "lab", "model": None, "active_version": None, "status": None,
           "last_seen": float("inf"), "last_error": None, "latency_ms": {"p50": "fast", "p95": float("nan")}}
    assert _device_row(odd) == ["cam", "lab"] + [""] * 11 + ["-"]
    assert _device_row({"name": "x", "latency_ms": [1, 2], "last_seen": 1e30, "telemetry": [1]})[5:] == [""] * 8 + ["-"]
    good = {**odd, "last_seen": 0.0, "latency_ms": {"p50": 1.234, "p95": 5}}
    assert _device_row(good)[5:] == ["1970-01-01 00:00:00", "", "1.23", "5.00", "", "", "", "", "-"]
    odd_tele = {"health": 3, "variant": None, "disk_free": -5, "age_s": float("nan"), "p50": "x", "p95": None}
    assert _device_row({**good, "telemetry": odd_tele})[7:] == ["1.23", "5.00", "", "3", "", "", "-"]
    live = {"health": "ok", "variant": "int8", "disk_free": 2_500_000_000, "age_s": 12.4, "p50": 0.5, "p95": 0.75}
    assert _device_row({**good, "telemetry": live})[7:] == ["0.50", "0.75", "int8", "ok", "2.5 GB", "12 s ago", "-"]
