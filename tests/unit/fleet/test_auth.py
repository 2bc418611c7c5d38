"""Every endpoint authorizes: admin-only, device-only, and the download rule."""

from __future__ import annotations

import sqlite3

import pytest
from fleet_server_helpers import ADMIN, bundle_tar, start_server


@pytest.fixture
def server(tmp_path):
    return start_server(tmp_path / "srv")


ADMIN_ONLY = [("POST", "/v1/devices", {"json": {"name": "x", "group": "g"}}), ("GET", "/v1/devices", {}),
              ("DELETE", "/v1/devices/cam-1", {}),
              ("POST", "/v1/groups", {"json": {"name": "g", "channel": "beta"}}), ("GET", "/v1/groups", {}),
              ("POST", "/v1/models/digits/versions/9", {"content": b"tar"}), ("GET", "/v1/models", {}),
              ("POST", "/v1/rollouts", {"json": {"model": "digits", "version": 1, "group": "lab"}}),
              ("GET", "/v1/rollouts", {}), ("GET", "/v1/rollouts/1", {}), ("POST", "/v1/rollouts/1/pause", {}),
              ("POST", "/v1/rollouts/1/resume", {})]
DEVICE_ONLY = [("GET", "/v1/device/assignment", {}),
               ("POST", "/v1/device/report", {"json": {"model": "digits", "version": 1, "status": "installed"}})]


def test_every_endpoint_refuses_missing_and_unknown_tokens(server):
    for method, path, kw in ADMIN_ONLY + DEVICE_ONLY + [("GET", "/tuf/metadata/timestamp.json", {}),
                                                        ("GET", "/tuf/targets/digits/1/bundle.tar", {})]:
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}):
            r = server.client.request(method, path, headers=headers, **kw)
            assert r.status_code == 401, (method, path, headers, r.status_code)


def test_a_device_token_cannot_use_admin_endpoints_nor_publish(server, tmp_path):
    dev = server.add_device("cam-1")
    for method, path, kw in ADMIN_ONLY:
        r = server.client.request(method, path, headers=dev, **kw)
        assert r.status_code == 403, (method, path, r.status_code)
    r = server.client.post("/v1/models/digits/versions/1", content=bundle_tar(tmp_path, 1), headers=dev)
    assert r.status_code == 403
    assert server.client.get("/v1/models", headers=server.admin()).json() == []


def test_the_admin_token_cannot_act_as_a_device(server):
    for method, path, kw in DEVICE_ONLY:
        assert server.client.request(method, path, headers=server.admin(), **kw).status_code == 403, path


def test_a_device_reads_only_its_own_assignment(server, tmp_path):
    server.client.post("/v1/groups", json={"name": "lab", "channel": "stable"}, headers=server.admin())
    a, b = server.add_device("cam-a", "lab"), server.add_device("cam-b", "other")
    server.publish(bundle_tar(tmp_path, 1))
    r = server.client.post("/v1/rollouts", json={"model": "digits", "version": 1, "group": "other"},
                           headers=server.admin())
    assert r.status_code == 201, r.text
    assert server.client.get("/v1/device/assignment", headers=b).json()["version"] == 1
    assert server.client.get("/v1/device/assignment", headers=a).json() == {}
    # there is no way to name another device: extra parameters are ignored, the token decides
    assert server.client.get("/v1/device/assignment", params={"device": "cam-b"}, headers=a).json() == {}
    # a device's report changes only its own record; naming another device is an unknown key (422)
    report = {"model": "digits", "version": 1, "status": "failed", "error": "boom"}
    r = server.client.post("/v1/device/report", json={**report, "device": "cam-b"}, headers=a)
    assert r.status_code == 422 and "device" in r.text, (r.status_code, r.text)
    assert server.client.post("/v1/device/report", json=report, headers=a).status_code == 200
    rows = {d["name"]: d for d in server.client.get("/v1/devices", headers=server.admin()).json()}
    assert rows["cam-a"]["last_error"] == "boom" and rows["cam-b"]["last_error"] is None


