"""Storage interfaces (database, blob store) and the operator client against the in-process app."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from fleet_server_helpers import ADMIN, start_server

from edgekiln.errors import EdgekilnError
from edgekiln.fleet import client
from edgekiln.fleet.db import open_database
from edgekiln.fleet.inprocess import InProcessTransport
from edgekiln.fleet.sample import sample_bundle
from edgekiln.fleet.store import LocalStore, open_store


def test_a_failed_transaction_leaves_no_trace(tmp_path):
    db = open_database(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(RuntimeError), db.transaction(write_lock=True) as tx:
        tx.execute("INSERT INTO groups (name, channel) VALUES (?, ?)", ("lab", "stable"))
        raise RuntimeError("crash")
    assert db.query("SELECT * FROM groups") == []
    db.execute("INSERT INTO groups (name, channel) VALUES (?, ?)", ("lab", "beta"))
    assert open_database(str(tmp_path / "x.db")).query("SELECT name, channel FROM groups") == \
        [{"name": "lab", "channel": "beta"}]


@pytest.mark.parametrize("url", ["mysql://x", "s3://bucket"])
def test_unsupported_database_urls_are_refused(url):
    with pytest.raises(EdgekilnError, match="unsupported database URL"):
        open_database(url)


def test_local_store_reads_ranges_and_refuses_unsafe_keys(tmp_path):
    src = tmp_path / "f"
    src.write_bytes(bytes(range(256)) * 1000)
    store = open_store(str(tmp_path / "s"))
    assert isinstance(store, LocalStore)
    store.put("blobs/ab/abc", src)
    assert store.size("blobs/ab/abc") == 256000 and store.size("blobs/none") is None
    assert b"".join(store.read("blobs/ab/abc", 1000, 200000)) == src.read_bytes()[1000:200001]
    assert not list((tmp_path / "s" / "blobs" / "ab").glob(".*tmp")), "temporary file left behind"
    for key in ("../x", "/abs", "a/../../b", "a//b", ""):
        with pytest.raises(EdgekilnError, match="not a safe relative name"):
            store.put(key, src)
    with pytest.raises(EdgekilnError, match="unsupported store URL"):
        open_store("ftp://x/y")


@pytest.fixture
def served(tmp_path):
    server = start_server(tmp_path / "srv")
    return server, InProcessTransport(server.app)


def test_client_publishes_a_folder_or_a_tar_with_the_manifest_name_and_version(served, tmp_path):
    server, transport = served
    folder = sample_bundle(tmp_path / "b3", version=3)
    out = client.publish(folder, "http://fleet", ADMIN, "beta", transport=transport)
    assert (out["model"], out["version"], out["channel"]) == ("digits", 3, "beta")
    tar = client.tar_bundle(folder, tmp_path / "b3.tar")
    assert hashlib.sha256(tar.read_bytes()).hexdigest() == out["sha256"], "tar of the same bundle is not reproducible"
    out = client.publish(tar, "http://fleet", ADMIN, "stable", model="other", version=9, transport=transport)
    assert (out["model"], out["version"]) == ("other", 9)
    assert [(m["model"], m["version"]) for m in client.list_models("http://fleet", ADMIN, transport=transport)] == \
        [("digits", 3), ("other", 9)]


def test_client_drives_devices_and_rollouts(served, tmp_path):
    server, t = served
    client.publish(sample_bundle(tmp_path / "b1", version=1), "http://fleet", ADMIN, transport=t)
    dev = client.add_device("http://fleet", ADMIN, "cam-1", "lab", transport=t)
    assert dev["token"].startswith("ekd_")
    ro = client.rollout_start("http://fleet", ADMIN, "digits", 1, "lab", waves=[100], transport=t)
    assert client.rollout_pause("http://fleet", ADMIN, ro["id"], transport=t)["state"] == "paused"
    assert client.rollout_resume("http://fleet", ADMIN, ro["id"], transport=t)["state"] == "running"
    assert client.rollout_status("http://fleet", ADMIN, ro["id"], transport=t)["devices"][0]["selected"]
    assert [r["id"] for r in client.rollout_status("http://fleet", ADMIN, transport=t)] == [ro["id"]]
    assert client.set_group_channel("http://fleet", ADMIN, "lab", "beta", transport=t)["channel"] == "beta"
    assert [d["name"] for d in client.list_devices("http://fleet", ADMIN, transport=t)] == ["cam-1"]


def test_client_errors_are_one_line(served, tmp_path):
    _, t = served
    with pytest.raises(EdgekilnError, match="401 unknown token") as err:
        client.list_devices("http://fleet", "wrong-token-0000000000", transport=t)
    assert "\n" not in str(err.value)
    with pytest.raises(EdgekilnError, match="no such bundle"):
        client.publish(tmp_path / "missing", "http://fleet", ADMIN, transport=t)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(EdgekilnError, match="cannot reach the update server at http://down") as err:
        client.list_devices("http://down", ADMIN, transport=httpx.MockTransport(refuse))
    assert "\n" not in str(err.value)
