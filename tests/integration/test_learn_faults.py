"""kill -9 of `edgekiln learn STATE` at its durable steps: the device always restarts into a working
model, the old one or the sealed adapted one, never anything in between, and learning again works.

One cold `edgekiln learn` subprocess records the checkpoints an accepted adaptation passes
(``EDGEKILN_TEST_CHECKPOINT_LOG``); then each kill runs in a child forked from a warm process (the
pattern of tests/integration/test_agent_faults.py) that SIGKILLs itself at that checkpoint
(``EDGEKILN_TEST_CRASH_AT``)."""

from __future__ import annotations

import pytest
from fork_server import ForkServer
from learn_helpers import copy_state, device_state, new_samples, run_learn, tree_digest

from edgekiln.fleet.adapt import adapt_state, load_samples
from edgekiln.fleet.agent_crash import CRASH_AT_ENV, LOG_ENV
from edgekiln.fleet.slot_health import health_check_slot
from edgekiln.fleet.slots import SlotStore
from edgekiln.runtime.learner import GateConfig, LearnConfig

# The steps where a kill leaves a different state on disk: before anything is written; the
# candidate written but unsealed; sealed but inactive; the temporary symlink; switched but
# state.json not written (recovery completes it); and done.
POINTS = ("learn:features", "slot-fsynced", "slot-sealed", "temp-symlink-created", "symlink-renamed",
          "state:adapted")
ARGS = ["--new-classes", "8,9", "--distill", "1", "--budget-old-drop", "0.3"]
SWITCHED = ("symlink-renamed", "state:adapted")   # killed after the rename(): the adapted slot is active

WARM = """
import onnx, onnxruntime, onnxruntime.quantization  # noqa: F401 - warm imports only: nothing here starts a thread
from onnx.utils import Extractor  # noqa: F401
from edgekiln.cli.app import _register_all
import edgekiln.cli.learn_cmd, edgekiln.fleet.adapt, edgekiln.runtime.adapt, edgekiln.runtime.learner  # noqa
import edgekiln.runtime.head_split, edgekiln.runtime.bundle, edgekiln.execution.ort, edgekiln.fleet.bundle_tar  # noqa
import edgekiln.fleet.agent_crash, edgekiln.runtime.engine, edgekiln.fleet.slots, tracemalloc, rich.console  # noqa
_register_all()   # the CLI's command modules, imported once here instead of in every child
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("learn-faults")
    store = device_state(folder / "template")
    data = new_samples(folder / "new.npz")
    traced = copy_state(folder / "template", folder / "traced")
    log = folder / "checkpoints.log"
    # NOTE: recorded in-process (the hook reads the environment when the command starts); a cold
    # interpreter would only add its start-up time
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(LOG_ENV, str(log))
        assert run_learn(["learn", traced, "--data", data, *ARGS]) == 0
    trace = [line.split("\t", 1)[1] for line in log.read_text().splitlines()]
    return {"folder": folder, "data": data, "trace": trace, "old": store.active(),
            "old_files": tree_digest(store.active().path)}


@pytest.fixture(scope="module")
def killed(setup):
    folder, trace = setup["folder"], setup["trace"]
    runs = {}
    with ForkServer(WARM) as forks:
        for point in POINTS:
            n = trace.index(point) + 1 if point in trace else 0
            state = copy_state(folder / "template", folder / point.replace(":", "_"))
            log = folder / f"{state.name}.log"
            argv = ["learn", str(state), "--data", str(setup["data"]), *ARGS]
            runs[point] = (state, forks.run(argv, {CRASH_AT_ENV: str(n)}, log), log.read_text())
    return runs


def test_an_adaptation_passes_every_checkpoint_in_order(setup):
    trace = setup["trace"]
    assert [p for p in trace if p in POINTS] == list(POINTS), trace
    assert trace.index("learn:gated") < trace.index("slot-sealed"), "sealed before the gate decided"
    assert any(p.startswith("written:models/") for p in trace), trace


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_during_learning_keeps_a_working_model_and_learning_again_works(point, setup, killed):
    state, code, output = killed[point]
    assert code == -9, f"expected SIGKILL at {point}; rc {code}: {output[-1500:]}"
    store = SlotStore(state)
    store.recover()
    active = store.active()
    assert active is not None and health_check_slot(active.path, latency_runs=1)["ok"], (point, active)
    st = store.read_state()
    if point in SWITCHED:
        assert active.name == "b" and active.adaptation is not None, (point, active)
        assert st["adaptation"]["id"] == active.adaptation["id"] and st["active_slot"] == "b", st
        assert [r["status"] for r in st["outbox"]] == ["adapted"], st["outbox"]
        assert st["outbox"][0]["adaptation"]["id"] == active.adaptation["id"]
    else:
        old = setup["old"]
        assert (active.name, active.sha256, active.adaptation) == ("a", old.sha256, None), (point, active)
        assert tree_digest(active.path) == setup["old_files"], f"the active slot changed after a kill at {point}"
        assert st.get("adaptation") is None and st["outbox"] == [], st
        sealed = point in ("slot-sealed", "temp-symlink-created")   # the seal comes before the switch
        assert (store.sealed("b") is not None) == sealed, f"after a kill at {point}: only a sealed candidate stays"
    assert store.recover() == [], "a second recovery finds nothing to do"
    # learning again (the CLI's code path below its argument parsing, which test_learn_state runs):
    # the same samples on the old model, or on the adapted one as a domain shift
    x, y = load_samples(setup["data"])
    result = adapt_state(state, x, y, learn=LearnConfig(distill=1.0), gate=GateConfig(budget_old_drop=0.3),
                         new_classes=(8, 9) if point not in SWITCHED else ())
    assert result["accepted"] or point in SWITCHED, (point, result["reasons"])
    after = store.active()
    assert health_check_slot(after.path, latency_runs=1)["ok"] and store.recover() == []
    assert after.name == (result["slot"]) and (after.adaptation is not None), (point, result, after)
