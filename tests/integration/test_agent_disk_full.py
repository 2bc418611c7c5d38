"""A device whose disk is full: the agent refuses or abandons the update, keeps its model and keeps
running; the failure reaches the server and halts the rollout.

The device side runs in one child process (this file run as a script) under
``unshare -m --propagation private``, with a 6 MiB tmpfs mounted on its state folder, against the
real update server on loopback in this process:

(a) v2 carries 8 MiB of padding: refused before download (no ``.part``), reported as failed;
(b) v3 carries 1 MiB and passes the pre-check, then the disk is filled after its 2nd chunk:
    the ``.part`` is deleted, ``state.json`` still records "no space", three daemon cycles run.

Both rollouts use ``failure_threshold=0`` and must end ``halted``; v1 stays active and healthy.
The mount lives only as long as the child's mount namespace, so nothing is left behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edgekiln.fleet.agent_testing import FleetHarness, LoopbackServer

ADMIN = "disk-full-admin-7Hq2xVb9LmP4rT8w"
TMPFS_BYTES = 6 << 20
CHUNK = 1 << 16


def _unshared(mount_at: Path, size: int, *argv: str) -> list[str]:
    """A command that runs ``argv`` in a private mount namespace with a tmpfs on ``mount_at``."""
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", str(size), str(mount_at), *argv]


@pytest.fixture(scope="module")
def tmpfs_ok(tmp_path_factory) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root (euid {os.geteuid()})")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) on this machine")
    probe = tmp_path_factory.mktemp("probe")
    proc = subprocess.run(_unshared(probe, 1 << 20, "true"), capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {proc.stderr.strip()[:300]}")


def _tars(folder: Path) -> dict[int, Path]:
    """One tiny bundle as v1; v2 and v3 are the same bundle plus 8 MiB and 1 MiB of padding."""
    from edgekiln.fleet.client import tar_bundle
    from edgekiln.fleet.sample import sample_bundle

    bundle = sample_bundle(folder / "disk", name="disk", version=1)
    tars = {1: tar_bundle(bundle, folder / "disk-v1.tar")}
    for version, pad in ((2, 8 << 20), (3, 1 << 20)):
        (bundle / "pad.bin").write_bytes(b"\xa5" * pad)
        tars[version] = tar_bundle(bundle, folder / f"disk-v{version}.tar")
    return tars


def test_a_full_disk_fails_the_update_keeps_the_model_and_halts_the_rollout(tmpfs_ok, tmp_path):
    from edgekiln.fleet.server import ServerConfig, create_app

    app = create_app(ServerConfig.local(tmp_path / "server", admin_token=ADMIN))
    with LoopbackServer(app) as url:
        fleet = FleetHarness(url, tmp_path / "server", ADMIN)
        token = fleet.device("disk-1", "g-disk")
        published = {v: fleet.publish(tar, "disk", v) for v, tar in _tars(tmp_path / "b").items()}
        state = tmp_path / "state"
        state.mkdir()
        args = json.dumps({"url": url, "admin": ADMIN, "server_dir": str(tmp_path / "server"), "token": token,
                           "state": str(state)})
        proc = subprocess.run(_unshared(state, TMPFS_BYTES, sys.executable, __file__, args),
                              capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, f"the device side exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        rollouts = {v: fleet.rollout_status(seen["rollouts"][str(v)]) for v in (2, 3)}
    assert not list(state.iterdir()), "the tmpfs must have been mounted over the state folder, not written through"
    assert seen["fs_bytes"] <= TMPFS_BYTES, f"state folder on a {seen['fs_bytes']}-byte file system, not the tmpfs"

    a = seen["a"]
    assert published[2]["length"] > TMPFS_BYTES, published[2]["length"]
    assert a["outcome"] == "failed" and "no space left on the device" in a["error"], a
    assert a["downloaded"] == [] and a["received"] == 0, f"v2 must be refused before download: {a}"

    b = seen["b"]
    assert b["filled_at"] == "chunk:2", b
    assert b["downloaded"] == [], f"the .part of the abandoned download must be deleted: {b['downloaded']}"
    assert "no space left on the device" in (b["last_error"] or ""), b
    assert b["cycles"] == 3 and not b["tracebacks"], b
    assert sum("no space" in line for line in b["log"]) >= 1, b["log"]

    assert seen["active"] == {"model": "disk", "version": 1, "healthy": True}, seen["active"]
    for v, status in rollouts.items():
        assert status["state"] == "halted", f"rollout of v{v}: {status}"


# --- the device side (run as a script, inside the private mount namespace) ---------------------
def _fill(folder: Path) -> None:
    """Write zeros into ``folder/filler.bin`` until the file system refuses."""
    with open(folder / "filler.bin", "wb", buffering=0) as out:
        for block in (1 << 16, 1 << 12, 1 << 9):
            try:
                while True:
                    out.write(b"\0" * block)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise


def _device_side(args: dict[str, Any]) -> dict[str, Any]:
    from edgekiln.fleet.slot_health import health_check_slot
    from edgekiln.fleet.slots import SlotStore

    fleet = FleetHarness(args["url"], args["server_dir"], args["admin"])
    state = Path(args["state"])
    filled: dict[str, Any] = {"armed": False, "at": None}

    def checkpoint(name: str) -> None:
        if filled["armed"] and name == "chunk:2":
            filled["armed"], filled["at"] = False, name
            _fill(state)

    log: list[str] = []
    agent = fleet.agent(state, args["token"], chunk_size=CHUNK, checkpoint=checkpoint, log=log.append)
    store, rollouts = SlotStore(state), {}
    downloads = lambda: sorted(p.name for p in store.download_dir.iterdir())  # noqa: E731
    fleet.rollout("disk", 1, "g-disk")
    first = agent.run_once()
    assert first["outcome"] == "installed", first

    rollouts[2] = fleet.rollout("disk", 2, "g-disk", failure_threshold=0)["id"]
    received = agent.fetcher.bytes_received
    a = agent.run_once()
    a_seen = {"outcome": a["outcome"], "error": a.get("error") or "", "downloaded": downloads(),
              "received": agent.fetcher.bytes_received - received}

    rollouts[3] = fleet.rollout("disk", 3, "g-disk", failure_threshold=0)["id"]
    filled["armed"] = True
    cycles: list[str] = []
    real_run_once = agent.run_once

    def counted() -> dict[str, Any]:
        cycles.append("run")
        return real_run_once()

    agent.run_once = counted   # type: ignore[method-assign]
    agent.serve(interval_s=0.2, cycles=3, sleep=lambda s: None)
    b_seen = {"filled_at": filled["at"], "downloaded": downloads(), "last_error": store.read_state().get("last_error"),
              "cycles": len(cycles), "log": log, "tracebacks": [line for line in log if "Traceback" in line]}
    active = store.active()
    healthy = bool(active and health_check_slot(active.path, latency_runs=1)["ok"])
    agent.close()
    return {"a": a_seen, "b": b_seen, "rollouts": rollouts, "fs_bytes": shutil.disk_usage(state).total,
            "active": {"model": active.model if active else None, "version": active.version if active else None,
                       "healthy": healthy}}


if __name__ == "__main__":
    print(json.dumps(_device_side(json.loads(sys.argv[1]))))
