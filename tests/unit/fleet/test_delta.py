"""Delta updates (fleet/delta.py): the server signs a bsdiff4 patch from the previous version at
publish; a device rebuilds its base from the active slot, patches, and installs only a result
whose sha256 and length are the signed full bundle's. Every failure falls back to the full bundle.
In-process server, 30 KB MLP bundles (v2 moves 10% of the weights)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import httpx
import pytest

from edgekiln.fleet import agent as agent_mod
from edgekiln.fleet import delta
from edgekiln.fleet.agent_testing import FleetHarness
from edgekiln.fleet.bundle_tar import write_reproducible
from edgekiln.fleet.inprocess import InProcessTransport
from edgekiln.fleet.sample import sample_mlp_bundle
from edgekiln.fleet.server import ServerConfig, create_app
from edgekiln.fleet.slot_health import health_check_slot

ADMIN = "admin-token-for-delta-tests-0123456789"


class Counting(httpx.BaseTransport):
    """Counts the response bytes of /tuf/targets/ requests, by path."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner, self.targets = inner, {}

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        if "/tuf/targets/" in request.url.path:
            path = request.url.path.split("/tuf/targets/", 1)[1]
            self.targets[path] = self.targets.get(path, 0) + len(resp.content)
        return resp


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("delta")
    app = create_app(ServerConfig.local(folder / "server", admin_token=ADMIN))
    transport = Counting(InProcessTransport(app))
    harness = FleetHarness("http://fleet.test", folder / "server", ADMIN, transport=transport)
    b = folder / "bundles"
    harness.tars = {key: write_reproducible(sample_mlp_bundle(b / key, version=v, change=c), b / f"{key}.tar")
                    for key, v, c in (("v1", 1, 0.0), ("v2", 2, 0.1), ("v3", 3, 0.1))}
    harness.app, harness.counting = app, transport
    return harness


def _device_with_v1(fleet, tmp_path, name):
    token = fleet.device(name, f"g-{name}")
    fleet.publish(fleet.tars["v1"], name, 1)
    fleet.rollout(name, 1, f"g-{name}")
    agent = fleet.agent(tmp_path / "state", token)
    assert agent.run_once()["outcome"] == "installed"
    return agent


def _try(fleet, agent):
    """One delta attempt as Agent._download makes it: (result path or None, transfer note, log lines)."""
    director = agent._director_target()
    model, version, path = agent_mod._parse_assignment(director.custom)
    updater, info = agent._verified_target(model, version, path, director)
    lines, note = [], {}
    got = delta.try_delta(updater, info, agent.store, agent.fetcher, agent._final_tar(path), lines.append,
                          transfer=note)
    return got, note, lines, info


def _assert_full_install(fleet, agent, name, info):
    """After a fallback: no temp file is left, and the full bundle installs and passes its check."""
    left = [p.name for p in agent.store.download_dir.iterdir() if not p.name.startswith(".")]
    assert not any(n.endswith((".base", ".bsdiff4", ".patched")) for n in left), left
    before = fleet.counting.targets.get(f"{name}/2/bundle.tar", 0)
    assert agent.run_once()["outcome"] == "installed"
    assert fleet.counting.targets.get(f"{name}/2/bundle.tar", 0) - before == info.length, "full bundle expected"
    active = agent.store.active()
    assert (active.version, active.sha256) == (2, info.hashes["sha256"])
    assert health_check_slot(active.path, latency_runs=1)["ok"]


def test_a_device_updates_through_a_delta_with_a_third_of_the_bytes(fleet, tmp_path):
    agent = _device_with_v1(fleet, tmp_path, "d-happy")
    base = agent.store.active()
    assert hashlib.sha256(write_reproducible(base.path, tmp_path / "re.tar").read_bytes()).hexdigest() == base.sha256
    published = fleet.publish(fleet.tars["v2"], "d-happy", 2)
    assert [d["base_version"] for d in published["deltas"]] == [1], published
    fleet.rollout("d-happy", 2, "g-d-happy")
    got, note, lines, info = _try(fleet, agent)
    assert got is not None, lines
    moved = fleet.counting.targets.get(delta.delta_path("d-happy", 2, 1), 0)
    ratio = moved / info.length
    print(f"delta {moved} B for a {info.length} B bundle: {ratio:.3f}x (limit 0.3x)")
    assert ratio <= 0.3, f"delta moved {ratio:.3f}x of the bundle's bytes, limit 0.3x"
    assert note == {"kind": "delta", "bytes": moved, "fallback": None}
    assert "d-happy/2/bundle.tar" not in fleet.counting.targets
    assert agent.run_once()["outcome"] == "installed"      # the patched tar is the verified, cached target
    assert "d-happy/2/bundle.tar" not in fleet.counting.targets, "the full bundle must not be downloaded"
    active = agent.store.active()
    assert (active.version, active.sha256) == (2, info.hashes["sha256"])


