"""Publishing: validation, immutability, size bounds, atomicity under a crash at every step, Range."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from fastapi.testclient import TestClient
from fleet_server_helpers import bundle_tar, start_server

from edgekiln.fleet.registry import PUBLISH_STEPS


class Crash(Exception):
    pass


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.fixture
def server(tmp_path):
    return start_server(tmp_path / "srv")


def test_publish_records_hash_and_length_and_versions_are_immutable(server, tmp_path):
    data = bundle_tar(tmp_path, 1)
    r = server.publish(data)
    assert r.status_code == 201, r.text
    import hashlib

    assert r.json() == {"model": "digits", "version": 1, "channel": "stable", "target_path": "digits/1/bundle.tar",
                        "sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}
    again = server.publish(bundle_tar(tmp_path, 1, seed=5))
    assert again.status_code == 409 and "immutable" in again.json()["detail"]
    listed = server.client.get("/v1/models", headers=server.admin()).json()
    assert [(m["model"], m["version"], m["sha256"]) for m in listed] == [("digits", 1, hashlib.sha256(data).hexdigest())]


def test_uploads_that_are_not_valid_bundles_are_refused_with_the_reason(server, tmp_path):
    good = _members(bundle_tar(tmp_path, 1))
    manifest = json.loads(good["manifest.json"])
    model_file = manifest["variants"][0]["file"]
    cases = {
        "not an uncompressed tar": b"\x1f\x8b" + b"gzip?" * 50,
        "no manifest.json": _tar({k: v for k, v in good.items() if k != "manifest.json"}),
        "escapes the bundle": _tar({**good, "../evil": b"x"}),
        "does not match its SHA-256": _tar({**good, model_file: good[model_file] + b"\0"}),
        "is not in the tar": _tar({k: v for k, v in good.items() if k != model_file}),
        "not valid JSON": _tar({**good, "manifest.json": b"{nope"}),
    }
    for expected, body in cases.items():
        r = server.publish(body)
        assert r.status_code == 422 and expected in r.json()["detail"], (expected, r.status_code, r.text)
    assert server.client.get("/v1/models", headers=server.admin()).json() == []


@pytest.mark.parametrize("path", ["/v1/models/Bad/versions/1", "/v1/models/..%2Fetc/versions/1",
                                  "/v1/models/digits/versions/0", "/v1/models/digits/versions/x",
                                  "/v1/models/digits/versions/1?channel=../x"])
def test_bad_names_and_versions_are_refused(server, tmp_path, path):
    r = server.client.post(path, content=bundle_tar(tmp_path, 1), headers=server.admin())
    assert r.status_code in (404, 422), (path, r.status_code, r.text)
    assert server.client.get("/v1/models", headers=server.admin()).json() == []


def test_request_bodies_are_bounded(tmp_path):
    server = start_server(tmp_path / "srv", max_bundle_bytes=4096)
    r = server.publish(bundle_tar(tmp_path, 1))
    assert r.status_code == 413, r.text

    def chunks():  # no Content-Length: the limit must hold on the streamed body too
        for _ in range(10):
            yield b"x" * 1024
    r = server.client.post("/v1/models/digits/versions/1", content=chunks(), headers=server.admin())
    assert r.status_code == 413, r.text
    r = server.client.post("/v1/devices", content=b'{"name": "' + b"a" * 70000 + b'"}', headers=server.admin())
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_a_crash_at_any_publish_step_leaves_nothing_visible_and_a_retry_succeeds(tmp_path, step):
    def fault(at: str) -> None:
        if at == step:
            raise Crash(at)

    crashing = start_server(tmp_path / "srv", fault=fault)
    client = TestClient(crashing.app, raise_server_exceptions=False)
    before = {r: json.loads(client.get(f"/tuf/metadata/{r}.json", headers=crashing.admin()).content)["signed"]
              for r in ("targets", "snapshot", "timestamp")}
    data = bundle_tar(tmp_path, 1)
    r = client.post("/v1/models/digits/versions/1", content=data, headers=crashing.admin())
    assert r.status_code == 500, (step, r.status_code)

    restarted = start_server(tmp_path / "srv")   # the same database, store and keys
    admin = restarted.admin()
    assert restarted.client.get("/v1/models", headers=admin).json() == [], step
    after = {r: json.loads(restarted.client.get(f"/tuf/metadata/{r}.json", headers=admin).content)["signed"]
             for r in ("targets", "snapshot", "timestamp")}
    assert after == before, f"metadata changed by a publish that crashed at {step}"
    assert restarted.client.get("/tuf/targets/digits/1/bundle.tar", headers=admin).status_code == 404

    retry = restarted.publish(data)
    assert retry.status_code == 201, (step, retry.text)
    targets = json.loads(restarted.client.get("/tuf/metadata/targets.json", headers=admin).content)["signed"]
    assert list(targets["targets"]) == ["digits/1/bundle.tar"]
    assert targets["version"] == before["targets"]["version"] + 1
    assert restarted.client.get("/tuf/targets/digits/1/bundle.tar", headers=admin).content == data


def test_downloads_honour_http_range(server, tmp_path):
    data = bundle_tar(tmp_path, 1)
    server.publish(data)
    url, h = "/tuf/targets/digits/1/bundle.tar", server.admin()
    whole = server.client.get(url, headers=h)
    assert whole.status_code == 200 and whole.content == data and whole.headers["accept-ranges"] == "bytes"
    part = server.client.get(url, headers={**h, "Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == data[1000:]
    assert part.headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    mid = server.client.get(url, headers={**h, "Range": "bytes=10-19"})
    assert mid.status_code == 206 and mid.content == data[10:20]
    tail = server.client.get(url, headers={**h, "Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == data[-5:]
    past = server.client.get(url, headers={**h, "Range": f"bytes={len(data)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(data)}"
    assert server.client.get(url, headers={**h, "Range": "bytes=1-2,5-6"}).status_code == 416
    assert server.client.get("/tuf/targets/digits/2/bundle.tar", headers=h).status_code == 404
    assert server.client.get("/tuf/targets/../../keys/root.pem", headers=h).status_code == 404


def test_blobs_left_by_a_crashed_publish_are_collected_once_old(tmp_path):
    def fault(at: str) -> None:
        if at == "stored":
            raise Crash(at)

    crashing = start_server(tmp_path / "srv", fault=fault)
    TestClient(crashing.app, raise_server_exceptions=False).post(
        "/v1/models/digits/versions/1", content=bundle_tar(tmp_path, 1), headers=crashing.admin())
    live = start_server(tmp_path / "srv", crashing.clock)
    assert live.publish(bundle_tar(tmp_path, 2, seed=1), version=2).status_code == 201
    blobs = lambda: sorted(p.name for p in (tmp_path / "srv" / "blobs").rglob("*") if p.is_file())  # noqa: E731
    assert len(blobs()) == 2, "the orphan is young: it could be a publish in flight elsewhere"
    import hashlib
    import os
    import time

    orphan = hashlib.sha256(bundle_tar(tmp_path, 1)).hexdigest()
    old = time.time() - 2 * 86400
    os.utime(tmp_path / "srv" / "blobs" / "blobs" / orphan[:2] / orphan, (old, old))
    later = start_server(tmp_path / "srv")

    assert blobs() == [hashlib.sha256(bundle_tar(tmp_path, 2, seed=1)).hexdigest()]
    assert later.client.get("/tuf/targets/digits/2/bundle.tar", headers=later.admin()).status_code == 200
