"""The scale-out storage paths for real: PostgreSQL (a throwaway server) and S3 (moto's server mode)."""

from __future__ import annotations

import json
import os
import socket
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from edgekiln.fleet.client import tar_bundle
from edgekiln.fleet.pg_local import LocalPostgres, postgres_bin
from edgekiln.fleet.sample import sample_bundle
from edgekiln.fleet.server import ServerConfig, create_app

ADMIN = "storage-admin-token-0123456789"
H = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def pg():
    if postgres_bin() is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl under /usr/lib/postgresql/*/bin); "
                    "scripts/system-deps.sh installs it")
    local = LocalPostgres()
    with local:
        yield local


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="fleet")
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundles")
    return {v: tar_bundle(sample_bundle(tmp / f"v{v}", version=v, seed=v), tmp / f"v{v}.tar").read_bytes()
            for v in (1, 2)}


def _config(tmp: Path, db_url: str, store_url: str, endpoint: str | None) -> ServerConfig:
    return ServerConfig(db_url=db_url, store_url=store_url, keys_dir=str(tmp / "keys"), admin_token=ADMIN,
                        s3_endpoint=endpoint)


class Crash(Exception):
    pass


def _scenario(tmp: Path, db_url: str, store_url: str, endpoint: str | None, tars: dict[int, bytes]) -> None:
    def fault(step: str) -> None:
        if step == "signed-snapshot":
            raise Crash(step)

    crashing = TestClient(create_app(_config(tmp, db_url, store_url, endpoint), fault=fault),
                          raise_server_exceptions=False)
    assert crashing.post("/v1/models/digits/versions/1", content=tars[1], headers=H).status_code == 500
    c = TestClient(create_app(_config(tmp, db_url, store_url, endpoint)))   # "restart"
    assert c.get("/v1/models", headers=H).json() == []
    assert json.loads(c.get("/tuf/metadata/targets.json", headers=H).content)["signed"]["targets"] == {}
    for v in (1, 2):
        r = c.post(f"/v1/models/digits/versions/{v}", content=tars[v], headers=H)
        assert r.status_code == 201, r.text
    devs = {}
    for i in range(4):
        r = c.post("/v1/devices", json={"name": f"cam-{i}", "group": "lab"}, headers=H)
        devs[f"cam-{i}"] = {"Authorization": f"Bearer {r.json()['token']}"}
    ro = c.post("/v1/rollouts", json={"model": "digits", "version": 2, "group": "lab", "waves": [50, 100],
                                      "success_threshold": 1.0, "failure_threshold": 0.3}, headers=H).json()
    chosen = [d["name"] for d in ro["devices"] if d["selected"]]
    assert len(chosen) == 2, ro
    for name in chosen:
        a = c.get("/v1/device/assignment", headers=devs[name]).json()
        assert a["target_path"] == "digits/2/bundle.tar"
        part = c.get("/tuf/targets/digits/2/bundle.tar", headers={**devs[name], "Range": "bytes=512-"})
        assert part.status_code == 206 and part.content == tars[2][512:]
        c.post("/v1/device/report", json={"model": "digits", "version": 2, "status": "installed"}, headers=devs[name])
    st = c.get(f"/v1/rollouts/{ro['id']}", headers=H).json()
    assert st["wave"] == 1 and all(d["selected"] for d in st["devices"]), st
    rest = [n for n in devs if n not in chosen]
    for name in rest:
        c.post("/v1/device/report", json={"model": "digits", "version": 2, "status": "rolled_back",
                                         "error": "health"}, headers=devs[name])
    st = c.get(f"/v1/rollouts/{ro['id']}", headers=H).json()
    assert st["state"] == "halted", st
    listed = {d["name"]: d for d in c.get("/v1/devices", headers=H).json()}
    assert {listed[n]["active_version"] for n in chosen} == {2} and {listed[n]["last_error"] for n in rest} == {"health"}


def test_postgresql_database(pg, tmp_path, tars):
    _scenario(tmp_path, pg.fresh_database("flow"), str(tmp_path / "blobs"), None, tars)


def test_s3_store(s3, tmp_path, tars):
    _scenario(tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}", "s3://fleet/sqlite-run", s3, tars)


def test_postgresql_and_s3_together(pg, s3, tmp_path, tars):
    _scenario(tmp_path, pg.fresh_database("both"), "s3://fleet/pg-run", s3, tars)


def test_two_server_processes_sharing_postgresql_publish_concurrently(pg, tmp_path, tars):
    url = pg.fresh_database("shared")
    apps = [TestClient(create_app(_config(tmp_path, url, str(tmp_path / "blobs"), None))) for _ in range(2)]
    results: list[int] = []

    def publish(client: TestClient, model: str) -> None:
        for v in (1, 2):
            results.append(client.post(f"/v1/models/{model}/versions/{v}", content=tars[v], headers=H).status_code)

    threads = [threading.Thread(target=publish, args=(a, f"m{i}")) for i, a in enumerate(apps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [201] * 4, results
    signed = json.loads(apps[0].get("/tuf/metadata/targets.json", headers=H).content)["signed"]
    assert sorted(signed["targets"]) == ["m0/1/bundle.tar", "m0/2/bundle.tar", "m1/1/bundle.tar", "m1/2/bundle.tar"]
    assert signed["version"] == 5, signed["version"]   # 1 + four publishes, none lost to a race
    snap = json.loads(apps[1].get("/tuf/metadata/snapshot.json", headers=H).content)["signed"]
    assert snap["meta"]["targets.json"]["version"] == 5


def test_unreachable_postgresql_and_missing_bucket_are_one_line_errors(s3, tmp_path):
    from edgekiln.errors import EdgekilnError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EdgekilnError, match="cannot connect to PostgreSQL") as err:
        create_app(_config(tmp_path, f"postgresql://u:secret@127.0.0.1:{port}/x", str(tmp_path / "b"), None))
    assert "secret" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(EdgekilnError, match="bucket not reachable"):
        create_app(_config(tmp_path, f"sqlite:///{tmp_path / 'f.db'}", "s3://no-such-bucket", s3))
