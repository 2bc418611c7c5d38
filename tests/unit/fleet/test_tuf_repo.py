"""The server's TUF repository, checked with python-tuf's own client (ngclient.Updater)."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_server_helpers import Clock, Server, bundle_tar, start_server
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface, Updater

from edgekiln.errors import EdgekilnError
from edgekiln.fleet.tuf_repo import TufExpiry

DAY = 86400.0


class InProcessFetcher(FetcherInterface):
    """An ngclient fetcher that goes through the in-process app with a device token."""

    def __init__(self, server: Server, headers: dict[str, str]) -> None:
        self.server, self.headers = server, headers

    def _fetch(self, url: str) -> Iterator[bytes]:
        r = self.server.client.get(url.replace("http://testserver", ""), headers=self.headers)
        if r.status_code != 200:
            raise DownloadHTTPError(f"{url}: {r.status_code}", r.status_code)
        return iter([r.content])


def _updater(server: Server, headers: dict[str, str], tmp: Path, root: bytes | None) -> Updater:
    (tmp / "md").mkdir(parents=True, exist_ok=True)
    (tmp / "dl").mkdir(exist_ok=True)
    return Updater(str(tmp / "md"), "http://testserver/tuf/metadata/", str(tmp / "dl"),
                   "http://testserver/tuf/targets/", fetcher=InProcessFetcher(server, headers), bootstrap=root)


@pytest.fixture
def server(tmp_path):
    import time

    return start_server(tmp_path / "srv", Clock(time.time()))


def test_first_start_creates_private_keys_and_writes_root_for_enrolment(server):
    keys = server.folder / "keys"
    for role in ("root", "targets", "snapshot", "timestamp"):
        mode = stat.S_IMODE((keys / f"{role}.pem").stat().st_mode)
        assert mode == 0o600, f"{role}.pem has mode {oct(mode)}, want 0o600"
    served = server.client.get("/tuf/metadata/1.root.json", headers=server.admin())
    assert served.status_code == 200
    assert (keys / "root.json").read_bytes() == served.content
    root = json.loads(served.content)["signed"]
    assert {k["keytype"] for k in root["keys"].values()} == {"ed25519"}
    assert len(root["keys"]) == 4 and root["consistent_snapshot"] is False


def test_ngclient_verifies_a_published_bundle_and_each_publish_bumps_every_role(server, tmp_path):
    dev = server.add_device("cam-1")
    before = {r: json.loads(server.client.get(f"/tuf/metadata/{r}.json", headers=dev).content)["signed"]["version"]
              for r in ("targets", "snapshot", "timestamp")}
    assert server.publish(bundle_tar(tmp_path, 1)).status_code == 201
    after = {r: json.loads(server.client.get(f"/tuf/metadata/{r}.json", headers=dev).content)["signed"]["version"]
             for r in ("targets", "snapshot", "timestamp")}
    assert after == {r: v + 1 for r, v in before.items()}, (before, after)

    updater = _updater(server, dev, tmp_path, (server.folder / "keys" / "root.json").read_bytes())
    updater.refresh()
    info = updater.get_targetinfo("digits/1/bundle.tar")
    assert info is not None
    custom = dict(info.custom)
    unpacked = custom.pop("unpacked_bytes")
    assert custom == {"model": "digits", "version": 1, "channel": "stable"}
    assert isinstance(unpacked, int) and unpacked > 0, unpacked
    path = updater.download_target(info)
    assert Path(path).read_bytes() == bundle_tar(tmp_path, 1)


def test_restart_keeps_the_root_and_a_foreign_key_folder_is_refused(tmp_path):
    first = start_server(tmp_path / "srv")
    root = (first.folder / "keys" / "root.json").read_bytes()
    again = start_server(tmp_path / "srv")
    assert (again.folder / "keys" / "root.json").read_bytes() == root
    from edgekiln.fleet.server import ServerConfig, create_app

    cfg = ServerConfig(db_url=f"sqlite:///{tmp_path / 'srv' / 'fleet.db'}", store_url=str(tmp_path / "blobs"),
                       keys_dir=str(tmp_path / "other-keys"), admin_token="x-strong-admin-token-0123456789")
    with pytest.raises(EdgekilnError, match="is not the root key"):
        create_app(cfg)


def test_metadata_is_re_signed_before_it_expires_and_in_dev_mode_root_rotates_to_a_new_version(server, tmp_path):
    assert (server.folder / "keys" / "root.pem").is_file(), "ServerConfig.local on an empty folder: dev mode"
    dev = server.add_device("cam-1")
    ts1 = json.loads(server.client.get("/tuf/metadata/timestamp.json", headers=dev).content)["signed"]
    server.clock.now += 0.6 * DAY   # past half of the 1-day timestamp validity
    ts2 = json.loads(server.client.get("/tuf/metadata/timestamp.json", headers=dev).content)["signed"]
    assert ts2["version"] == ts1["version"] + 1 and ts2["expires"] > ts1["expires"], (ts1, ts2)

    updater = _updater(server, dev, tmp_path, (server.folder / "keys" / "root.json").read_bytes())
    updater.refresh()
    server.clock.now += 200 * DAY   # past half of the root's 365 days: root v2, signed by the online root key
    # (without KEYS/root.pem the server never signs a root: test_keys.py)
    assert server.client.get("/tuf/metadata/timestamp.json", headers=dev).status_code == 200
    assert server.client.get("/tuf/metadata/2.root.json", headers=dev).status_code == 200
    assert json.loads((server.folder / "keys" / "root.json").read_bytes())["signed"]["version"] == 2
    # the device enrolled with root v1 follows the chain to v2 (ngclient checks expiry by real time; the
    # server clock is 200 days ahead, so everything it signs is still valid)
    _updater(server, dev, tmp_path, None).refresh()   # a new run of the agent: trusts what it stored
    assert json.loads((tmp_path / "md" / "root.json").read_bytes())["signed"]["version"] == 2


def test_expiry_is_configurable(tmp_path):
    server = start_server(tmp_path / "srv", expiry=TufExpiry(timestamp_days=0.5, targets_days=3.0))
    import datetime as dt

    def expires(role: str) -> float:
        text = json.loads(server.client.get(f"/tuf/metadata/{role}.json", headers=server.admin()).content)
        return dt.datetime.strptime(text["signed"]["expires"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=dt.UTC).timestamp() - server.clock.now

    assert abs(expires("timestamp") - 0.5 * DAY) < 2, expires("timestamp")
    assert abs(expires("targets") - 3 * DAY) < 2, expires("targets")
    assert abs(expires("snapshot") - 7 * DAY) < 2, expires("snapshot")


def test_unknown_metadata_files_are_404_and_need_a_token(server):
    assert server.client.get("/tuf/metadata/timestamp.json").status_code == 401
    for name in ("9.root.json", "../keys/root.pem", "x.json", "3.timestamp.json"):
        assert server.client.get(f"/tuf/metadata/{name}", headers=server.admin()).status_code == 404, name


def test_serve_expiry_option_is_parsed_and_checked():
    from edgekiln.cli.fleet_cmd import parse_expiry

    assert parse_expiry("timestamp=0.5, targets=10") == TufExpiry(timestamp_days=0.5, targets_days=10.0)
    assert parse_expiry(None) == TufExpiry()
    for bad in ("time=1", "timestamp=soon", "root=0"):
        with pytest.raises(EdgekilnError, match="--expiry"):
            parse_expiry(bad)


def test_a_key_folder_from_before_roots_keeps_working(tmp_path):
    """An older server made root.pem, the role keys and root.json only (no roots/, no director key)."""
    import shutil
    import sqlite3

    first = start_server(tmp_path / "srv")
    keys = first.folder / "keys"
    root = (keys / "root.json").read_bytes()
    shutil.rmtree(keys / "roots")
    for name in ("director.pem", "director-root.json"):
        (keys / name).unlink()
    with sqlite3.connect(first.folder / "fleet.db") as db:   # an older database: no director table rows
        db.execute("DELETE FROM director_metadata")
    again = start_server(tmp_path / "srv")   # same database: its root v1 stays, the director's is added
    assert again.client.get("/tuf/metadata/1.root.json", headers=again.admin()).content == root
    assert (keys / "director-root.json").is_file() and (keys / "root.json").read_bytes() == root
    shutil.rmtree(keys / "roots")
    (tmp_path / "srv" / "fleet.db").unlink()
    fresh = start_server(tmp_path / "srv")   # a new database trusts the folder's root.json
    assert fresh.client.get("/tuf/metadata/1.root.json", headers=fresh.admin()).content == root


def test_a_delta_is_signed_with_its_bundle_in_one_pass_and_verifies(server, tmp_path):
    import bsdiff4

    from edgekiln.fleet import delta
    from edgekiln.fleet.bundle_tar import write_reproducible
    from edgekiln.fleet.sample import sample_mlp_bundle

    tars = [write_reproducible(sample_mlp_bundle(tmp_path / f"v{v}", version=v, change=c), tmp_path / f"v{v}.tar")
            for v, c in ((1, 0.0), (2, 0.1))]
    dev = server.add_device("cam-d")
    assert server.publish(tars[0].read_bytes(), model="mlp").status_code == 201
    version = lambda: json.loads(server.client.get("/tuf/metadata/targets.json", headers=dev).content)["signed"]["version"]  # noqa: E731
    before = version()
    r = server.publish(tars[1].read_bytes(), model="mlp", version=2)
    assert r.status_code == 201, r.text
    assert [(d["base_version"], d["ratio"] <= 0.3) for d in r.json()["deltas"]] == [(1, True)], r.json()
    assert version() == before + 1, "the bundle and its delta must be signed in one targets version"

    updater = _updater(server, dev, tmp_path, (server.folder / "keys" / "root.json").read_bytes())
    updater.refresh()
    full = updater.get_targetinfo("mlp/2/bundle.tar")
    info = updater.get_targetinfo(delta.delta_path("mlp", 2, 1))
    assert info is not None and full is not None
    base_sha = updater.get_targetinfo("mlp/1/bundle.tar").hashes["sha256"]
    assert info.custom == delta.delta_custom("mlp", 2, 1, base_sha, full.hashes["sha256"], full.length)
    patch = Path(updater.download_target(info)).read_bytes()
    assert bsdiff4.patch(tars[0].read_bytes(), patch) == tars[1].read_bytes()
