"""The director repository (fleet/director.py) through the real app in-process: per-device signed
assignments, versions that only go up, re-signing at half expiry, auth, forget, halted rollouts."""

from __future__ import annotations

import hashlib

import pytest
from fleet_server_helpers import bundle_tar, start_server
from tuf.api.metadata import Metadata


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("director"))
    tmp = tmp_path_factory.mktemp("tars")
    for version in (1, 2):
        assert s.publish(bundle_tar(tmp, version), "digits", version).status_code == 201
    return s


def _get(server, headers, name):
    r = server.client.get(f"/director/metadata/{name}", headers=headers)
    assert r.status_code == 200, (name, r.status_code, r.text)
    return Metadata.from_bytes(r.content)


def _rollout(server, version, group, **kw):
    r = server.client.post("/v1/rollouts", json={"model": "digits", "version": version, "group": group, **kw},
                           headers=server.admin())
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _assignment(server, headers):
    """(targets, snapshot, timestamp) versions and the signed assignment of the calling device."""
    ts = _get(server, headers, "timestamp.json")
    snap = _get(server, headers, "snapshot.json")
    targets = _get(server, headers, "targets.json")
    assert ts.signed.snapshot_meta.version == snap.signed.version
    assert snap.signed.meta["targets.json"].version == targets.signed.version
    info = targets.signed.targets.get("assignment")
    return (targets.signed.version, snap.signed.version, ts.signed.version), info


def test_a_devices_assignment_is_signed_bound_to_its_token_and_versions_only_go_up(server):
    headers = server.add_device("d-up", group="g-up")
    token = headers["Authorization"].split()[1]
    root = _get(server, headers, "1.root.json")
    (v0, _, _), info = _assignment(server, headers)
    assert info is None, "no rollout yet: no assignment"
    _rollout(server, 1, "g-up")
    (v1, s1, t1), info = _assignment(server, headers)
    assert v1 == v0 + 1, (v0, v1)
    assert info.custom["device_id"] == hashlib.sha256(token.encode()).hexdigest()[:32]
    assert (info.custom["model"], info.custom["version"], info.custom["device"]) == ("digits", 1, "d-up")
    listed = server.client.get("/v1/models", headers=server.admin()).json()
    assert info.length == next(v["length"] for v in listed if v["version"] == 1)
    for md in (_get(server, headers, "timestamp.json"), _get(server, headers, "targets.json")):
        root.verify_delegate(md.signed.type, md)   # signed by the key the director root names
    assert _assignment(server, headers)[0] == (v1, s1, t1), "an unchanged assignment must not be re-signed"
    _rollout(server, 2, "g-up")
    (v2, s2, t2), info = _assignment(server, headers)
    assert (v2, s2, t2) == (v1 + 1, s1 + 1, t1 + 1) and info.custom["version"] == 2
    # re-signed once the timestamp (1 day of validity) passes half of it, not before
    server.clock.now += 0.49 * 86400
    assert _assignment(server, headers)[0] == (v2, s2, t2)
    server.clock.now += 0.02 * 86400
    (v3, s3, t3), same = _assignment(server, headers)
    assert t3 == t2 + 1 and same.custom == info.custom, ((v2, s2, t2), (v3, s3, t3))
    assert _get(server, headers, "timestamp.json").signed.expires.timestamp() > server.clock.now + 0.9 * 86400
    assert server.client.get("/director/metadata/1.timestamp.json", headers=headers).status_code == 404
    assert server.client.get("/director/metadata/other.json", headers=headers).status_code == 404


def test_only_a_device_token_reads_director_metadata_and_only_its_own(server):
    a = server.add_device("d-auth-a", group="g-auth")
    b = server.add_device("d-auth-b", group="g-auth")
    _rollout(server, 1, "g-auth")
    assert server.client.get("/director/metadata/timestamp.json").status_code == 401
    assert server.client.get("/director/metadata/timestamp.json",
                             headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    assert server.client.get("/director/metadata/timestamp.json", headers=server.admin()).status_code == 403
    assert _assignment(server, a)[1].custom["device"] == "d-auth-a"
    assert _assignment(server, b)[1].custom["device"] == "d-auth-b"


def test_forget_deletes_a_removed_devices_metadata(server):
    headers = server.add_device("d-gone", group="g-gone")
    _rollout(server, 1, "g-gone")
    _assignment(server, headers)
    db = server.app.state.fleet.db
    count = "SELECT COUNT(*) AS n FROM director_metadata WHERE device = ?"
    assert db.query(count, ("d-gone",))[0]["n"] == 3
    assert server.client.delete("/v1/devices/d-gone", headers=server.admin()).status_code == 200
    assert db.query(count, ("d-gone",))[0]["n"] == 0
    assert server.client.get("/director/metadata/timestamp.json", headers=headers).status_code == 401


def test_a_halted_rollout_signs_the_older_version_again(server):
    headers = server.add_device("d-halt", group="g-halt")
    first = _rollout(server, 1, "g-halt")
    r = server.client.post("/v1/device/report", json={"model": "digits", "version": 1, "status": "installed"},
                           headers=headers)
    assert r.status_code == 200, r.text
    assert _assignment(server, headers)[1].custom["version"] == 1
    second = _rollout(server, 2, "g-halt", failure_threshold=0.0)
    (before, _, _), info = _assignment(server, headers)
    assert (info.custom["version"], info.custom["rollout_id"]) == (2, second)
    r = server.client.post("/v1/device/report", json={"model": "digits", "version": 2, "status": "rolled_back",
                                                       "error": "health check failed"}, headers=headers)
    assert r.status_code == 200, r.text
    (after, _, _), info = _assignment(server, headers)
    assert (info.custom["version"], info.custom["rollout_id"], after) == (1, first, before + 1)
    rows = server.app.state.fleet.db.query("SELECT role, COUNT(*) AS n FROM director_metadata WHERE device = ? "
                                           "GROUP BY role", ("d-halt",))
    assert {r["role"]: r["n"] for r in rows} == {"targets": 2, "snapshot": 2, "timestamp": 2}