def test_a_device_cannot_download_another_channels_unassigned_bundle(server, tmp_path):
    dev = server.add_device("cam-1", "lab")            # group lab follows stable
    server.publish(bundle_tar(tmp_path, 1), version=1, channel="stable")
    server.publish(bundle_tar(tmp_path, 2, seed=1), version=2, channel="beta")
    assert server.client.get("/tuf/targets/digits/1/bundle.tar", headers=dev).status_code == 200
    r = server.client.get("/tuf/targets/digits/2/bundle.tar", headers=dev)
    assert r.status_code == 403, r.status_code
    assert server.client.get("/tuf/targets/digits/2/bundle.tar", headers={**dev, "Range": "bytes=0-"}).status_code == 403
    # once a rollout assigns it, it may (and keeps that right after the rollout is superseded)
    server.client.post("/v1/rollouts", json={"model": "digits", "version": 2, "group": "lab"}, headers=server.admin())
    assert server.client.get("/tuf/targets/digits/2/bundle.tar", headers=dev).status_code == 200
    server.client.post("/v1/rollouts", json={"model": "digits", "version": 1, "group": "lab"}, headers=server.admin())
    assert server.client.get("/tuf/targets/digits/2/bundle.tar", headers=dev).status_code == 200
    # a group switched to beta may download beta bundles
    other = server.add_device("cam-2", "beta-lab")
    assert server.client.get("/tuf/targets/digits/2/bundle.tar", headers=other).status_code == 403
    server.client.post("/v1/groups", json={"name": "beta-lab", "channel": "beta"}, headers=server.admin())
    assert server.client.get("/tuf/targets/digits/2/bundle.tar", headers=other).status_code == 200


def test_tokens_are_stored_only_as_hashes_and_shown_once(server):
    r = server.client.post("/v1/devices", json={"name": "cam-1", "group": "lab"}, headers=server.admin())
    token = r.json()["token"]
    assert len(token) >= 40
    listing = server.client.get("/v1/devices", headers=server.admin()).text
    assert token not in listing
    raw = (server.folder / "fleet.db").read_bytes()
    wal = server.folder / "fleet.db-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert token.encode() not in raw and ADMIN.encode() not in raw
    db = sqlite3.connect(server.folder / "fleet.db")
    (stored,) = db.execute("SELECT token_hash FROM devices WHERE name = 'cam-1'").fetchone()
    import hashlib

    assert stored == hashlib.sha256(token.encode()).hexdigest()
    again = server.client.post("/v1/devices", json={"name": "cam-1", "group": "lab"}, headers=server.admin())
    assert again.status_code == 409


@pytest.mark.parametrize("name", ["../x", "A", "a/b", "", "x" * 65, None, 5])
def test_device_and_group_names_are_validated(server, name):
    r = server.client.post("/v1/devices", json={"name": name, "group": "lab"}, headers=server.admin())
    assert r.status_code == 422, (name, r.status_code)
    r = server.client.post("/v1/devices", json={"name": "ok", "group": name}, headers=server.admin())
    assert r.status_code == 422, (name, r.status_code)


def test_a_revoked_device_token_stops_working_at_once(server):
    dev = server.add_device("cam-1")
    assert server.client.get("/v1/device/assignment", headers=dev).status_code == 200   # now cached
    assert server.client.delete("/v1/devices/cam-1", headers=dev).status_code == 403
    assert server.client.delete("/v1/devices/cam-1", headers=server.admin()).status_code == 200
    assert server.client.get("/v1/device/assignment", headers=dev).status_code == 401
    assert server.client.get("/tuf/metadata/timestamp.json", headers=dev).status_code == 401
    assert server.client.delete("/v1/devices/cam-1", headers=server.admin()).status_code == 404
    again = server.add_device("cam-1")
    assert again != dev and server.client.get("/v1/device/assignment", headers=dev).status_code == 401
    assert server.client.get("/v1/device/assignment", headers=again).status_code == 200


@pytest.mark.parametrize("token", ["a" * 16, "ab" * 8, "abcdefgh" + "a" * 24, "Short-tok3n!", "", None])
def test_weak_admin_tokens_are_refused(token):
    from edgekiln.errors import EdgekilnError
    from edgekiln.fleet.auth import check_admin_token

    with pytest.raises(EdgekilnError, match="admin token refused: use at least 16 characters") as err:
        check_admin_token(token)
    assert err.value.exit_code == 2


def test_strong_admin_tokens_pass():
    import secrets

    from edgekiln.fleet.auth import check_admin_token

    for token in (ADMIN, "abcdefghijklmnop", secrets.token_urlsafe(32), secrets.token_hex(16)):
        assert check_admin_token(token) == token


def test_serve_with_a_weak_token_exits_2_before_creating_anything(tmp_path, monkeypatch, capsys):
    from edgekiln.cli.app import main

    monkeypatch.setenv("EDGEKILN_ADMIN_TOKEN", "k" * 32)
    with pytest.raises(SystemExit) as done:
        main(["serve", "--db", f"sqlite:///{tmp_path / 'fleet.db'}", "--keys", str(tmp_path / "keys"),
              "--store", str(tmp_path / "blobs")])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and len(err.splitlines()) == 1 and "admin token refused" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be created before the token is checked"
