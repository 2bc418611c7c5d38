"""Update notices: the revision follows the assignment, seq delivery, MQTT payloads, the WebSocket route."""

from __future__ import annotations

import json
import threading
import time

import pytest
from fleet_server_helpers import bundle_tar, start_server
from starlette.websockets import WebSocketDisconnect

from edgekiln.fleet.notices import notice_payload


@pytest.fixture
def fleet(tmp_path):
    server = start_server(tmp_path / "srv")
    assert server.publish(bundle_tar(tmp_path, 1), version=1).status_code == 201   # the tars other fleet tests
    assert server.publish(bundle_tar(tmp_path, 2, seed=1), version=2).status_code == 201   # build too
    return server


def _hub(server):
    return server.app.state.fleet.hub


def _revs(server):
    _hub(server).run_once()
    return {r["device"]: r["rev"] for r in server.app.state.fleet.db.query("SELECT device, rev FROM device_notices")}


def _post(server, path, body=None, headers=None, status=201):
    r = server.client.post(path, json=body, headers=headers or server.admin())
    assert r.status_code == status, r.text
    return r.json()


def _report(server, headers, status, version):
    _post(server, "/v1/device/report", {"model": "digits", "version": version, "status": status}, headers, 200)


def test_rev_follows_start_wave_halt_and_not_an_idle_report(fleet):
    devs = {f"cam-{i}": fleet.add_device(f"cam-{i}") for i in range(4)}
    before = _revs(fleet)
    assert set(before.values()) == {"-"}, before
    ro = _post(fleet, "/v1/rollouts", {"model": "digits", "version": 2, "group": "lab", "waves": [50, 100],
                                       "success_threshold": 1.0, "failure_threshold": 0.6})
    first = {d["name"] for d in ro["devices"] if d["selected"]}
    started = _revs(fleet)
    assert {n for n in devs if started[n] != before[n]} == first, (started, first)
    _report(fleet, devs[sorted(first)[0]], "checking", 2)     # idle: nothing moves
    assert _revs(fleet) == started
    for name in first:
        _report(fleet, devs[name], "installed", 2)
    wave2 = _revs(fleet)                                      # the second wave selects the rest
    assert {n for n in devs if wave2[n] != started[n]} == set(devs) - first, wave2
    ro3 = _post(fleet, "/v1/rollouts", {"model": "digits", "version": 1, "group": "lab", "failure_threshold": 0.2})
    running = _revs(fleet)
    assert all(running[n] != wave2[n] for n in devs), running
    for name in sorted(devs)[:2]:
        _report(fleet, devs[name], "failed", 1)
    assert _status(fleet, ro3["id"])["state"] == "halted"
    halted = _revs(fleet)   # back to v2 where it was installed (the same rev as before), else nothing
    assert halted == {n: wave2[n] if n in first else "-" for n in devs}, (halted, wave2, first)


def _status(server, rid):
    return server.client.get(f"/v1/rollouts/{rid}", headers=server.admin()).json()


def test_assignments_equals_assignment_for_every_device(fleet):
    for i in range(6):
        fleet.add_device(f"a-{i}", "lab")
        fleet.add_device(f"b-{i}", "field")
    _post(fleet, "/v1/rollouts", {"model": "digits", "version": 2, "group": "lab", "waves": [50]})
    _post(fleet, "/v1/rollouts", {"model": "digits", "version": 1, "group": "lab", "waves": [30]})
    rid = _post(fleet, "/v1/rollouts", {"model": "digits", "version": 1, "group": "field", "waves": [60]})["id"]
    _post(fleet, f"/v1/rollouts/{rid}/pause", status=200)
    fl = fleet.app.state.fleet
    every = fl.rollouts.assignments()
    assert set(every) == {d["name"] for d in fl.registry.devices()}
    for d in fl.registry.devices():
        assert every[d["name"]] == fl.rollouts.assignment(d["name"], d["group"]), d["name"]
    # lab: the v1 wave (30% of 6) superseded v2 before anyone installed it; field: 60% of 6, paused
    assert sum(bool(a) for a in every.values()) == 2 + 4, every


