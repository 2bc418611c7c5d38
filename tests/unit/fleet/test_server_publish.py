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
                        "sha256": hashlib.sha256(data).hexdigest(), "length": len(data), "deltas": []}
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
        "is not a plain relative path": _tar({**good, "../evil": b"x"}),
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


def _sparse(name: str, realsize: int, data: bytes = b"x" * 4096) -> tuple[tarfile.TarInfo, bytes]:
    """A PAX sparse 1.0 member: a one-entry map, then ``data``; it declares ``realsize`` bytes."""
    sparse_map = b"1\n0\n%d\n" % len(data)
    payload = sparse_map + b"\0" * (-len(sparse_map) % 512) + data
    info = tarfile.TarInfo("GNUSparseFile.0/" + name)
    info.size = len(payload)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(realsize)}
    return info, payload


def _with(good: dict[str, bytes], *extra: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in good.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _fifo(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.FIFOTYPE
    return info, b""


MEMBER_CASES = {
    "duplicate": (lambda good: [_file("manifest.json", good["manifest.json"])], "appears twice"),
    "backslash": (lambda good: [_file("sub\\evil.bin", b"x")], "is not a plain relative path"),
    "300 files": (lambda good: [_file(f"f{i}.bin", b"x") for i in range(300)], "more than 256 files"),
    "sparse": (lambda good: [_sparse("pad.bin", 101_000_000)], "'pad.bin' is a sparse file"),
    "fifo": (lambda good: [_fifo("pipe")], "'pipe' is a special file"),
    "over 1 MiB": (lambda good: [_file("big.bin", b"\0" * (1024 * 1024 + 1))], "unpacks to more than 1048576 bytes"),
}


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """A server refusing bundles that unpack to more than 1 MiB."""
    return start_server(tmp_path_factory.mktemp("small") / "srv", max_unpacked_bytes=1024 * 1024)


@pytest.mark.parametrize("case", MEMBER_CASES)
def test_bundle_members_unsafe_to_extract_are_refused_at_publish(small_server, tmp_path, case):
    good = _members(bundle_tar(tmp_path, 1))
    extra, reason = MEMBER_CASES[case]
    body = _with(good, *extra(good))
    if case == "sparse":  # the attack: a small upload that would extract to 101 MB
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            declared = max(m.size for m in tar.getmembers())
        assert len(body) < 64 * 1024 and declared == 101_000_000, (len(body), declared)
    r = small_server.publish(body)
    assert r.status_code == 422 and reason in r.json()["detail"], (case, r.status_code, r.text)
    assert [m for m in small_server.client.get("/v1/models", headers=small_server.admin()).json()
            if m["model"] == "digits"] == []


def test_the_unpacked_size_is_signed_into_the_target(small_server, tmp_path):
    data = bundle_tar(tmp_path, 1)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = sum(m.size for m in tar.getmembers() if m.isfile())
    assert small_server.publish(data, model="sized").status_code == 201
    targets = json.loads(small_server.client.get("/tuf/metadata/targets.json", headers=small_server.admin()).content)
    custom = targets["signed"]["targets"]["sized/1/bundle.tar"]["custom"]
    assert custom["unpacked_bytes"] == expected > 0, (custom, expected)


@pytest.mark.parametrize("version", ["²", "٥", "05", "2147483648"])
def test_versions_are_ascii_digits_without_leading_zeros(small_server, tmp_path, version):
    r = small_server.client.post(f"/v1/models/digits/versions/{version}", content=bundle_tar(tmp_path, 1),
                                 headers=small_server.admin())
    assert r.status_code == 422 and "must be an integer >= 1" in r.json()["detail"], (version, r.status_code, r.text)
    assert [m for m in small_server.client.get("/v1/models", headers=small_server.admin()).json()
            if m["model"] == "digits"] == []


@pytest.mark.parametrize(("method", "path", "body", "status", "reason"), [
    ("GET", f"/v1/rollouts/{10**20}", None, 422, "less than or equal"),
    ("POST", f"/v1/rollouts/{10**20}/pause", None, 422, "less than or equal"),
    ("POST", "/v1/devices", b"[" * 5000 + b"]" * 5000, 400, "nests deeper than 32 levels"),
    ("POST", "/v1/devices", b'{"name": ' + b"9" * 5000 + b"}", 400, "integer with 5000 digits"),
    ("POST", "/v1/devices", b'{"name": 1e999}', 400, "out of range"),
    ("POST", "/v1/devices", b'{"name": NaN}', 400, "NaN is not JSON"),
])
def test_odd_inputs_are_one_line_client_errors(small_server, method, path, body, status, reason):
    r = small_server.client.request(method, path, content=body, headers=small_server.admin())
    detail = json.dumps(r.json()["detail"])
    assert r.status_code == status and reason in detail and "\n" not in detail, (path, r.status_code, r.text[:300])


def test_a_full_bundle_store_is_507(tmp_path):
    import errno

    from fleet_server_helpers import ADMIN, Clock

    from edgekiln.fleet.server import ServerConfig, create_app
    from edgekiln.fleet.store import LocalStore

    class FullStore(LocalStore):
        def put(self, key, src):
            raise OSError(errno.ENOSPC, "No space left on device")

    app = create_app(ServerConfig.local(tmp_path / "srv", admin_token=ADMIN), clock=Clock(),
                     store=FullStore(tmp_path / "srv" / "blobs"))
    c = TestClient(app)
    r = c.post("/v1/models/digits/versions/1", content=bundle_tar(tmp_path, 1),
               headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 507 and "bundle store is full (ENOSPC)" in r.json()["detail"], (r.status_code, r.text)
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {ADMIN}"}).json() == []


def test_delta_blobs_are_not_collected_as_orphans(tmp_path):
    from edgekiln.fleet.bundle_tar import write_reproducible
    from edgekiln.fleet.sample import sample_mlp_bundle

    server = start_server(tmp_path / "srv")
    for v, change in ((1, 0.0), (2, 0.1)):
        tar = write_reproducible(sample_mlp_bundle(tmp_path / f"v{v}", version=v, change=change), tmp_path / f"v{v}.tar")
        r = server.publish(tar.read_bytes(), model="mlp", version=v)
        assert r.status_code == 201, r.text
    assert len(r.json()["deltas"]) == 1, r.json()
    fleet = server.app.state.fleet
    assert fleet.registry.collect_garbage(min_age_s=0.0) == []
    path = "mlp/2/delta-from-1.bsdiff4"
    got = server.client.get(f"/tuf/targets/{path}", headers=server.admin())
    assert got.status_code == 200 and len(got.content) == r.json()["deltas"][0]["length"], got.status_code


def test_deltas_are_made_from_the_previous_version_and_the_versions_most_devices_run(tmp_path):
    server = start_server(tmp_path / "srv")
    fleet = server.app.state.fleet
    for v in (1, 2, 3, 5):
        fleet.db.execute("INSERT INTO versions (model, version, channel, target_path, sha256, length, blob_key, "
                         "manifest_name, published) VALUES ('m', ?, 'stable', ?, 'x', 1, 'k', 'm', 0)",
                         (v, f"m/{v}/bundle.tar"))
    running = {"a": 1, "b": 1, "c": 2, "d": 1, "e": 3, "f": 2}
    for name, v in running.items():
        server.add_device(name)
        fleet.db.execute("UPDATE devices SET model = 'm', active_version = ? WHERE name = ?", (v, name))
    assert fleet.registry.delta_bases("m", 4) == [3, 1, 2]    # previous, then by devices running it
    assert fleet.registry.delta_bases("m", 2) == [1]          # never from a version above the new one
    assert fleet.registry.delta_bases("other", 1) == []
