"""End to end: publish v1 -> agents install -> publish v2 -> rollout 50% of two devices -> the
selected device installs v2 -> a broken v3 fails the health check, is rolled back
automatically, and the rollout halts.

The agents are the `edgekiln agent` CLI in subprocesses in which importing torch fails, so this
also shows the device side never needs torch. The server is the real app on loopback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time

import pytest

from edgekiln.cli.app import main
from edgekiln.fleet.agent_testing import FleetHarness, LoopbackServer, bundle_tar
from edgekiln.fleet.server import ServerConfig, create_app
from edgekiln.fleet.slot_health import health_check_slot
from edgekiln.fleet.slots import SlotStore

ADMIN = "admin-token-for-the-e2e-test-0123456789"
NO_TORCH = "import sys; sys.modules['torch'] = None\nfrom edgekiln.cli.app import main\nmain(sys.argv[1:])\n"


@pytest.fixture()
def fleet(tmp_path):
    app = create_app(ServerConfig.local(tmp_path / "server", admin_token=ADMIN))
    with LoopbackServer(app) as url:
        yield FleetHarness(url, tmp_path / "server", ADMIN)


def _agent(fleet, device, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGEKILN_DEVICE_TOKEN": device["token"]}
    cmd = [sys.executable, "-c", NO_TORCH, "agent", "--state", str(device["state"]), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def _once(fleet, device):
    return _agent(fleet, device, "--server", fleet.url, "--root", str(fleet.root_file), "--once")


def _status(device):
    """`edgekiln agent --state DIR --status --json` (in-process: it only reads the state folder)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["agent", "--state", str(device["state"]), "--status", "--json"])
    return json.loads(out.getvalue())


def _assert_healthy(device, version):
    active = SlotStore(device["state"]).active()
    assert active is not None and active.version == version, (device["name"], active)
    assert health_check_slot(active.path, latency_runs=1)["ok"]


def test_publish_rollout_install_and_automatic_rollback(fleet, tmp_path):
    tars = {1: bundle_tar(tmp_path / "b", version=1), 2: bundle_tar(tmp_path / "b", version=2, seed=1),
            3: bundle_tar(tmp_path / "b", version=3, seed=2, broken=True)}
    devices = {name: {"name": name, "token": fleet.device(name, "lab"), "state": tmp_path / name}
               for name in ("cam-1", "cam-2")}

    # v1 to everyone
    fleet.publish(tars[1], "digits", 1)
    fleet.rollout("digits", 1, "lab")
    for d in devices.values():
        proc = _once(fleet, d)
        assert proc.returncode == 0 and proc.stdout.startswith("installed: digits v1"), proc.stdout + proc.stderr
        assert _status(d)["active_version"] == 1
        _assert_healthy(d, 1)

    # v2 to 50% of the two devices: exactly one is selected and installs it
    fleet.publish(tars[2], "digits", 2)
    r2 = fleet.rollout("digits", 2, "lab", waves=[50])
    selected = [x["name"] for x in r2["devices"] if x["selected"]]
    assert len(selected) == 1, r2
    chosen, other = devices[selected[0]], next(d for n, d in devices.items() if n != selected[0])
    proc = _once(fleet, chosen)
    assert proc.returncode == 0 and proc.stdout.startswith("installed: digits v2"), proc.stdout + proc.stderr
    proc = _once(fleet, other)
    assert proc.returncode == 0 and proc.stdout.startswith("up-to-date: digits v1"), proc.stdout + proc.stderr
    assert (_status(chosen)["active_version"], _status(other)["active_version"]) == (2, 1)
    assert fleet.rollout_status(r2["id"])["state"] == "done"
    server_view = fleet.devices()
    assert (server_view[chosen["name"]]["active_version"], server_view[other["name"]]["active_version"]) == (2, 1)
    assert server_view[chosen["name"]]["latency_ms"]["p95"] > 0, server_view

    # a broken v3 (its expected outputs are wrong) to the same device: rolled back, rollout halts
    fleet.publish(tars[3], "digits", 3)
    r3 = fleet.rollout("digits", 3, "lab", waves=[50])
    target = next(x["name"] for x in r3["devices"] if x["selected"])
    victim = devices[target]
    before = _status(victim)["active_version"]
    proc = _once(fleet, victim)
    assert proc.returncode == 1 and proc.stdout.startswith("rolled_back: digits v3"), proc.stdout + proc.stderr
    assert "health check failed" in proc.stdout
    status = _status(victim)
    assert status["active_version"] == before and status["history"][-1]["status"] == "rolled_back"
    _assert_healthy(victim, before)
    halted = fleet.rollout_status(r3["id"])
    assert halted["state"] == "halted", halted
    row = next(x for x in halted["devices"] if x["name"] == target)
    assert row["status"] == "rolled_back" and "health check failed" in row["error"]
    assert "health check failed" in fleet.devices()[target]["last_error"]

    # afterwards both devices are on their last good version and stay there
    for d in devices.values():
        proc = _once(fleet, d)
        assert proc.returncode == 0 and proc.stdout.startswith("up-to-date"), proc.stdout + proc.stderr
    _assert_healthy(chosen, 2)
    _assert_healthy(other, 1)


def _wait_for_version(device, version, proc, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        active = SlotStore(device["state"]).active()
        if active is not None and active.version == version:
            return
        assert proc.poll() is None, f"the daemon exited: {proc.stderr.read()}"
        time.sleep(0.1)
    raise AssertionError(f"the daemon did not install v{version} within {timeout_s} s")


def test_daemon_mode_keeps_polling_and_installs_each_new_version(fleet, tmp_path):
    tars = {1: bundle_tar(tmp_path / "b", version=1), 2: bundle_tar(tmp_path / "b", version=2, seed=1)}
    device = {"name": "cam-d", "token": fleet.device("cam-d", "lab"), "state": tmp_path / "cam-d"}
    fleet.publish(tars[1], "digits", 1)
    fleet.rollout("digits", 1, "lab")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGEKILN_DEVICE_TOKEN": device["token"]}
    cmd = [sys.executable, "-c", NO_TORCH, "agent", "--state", str(device["state"]), "--server", fleet.url,
           "--root", str(fleet.root_file), "--interval", "0.3"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_version(device, 1, proc)
        fleet.publish(tars[2], "digits", 2)
        fleet.rollout("digits", 2, "lab")
        _wait_for_version(device, 2, proc)
        _assert_healthy(device, 2)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