def test_seq_delivery_to_two_subscribers_and_mqtt_payloads(fleet):
    h = fleet.add_device("cam-1")
    fleet.add_device("cam-2")
    hub, published = _hub(fleet), []
    hub.publisher = lambda dev_id, payload: published.append((dev_id, payload))
    got: dict[str, list] = {"x": [], "y": []}
    events = {"x": threading.Event(), "y": threading.Event()}

    def sub(key):
        def cb(notice):
            got[key].append(notice)
            events[key].set()
        return cb

    unsub_x = hub.subscribe("cam-1", sub("x"))
    hub.subscribe("cam-1", sub("y"))
    hub.run_once()
    events["x"].clear(), events["y"].clear()
    got["x"].clear(), got["y"].clear()
    _post(fleet, "/v1/rollouts", {"model": "digits", "version": 2, "group": "lab"})   # pokes the worker
    assert events["x"].wait(2) and events["y"].wait(2), "no notice within 2 s of the rollout"
    assert got["x"] == got["y"] and got["x"][-1]["rev"] != "-", got
    assert len(json.dumps(got["x"][-1])) <= 128
    unsub_x()
    assert _post(fleet, "/v1/device/report", {"model": "digits", "version": 2, "status": "installed"}, h, 200) == {}
    dev_ids = {r["device"]: r["device_id"] for r in fleet.app.state.fleet.db.query(
        "SELECT device, device_id FROM device_notices")}
    sent = dict(published)
    assert json.loads(sent[dev_ids["cam-1"]]) == {"v": 1, "rev": got["y"][-1]["rev"], "seq": got["y"][-1]["seq"]}
    published.clear()
    r = fleet.client.delete("/v1/devices/cam-2", headers=fleet.admin())
    assert r.status_code == 200, r.text
    hub.run_once()
    assert (dev_ids["cam-2"], b"") in published, published   # the retained notice is cleared
    assert notice_payload({"rev": "", "seq": 9}) == b""
    hub.stop()


def _wait_counted(fleet, reason, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if fleet.client.get("/v1/telemetry/stats", headers=fleet.admin()).json()["dropped"][reason] >= 1:
            return
        time.sleep(0.01)
    raise AssertionError(f"the server did not count a '{reason}' frame within {timeout_s} s")


def test_websocket_sends_current_then_new_and_refuses_bad_tokens(fleet):
    h = fleet.add_device("cam-1")
    with fleet.client.websocket_connect("/v1/device/notices", headers=h) as ws:
        first = ws.receive_json()
        assert first["type"] == "notice" and first["rev"] == "-", first
        _post(fleet, "/v1/rollouts", {"model": "digits", "version": 2, "group": "lab"})
        second = ws.receive_json()
        assert second["rev"] != "-" and second["seq"] > first["seq"], (first, second)
        ws.send_text(json.dumps({"type": "telemetry", "batch": [{"t": 1.0, "health": "ok"}]}))
        ws.send_text("{not json")
        _wait_counted(fleet, "not_json")   # NOTE: else the takeover below may close ws before the frame is read
        with fleet.client.websocket_connect("/v1/device/notices", headers=h) as ws2:
            assert ws2.receive_json()["rev"] == second["rev"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 4000, closed.value.code   # the newer socket took over
            ws2.send_text("x" * 5000)
            with pytest.raises(WebSocketDisconnect) as big:
                ws2.receive_json()
            assert big.value.code == 1009, big.value.code
        with fleet.client.websocket_connect("/v1/device/notices", headers=h) as ws3:
            ws3.receive_json()
            assert fleet.client.delete("/v1/devices/cam-1", headers=fleet.admin()).status_code == 200
            with pytest.raises(WebSocketDisconnect) as revoked:
                ws3.receive_json()
            assert revoked.value.code == 1008, revoked.value.code   # a removed device loses its socket
    stats = fleet.client.get("/v1/telemetry/stats", headers=fleet.admin()).json()
    assert stats["received"] == 1 and stats["dropped"]["not_json"] == 1 and stats["dropped"]["too_large"] == 1, stats
    for bad in ({"Authorization": "Bearer ekd_wrong"}, {}, fleet.admin()):
        with pytest.raises(WebSocketDisconnect) as refused, \
                fleet.client.websocket_connect("/v1/device/notices", headers=bad) as ws:
            ws.receive_json()
        assert refused.value.code == 1008, refused.value.code
