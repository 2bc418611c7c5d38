"""`edgekiln learn STATE` on an agent's state folder: a rejected adaptation changes nothing the
device runs, an accepted one goes live through the A/B slots, and both are queued for the server.

The state folder is made with the slot steps of an install (unpack, seal, switch) from a tiny
bundle with learning data; no server (the agent's side is tests/unit/fleet/test_agent.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from learn_helpers import (
    MODEL,
    VERSION,
    copy_state,
    device_state,
    infer_classes,
    new_samples,
    run_learn,
    tree_digest,
)

from edgekiln.fleet.slot_health import health_check_slot
from edgekiln.fleet.slots import SlotStore


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("learn-state")
    device_state(folder / "state")
    new_samples(folder / "new.npz")
    return folder


def _learn(state, data, *args):
    return run_learn(["learn", state, "--data", data, "--new-classes", "8,9", *args])


def test_a_rejected_adaptation_leaves_the_active_model_untouched(template, tmp_path, capsys):
    state = copy_state(template / "state", tmp_path / "state")
    store = SlotStore(state)
    before = {"files": tree_digest(store.slot_path("a")), "seal": store.seal_path("a").read_bytes(),
              "link": (state / "active").readlink()}
    # no replay and a budget of 0: training on the new classes alone forgets the old ones
    code = _learn(state, template / "new.npz", "--replay-bytes", "0", "--budget-old-drop", "0")
    out = capsys.readouterr().out
    assert code == 3, out
    assert "rejected" in out and "over the budget of 0.0%" in out, out
    assert (state / "active").readlink() == before["link"]
    assert tree_digest(store.slot_path("a")) == before["files"], "a file of the active slot changed"
    assert store.seal_path("a").read_bytes() == before["seal"], "the active seal changed"
    assert not store.slot_path("b").exists() and store.sealed("b") is None, "the candidate slot was not cleared"
    st = store.read_state()
    last = st["last_adaptation"]
    assert last["status"] == "rejected" and "dropped" in last["reasons"][0] and "budget of 0.0%" in last["reasons"][0]
    assert st.get("adaptation") is None and st["active_slot"] == "a"
    report = st["outbox"][-1]
    assert (report["status"], report["model"], report["version"]) == ("adapt_rejected", MODEL, VERSION), report
    assert report["adaptation"]["id"] == last["id"] and report["adaptation"]["gate"]["budget"] == 0.0
    assert report["adaptation"]["gate"]["old_drop"] > 0, report
    assert st["history"][-1]["status"] == "adapt_rejected"


def test_an_accepted_adaptation_is_sealed_switched_and_reported(template, tmp_path, capsys):
    state = copy_state(template / "state", tmp_path / "state")
    store = SlotStore(state)
    old = tree_digest(store.slot_path("a"))
    # NOTE: the tiny model forgets more than a real one (A's benchmark measures that): a budget of
    # 0.3 with distillation accepts here; this test is about the slots, not the accuracy.
    code = _learn(state, template / "new.npz", "--distill", "1.0", "--budget-old-drop", "0.3", "--json")
    result = json.loads(capsys.readouterr().out)
    assert code == 0, result
    assert (result["status"], result["slot"], result["previous_slot"]) == ("adapted", "b", "a"), result
    active = store.active()
    assert active.name == "b" and active.adaptation["id"] == result["id"], active
    assert (active.model, active.version, active.target_path) == (MODEL, VERSION, f"{MODEL}/{VERSION}/bundle.tar")
    assert active.adaptation["classes_after"] == 10 and active.adaptation["gate"]["old_drop"] <= 0.3
    check = health_check_slot(active.path, latency_runs=1)
    assert check["ok"], check
    assert infer_classes(active.path) == 10
    assert tree_digest(store.slot_path("a")) == old, "the previous slot must stay as it was (the fallback)"
    st = store.read_state()
    assert (st["active_slot"], st["adaptation"]["id"], st["last_adaptation"]["status"]) == ("b", result["id"],
                                                                                          "adapted"), st
    report = st["outbox"][-1]
    assert (report["status"], report["adaptation"]["id"]) == ("adapted", result["id"]), report
    assert set(report["adaptation"]) <= {"version", "id", "n", "base_sha256", "variant", "scope", "classes_before",
                                         "classes_after", "samples", "replay_bytes", "created", "gate"}, report
    assert len(json.dumps(report["adaptation"])) <= 2048
    # the seal's sha256 is that of the slot's reproducible tar, as an install's is of the signed tar
    from edgekiln.fleet.client import tar_bundle

    tar = tar_bundle(active.path, tmp_path / "adapted.tar")
    import hashlib

    assert hashlib.sha256(tar.read_bytes()).hexdigest() == active.sha256
    assert store.recover() == [], "an accepted adaptation leaves nothing to repair"


def test_learn_needs_an_installed_model_and_refuses_out_for_a_state_folder(template, tmp_path, capsys):
    state = copy_state(template / "state", tmp_path / "state")
    assert _learn(state, template / "new.npz", "--out", tmp_path / "x") == 2
    assert "--out is not taken" in capsys.readouterr().err
    empty = tmp_path / "empty"
    SlotStore(empty).ensure_layout()
    assert _learn(empty, template / "new.npz") == 2
    assert "no active model to adapt" in capsys.readouterr().err
    assert np.array_equal(SlotStore(state).read_state()["outbox"], []), "a refused input queues no report"