@pytest.mark.parametrize("edit", ["append", "remove-manifest"])
def test_an_edited_slot_falls_back_to_the_full_bundle(fleet, tmp_path, edit):
    name = f"d-base-{edit}"
    agent = _device_with_v1(fleet, tmp_path, name)
    slot = agent.store.active().path
    if edit == "append":
        with open(slot / "samples.npz", "ab") as fh:
            fh.write(b"\0")
    else:
        (slot / "manifest.json").unlink()
    fleet.publish(fleet.tars["v2"], name, 2)
    fleet.rollout(name, 2, f"g-{name}")
    got, note, lines, info = _try(fleet, agent)
    assert got is None and note["fallback"] == "base changed", (note, lines)
    assert delta.delta_path(name, 2, 1) not in fleet.counting.targets, "nothing downloaded for a bad base"
    _assert_full_install(fleet, agent, name, info)


def test_a_wrongly_built_signed_delta_is_caught_by_the_result_hash(fleet, tmp_path):
    import bsdiff4

    agent = _device_with_v1(fleet, tmp_path, "d-wrong")
    fleet.publish(fleet.tars["v2"], "d-wrong", 2)
    wrong = bsdiff4.diff(fleet.tars["v1"].read_bytes(), fleet.tars["v3"].read_bytes())  # right size, wrong bytes
    fleet.app.state.fleet.registry.add_delta("d-wrong", 2, 1, wrong)
    fleet.rollout("d-wrong", 2, "g-d-wrong")
    got, note, lines, info = _try(fleet, agent)
    assert got is None and note["fallback"] == "delta result mismatch", (note, lines)
    assert not agent._final_tar("d-wrong/2/bundle.tar").exists()
    _assert_full_install(fleet, agent, "d-wrong", info)


def test_a_delta_blob_flipped_in_the_store_fails_the_tuf_hash(fleet, tmp_path):
    agent = _device_with_v1(fleet, tmp_path, "d-flip")
    fleet.publish(fleet.tars["v2"], "d-flip", 2)
    row = fleet.app.state.fleet.registry.version_by_path(delta.delta_path("d-flip", 2, 1))
    blob = Path(fleet.server_dir / "blobs" / row["blob_key"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    fleet.rollout("d-flip", 2, "g-d-flip")
    got, note, lines, info = _try(fleet, agent)
    assert got is None and note["fallback"] == "delta corrupt", (note, lines)
    _assert_full_install(fleet, agent, "d-flip", info)


def test_without_bsdiff4_the_device_takes_the_full_bundle(fleet, tmp_path, monkeypatch):
    agent = _device_with_v1(fleet, tmp_path, "d-nobs")
    fleet.publish(fleet.tars["v2"], "d-nobs", 2)
    fleet.rollout("d-nobs", 2, "g-d-nobs")
    monkeypatch.setitem(sys.modules, "bsdiff4", None)     # import bsdiff4 -> ImportError (as on armv7l)
    got, note, lines, info = _try(fleet, agent)
    assert got is None and note["fallback"] == "bsdiff4 missing", (note, lines)
    assert any("bsdiff4" in line for line in lines), lines
    _assert_full_install(fleet, agent, "d-nobs", info)


def test_no_delta_for_a_full_round_or_another_graph(tmp_path):
    base = write_reproducible(sample_mlp_bundle(tmp_path / "b", version=1), tmp_path / "b.tar")
    full_round = write_reproducible(sample_mlp_bundle(tmp_path / "f", version=2, change=1.0, how="all"),
                                    tmp_path / "f.tar")
    other = write_reproducible(sample_mlp_bundle(tmp_path / "o", version=2, params=6000), tmp_path / "o.tar")
    tuned = write_reproducible(sample_mlp_bundle(tmp_path / "t", version=2, change=0.1), tmp_path / "t.tar")
    share = delta.changed_share(base, full_round)
    assert share > delta.MAX_CHANGED, f"a full round changed only {share:.2f} of the words"
    assert delta.make_delta(base, full_round) is None
    assert not delta.same_graph(base, other) and delta.make_delta(base, other) is None
    assert delta.same_graph(base, tuned)
    patch = delta.make_delta(base, tuned)
    assert patch is not None and len(patch) <= 0.3 * tuned.stat().st_size, len(patch or b"")
    assert delta.make_delta(base, tuned, max_bytes=1000) is None


def test_write_reproducible_gives_the_same_bytes_as_tar_bundle(fleet, tmp_path):
    from edgekiln.fleet.client import tar_bundle

    folder = fleet.tars["v1"].with_suffix("")
    a = tar_bundle(folder, tmp_path / "a.tar").read_bytes()
    assert a == write_reproducible(folder, tmp_path / "b.tar").read_bytes()
