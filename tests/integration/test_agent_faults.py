"""Fault tests of the device agent against the real update server on loopback.

Every case asserts the same promise: the device keeps a working model, nothing invalid is ever
active, and the update completes once the fault is gone.

The kill -9 cases run `edgekiln agent --once` in a separate process with the TEST-ONLY crash hook
of ``edgekiln.fleet.agent_crash`` (``EDGEKILN_TEST_CRASH_AT=N``: the agent SIGKILLs itself at its
N-th checkpoint), then restart the agent on the same state folder and check it completes. One
cold `edgekiln agent` subprocess records the checkpoints of a full update; the killed runs are
children forked from a warm process (tests/integration/fork_server.py), so 28 of them take seconds, not a minute.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fork_server import ForkServer

from edgekiln.fleet.agent import Agent, AgentConfig
from edgekiln.fleet.agent_crash import CRASH_AT_ENV, LOG_ENV
from edgekiln.fleet.agent_testing import FleetHarness, LoopbackServer, bundle_tar, free_port
from edgekiln.fleet.fetcher import ServerUnreachable
from edgekiln.fleet.server import ServerConfig, create_app
from edgekiln.fleet.slot_health import health_check_slot
from edgekiln.fleet.slots import SLOT_NAMES, SlotStore
from edgekiln.runtime.engine import Runtime

ADMIN = "admin-token-for-fault-tests-0123456789"
CHUNK = 4096
# What one update of the 20,480-byte test bundle passes through, in order (5 chunks of 4 KiB).
POINTS = (
    "director-refreshed", "state:pending", "metadata-refreshed",
    "chunk:1", "chunk:2", "chunk:3", "chunk:4", "chunk:5", "download-verified", "partial-removed",
    "state:installing", "slot-created",
    "written:expected.npz", "fsynced:expected.npz", "written:manifest.json", "fsynced:manifest.json",
    "written:models/fp32.onnx", "fsynced:models/fp32.onnx", "written:samples.npz", "fsynced:samples.npz",
    "slot-fsynced", "slot-sealed", "state:checking", "health-checked",
    "temp-symlink-created", "symlink-renamed", "state-dir-fsynced", "state:installed", "reported",
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fleet")
    app = create_app(ServerConfig.local(folder / "server", admin_token=ADMIN))
    with LoopbackServer(app) as url:
        harness = FleetHarness(url, folder / "server", ADMIN)
        bundles = folder / "bundles"
        harness.tars = {1: bundle_tar(bundles, version=1), 2: bundle_tar(bundles, version=2, seed=1)}
        yield harness


def _device_with_v1(fleet, state: Path, name: str):
    """A device in its own group, for its own model, with v1 installed; v2 published and rolled out."""
    token = fleet.device(name, f"g-{name}")
    fleet.publish(fleet.tars[1], name, 1)
    fleet.rollout(name, 1, f"g-{name}")
    agent = fleet.agent(state, token)
    assert agent.run_once()["outcome"] == "installed"
    agent.close()
    return token


def _assert_good_model_active(state: Path, version: int) -> None:
    """The active slot is sealed, is ``version``, passes the health check and infers."""
    store = SlotStore(state)
    active = store.active()
    assert active is not None, f"nothing is active in {state}"
    assert active.version == version, f"active version {active.version}, expected {version}"
    check = health_check_slot(active.path, latency_runs=1)
    assert check["ok"], check
    y = Runtime(active.path, warmup=0).infer(np.zeros((1, 1, 8, 8), np.float32))
    assert y.shape == (1, 10) and np.isfinite(y).all()
    for name in SLOT_NAMES:   # no half-written slot can ever be the one named active
        if name == store.active_name():
            assert store.sealed(name) is not None


def _run_cli(fleet, token: str, state: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    cmd = [sys.executable, "-m", "edgekiln.cli", "agent", "--server", fleet.url, "--token", token,
           "--state", str(state), "--once", "--chunk-size", str(CHUNK)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


# --- kill -9 at every checkpoint --------------------------------------------------------------
@dataclass
class KillSetup:
    token: str
    template: Path
    trace: list[str]
    length: int
    sha256: str


@pytest.fixture(scope="module")
def kill_setup(fleet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("kill")
    template = folder / "template"
    token = _device_with_v1(fleet, template, "kill")
    published = fleet.publish(fleet.tars[2], "kill", 2)
    fleet.rollout("kill", 2, "g-kill")
    traced = folder / "traced"
    shutil.copytree(template, traced, symlinks=True)
    log = folder / "checkpoints.log"
    proc = _run_cli(fleet, token, traced, {LOG_ENV: str(log)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    trace = [line.split("\t", 1)[1] for line in log.read_text().splitlines()]
    return KillSetup(token, template, trace, int(published["length"]), published["sha256"])


def test_a_full_update_passes_through_every_checkpoint(kill_setup):
    assert kill_setup.trace == list(POINTS)
    assert len(set(POINTS)) >= 20


# One child per `edgekiln agent --once` run, forked from a warm process (tests/integration/fork_server.py),
# which keeps the 28 kill tests fast on 2 cores.
WARM = """
import onnxruntime  # noqa: F401 - warm imports only: nothing here starts a thread
import edgekiln.cli.agent_cmd, edgekiln.fleet.agent, edgekiln.fleet.agent_crash, edgekiln.runtime.bundle  # noqa
"""


@dataclass
class Run:
    returncode: int
    stderr: str


@pytest.fixture(scope="module")
def killed(kill_setup, fleet, tmp_path_factory):
    """For every checkpoint: a copy of the v1 device state, and an agent run SIGKILLed there."""
    folder = tmp_path_factory.mktemp("killed")
    runs = {}
    with ForkServer(WARM) as forks:
        for point in POINTS:
            state = folder / point.replace(":", "_").replace("/", "_")
            shutil.copytree(kill_setup.template, state, symlinks=True)
            n = kill_setup.trace.index(point) + 1 if point in kill_setup.trace else 0
            log = state.parent / f"{state.name}.log"
            argv = ["agent", "--server", fleet.url, "--token", kill_setup.token, "--state", str(state), "--once",
                    "--chunk-size", str(CHUNK)]
            code = forks.run(argv, {CRASH_AT_ENV: str(n)}, log)
            runs[point] = (state, n, Run(code, log.read_text()))
    return runs


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_checkpoint_keeps_the_last_good_model_and_the_update_resumes(point, killed, kill_setup, fleet):
    trace = kill_setup.trace
    assert point in trace, f"the agent no longer passes checkpoint {point}: {trace}"
    state, n, proc = killed[point]
    assert proc.returncode == -9, f"expected SIGKILL at checkpoint {n} ({point}); rc {proc.returncode}: {proc.stderr}"
    switched = n > trace.index("temp-symlink-created") + 1     # the kill came after the rename()
    _assert_good_model_active(state, 2 if switched else 1)
    active = SlotStore(state).active()
    assert active.sha256 == (kill_setup.sha256 if switched else SlotStore(kill_setup.template).active().sha256)
    part = SlotStore(state).download_dir / "kill%2F2%2Fbundle.tar.part"
    have = part.stat().st_size if part.exists() else 0
    downloaded = n > trace.index("chunk:5") + 1

    agent = fleet.agent(state, kill_setup.token, chunk_size=CHUNK)     # the restart
    result = agent.run_once()
    assert result["outcome"] == ("up-to-date" if switched else "installed"), result
    _assert_good_model_active(state, 2)
    expected_bytes = 0 if downloaded else kill_setup.length - have
    assert agent.fetcher.bytes_received == expected_bytes, (
        f"after a kill at {point} with {have} bytes on disk the restart fetched {agent.fetcher.bytes_received} "
        f"bytes, expected {expected_bytes} (resume, not restart)")
    after = agent.store.read_state()
    assert (after["active_version"], after["pending"], after["outbox"]) == (2, None, []), after
    assert list(agent.store.download_dir.iterdir()) == []
    agent.close()


# --- network and repository faults ------------------------------------------------------------
class _CutStream(httpx.SyncByteStream):
    def __init__(self, inner, after: int) -> None:
        self.inner, self.after = inner, after

    def __iter__(self):
        sent = 0
        for chunk in self.inner:
            if sent + len(chunk) >= self.after:
                yield chunk[: self.after - sent]
                raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
            sent += len(chunk)
            yield chunk

    def close(self) -> None:
        self.inner.close()


class Network(httpx.BaseTransport):
    """Loopback HTTP with faults: cut target bodies after ``cut`` bytes; serve ``replay`` metadata."""

    def __init__(self, *, cut: int | None = None, replay: dict[str, bytes] | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.cut, self.replay = cut, replay or {}
        self.target_ranges: list[str | None] = []

    def handle_request(self, request):
        name = request.url.path.rsplit("/", 1)[-1]
        if "/tuf/metadata/" in request.url.path and name in self.replay:
            return httpx.Response(200, content=self.replay[name], request=request)
        resp = self.inner.handle_request(request)
        if "/tuf/targets/" in request.url.path:
            self.target_ranges.append(request.headers.get("range"))
            if self.cut is not None:
                return httpx.Response(resp.status_code, headers=resp.headers, stream=_CutStream(resp.stream, self.cut),
                                      request=request)
        return resp


def test_truncated_download_keeps_the_model_and_resumes_with_range(fleet, tmp_path):
    token = _device_with_v1(fleet, tmp_path / "state", "trunc")
    published = fleet.publish(fleet.tars[2], "trunc", 2)
    fleet.rollout("trunc", 2, "g-trunc")
    cut = Network(cut=10_000)
    agent = fleet.agent(tmp_path / "state", token, transport=cut)
    result = agent.run_once()
    assert result["outcome"] == "retry" and "resumes" in result["error"], result
    _assert_good_model_active(tmp_path / "state", 1)
    have = agent.fetcher.partial_path("trunc/2/bundle.tar").stat().st_size
    assert 0 < have < published["length"], have
    whole = Network()
    agent = fleet.agent(tmp_path / "state", token, transport=whole)
    assert agent.run_once()["outcome"] == "installed"
    assert whole.target_ranges == [f"bytes={have}-"]
    assert agent.fetcher.bytes_received == published["length"] - have
    _assert_good_model_active(tmp_path / "state", 2)


def test_tampered_bundle_on_the_server_store_is_refused(fleet, tmp_path):
    token = _device_with_v1(fleet, tmp_path / "state", "tamper")
    tar = bundle_tar(tmp_path / "b", version=2, seed=7)      # its own bytes, so its own blob
    published = fleet.publish(tar, "tamper", 2)
    blobs = [p for p in (fleet.server_dir).rglob(published["sha256"]) if p.is_file()]
    assert len(blobs) == 1, f"blob {published['sha256'][:12]}... not found in the server's store"
    original = blobs[0].read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    blobs[0].write_bytes(bytes(tampered))
    fleet.rollout("tamper", 2, "g-tamper")
    agent = fleet.agent(tmp_path / "state", token)
    result = agent.run_once()
    assert result["outcome"] == "failed" and "does not match the signed hash" in result["error"], result
    _assert_good_model_active(tmp_path / "state", 1)
    assert list(agent.store.download_dir.iterdir()) == [], "tampered bytes must not be kept"
    assert fleet.devices()["tamper"]["status"] == "failed"
    blobs[0].write_bytes(original)                            # the operator repairs the store
    fleet.rollout("tamper", 2, "g-tamper")
    assert agent.run_once()["outcome"] == "installed"
    _assert_good_model_active(tmp_path / "state", 2)


def test_metadata_signed_by_the_wrong_key_is_refused(fleet, tmp_path):
    state = tmp_path / "state"
    _device_with_v1(fleet, state, "wrongkey")                 # enrolled with this server's root
    other = create_app(ServerConfig.local(tmp_path / "impostor", admin_token=ADMIN))   # other keys
    with LoopbackServer(other) as url:
        impostor = FleetHarness(url, tmp_path / "impostor", ADMIN)
        token = impostor.device("wrongkey", "g-wrongkey")
        impostor.publish(fleet.tars[1], "wrongkey", 1)
        impostor.publish(fleet.tars[2], "wrongkey", 2)
        impostor.rollout("wrongkey", 2, "g-wrongkey")
        agent = Agent(AgentConfig(server=url, token=token, state_dir=state))   # the trust stored at enrolment
        result = agent.run_once()
        agent.close()
    assert result["outcome"] == "failed" and "not signed by the trusted keys" in result["error"], result
    _assert_good_model_active(state, 1)
    assert agent.fetcher.bytes_received == 0, "nothing may be downloaded on untrusted metadata"


def _metadata(fleet) -> dict[str, bytes]:
    with httpx.Client(base_url=fleet.url, headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        return {name: c.get(f"/tuf/metadata/{name}").content
                for name in ("timestamp.json", "snapshot.json", "targets.json")}


def test_replayed_older_metadata_is_refused(fleet, tmp_path):
    state = tmp_path / "state"
    old = _metadata(fleet)                                     # before v1 of this model exists
    token = _device_with_v1(fleet, state, "replay")           # the device now trusts newer metadata
    fleet.publish(fleet.tars[2], "replay", 2)
    fleet.rollout("replay", 2, "g-replay")
    agent = fleet.agent(state, token, transport=Network(replay=old))
    result = agent.run_once()
    assert result["outcome"] == "failed" and "older than already seen" in result["error"], result
    _assert_good_model_active(state, 1)
    assert agent.fetcher.bytes_received == 0
    fleet.rollout("replay", 2, "g-replay")                    # the attacker is gone
    assert fleet.agent(state, token).run_once()["outcome"] == "installed"
    _assert_good_model_active(state, 2)


def test_expired_metadata_is_refused(fleet, tmp_path):
    state = tmp_path / "state"
    token = _device_with_v1(fleet, state, "freeze")
    fleet.publish(fleet.tars[2], "freeze", 2)
    fleet.rollout("freeze", 2, "g-freeze")
    # An attacker keeps serving today's (validly signed) metadata; two days later it has expired
    # (timestamp expiry: 1 day). The device's clock is moved instead of waiting.
    later = _dt.datetime.now(_dt.UTC) + _dt.timedelta(days=2)
    agent = fleet.agent(state, token, now=lambda: later)
    result = agent.run_once()
    assert result["outcome"] == "failed" and "expired" in result["error"], result
    _assert_good_model_active(state, 1)
    assert agent.fetcher.bytes_received == 0


SERVER_SCRIPT = """
import os, signal, sys
import uvicorn
from edgekiln.fleet.server import ServerConfig, create_app
crash_at, armed = os.environ.get("CRASH_PUBLISH_AT"), os.environ.get("CRASH_ARMED_FILE", "")
def fault(step):
    if step == crash_at and os.path.exists(armed):
        os.kill(os.getpid(), signal.SIGKILL)   # the server dies in the middle of the publish
app = create_app(ServerConfig.local(sys.argv[1], admin_token=sys.argv[2]), fault=fault)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[3]), log_level="warning")
"""


class ServerProcess:
    """`create_app` + uvicorn in a subprocess; it SIGKILLs itself at publish step ``crash_at`` once
    the file ``folder/armed`` exists (so the setup's own publishes go through)."""

    def __init__(self, folder: Path, port: int, crash_at: str | None = None) -> None:
        self.armed = folder.parent / "armed"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CRASH_ARMED_FILE": str(self.armed),
               **({"CRASH_PUBLISH_AT": crash_at} if crash_at else {})}
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(folder), ADMIN, str(port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def test_server_killed_mid_publish_leaves_the_device_on_its_model(tmp_path):
    """The server process is SIGKILLed inside a publish (in the transaction that signs the new
    metadata: targets signed, snapshot not yet), then restarted on the same folder. The server's
    own tests cover its other publish steps; this is what the device sees."""
    step = "signed-snapshot"
    from edgekiln.errors import EdgekilnError
    from edgekiln.fleet.client import list_models

    folder, port, state = tmp_path / "server", free_port(), tmp_path / "state"
    tars = {1: bundle_tar(tmp_path / "b", version=1), 2: bundle_tar(tmp_path / "b", version=2, seed=1)}
    server = ServerProcess(folder, port, crash_at=step)
    try:
        harness = FleetHarness(server.url, folder, ADMIN)
        harness.tars = tars
        token = _device_with_v1(harness, state, "restart")
        server.armed.touch()
        with pytest.raises(EdgekilnError):
            harness.publish(tars[2], "restart", 2)
        assert server.proc.wait(timeout=10) == -9, f"the server did not die at {step}"
        with pytest.raises(ServerUnreachable):
            harness.agent(state, token).run_once()
        _assert_good_model_active(state, 1)
    finally:
        server.stop()
    server = ServerProcess(folder, port)                       # same database, store and keys
    try:
        assert [(m["model"], m["version"]) for m in list_models(server.url, ADMIN)] == [("restart", 1)]
        agent = harness.agent(state, token)
        assert agent.run_once()["outcome"] == "up-to-date"
        _assert_good_model_active(state, 1)
        assert harness.publish(tars[2], "restart", 2)["version"] == 2   # nothing was half-visible: no 409
        harness.rollout("restart", 2, "g-restart")
        assert agent.run_once()["outcome"] == "installed"
        _assert_good_model_active(state, 2)
    finally:
        server.stop()


def test_agent_keeps_its_model_while_the_server_is_down(fleet, tmp_path):
    state = tmp_path / "state"
    token = _device_with_v1(fleet, state, "down")
    agent = Agent(AgentConfig(server=f"http://127.0.0.1:{free_port()}", token=token, state_dir=state))
    with pytest.raises(ServerUnreachable):
        agent.run_once()
    _assert_good_model_active(state, 1)
