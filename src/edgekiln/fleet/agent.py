"""The device agent: poll the update server, install verified bundles A/B, roll back bad ones.

One cycle (:meth:`Agent.run_once`), in the order of ``docs/fleet-protocol.md``:

1. repair what a crash left (:meth:`SlotStore.recover`) and send queued reports;
2. ask for the assignment; refuse a version that is not newer than the active one;
3. refresh TUF metadata (``tuf.ngclient.Updater`` from the enrolled root) and look the target
   up: its signed ``custom`` must name the assigned model and version;
4. download it (resumable, :class:`TokenFetcher`), verified against the signed length + SHA-256;
5. unpack into the inactive slot, fsync, seal, health-check it (sample inputs vs the manifest's
   expected outputs, plus latency stats from the runtime monitor);
6. switch the ``active`` symlink atomically, fsync, record and report ``installed``;
   a failed health check leaves the active slot untouched and reports ``rolled_back``.

Killed at any instant, the next start is in the last good slot and the update resumes. Imports
numpy, onnxruntime, httpx and tuf only (never torch).

>>> agent = Agent(AgentConfig(server="http://127.0.0.1:8080", token="...", state_dir="state"))  # doctest: +SKIP
>>> agent.run_once()["outcome"]                                                                # doctest: +SKIP
'installed'
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edgekiln.errors import EdgekilnError
from edgekiln.fleet.fetcher import DEFAULT_CHUNK, DeviceApi, ServerUnreachable, TokenFetcher, make_client
from edgekiln.fleet.slots import SlotStore, health_check_slot, now_iso

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CHECK_WRITE_EVERY_S = 900.0
MAX_CHECK_ATTEMPTS = 3   # health checks interrupted by the agent's death before a bundle is rejected


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    server: str                       # base URL of the update server
    token: str                        # the device token from `edgekiln devices add`
    state_dir: Path                   # the device's state folder (slots, downloads, TUF metadata)
    root: Path | None = None          # trusted root.json given at enrolment (later runs use the stored one)
    chunk_size: int = DEFAULT_CHUNK   # download chunk size in bytes
    timeout_s: float = 30.0           # per HTTP request
    latency_runs: int = 20            # inferences on the sample inputs for the reported latency stats


class Agent:
    """The update agent of one device.

    ``transport`` is handed to httpx (tests run the agent against the real server app in
    process); ``now`` replaces the clock TUF checks expiry against (freeze-attack tests);
    ``checkpoint`` is called between durable steps (the kill -9 tests; see ``agent_crash``).
    """

    def __init__(self, config: AgentConfig, *, transport: Any = None,
                 now: Callable[[], _dt.datetime] | None = None, checkpoint: Callable[[str], None] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.checkpoint = checkpoint or (lambda name: None)
        self.store = SlotStore(Path(config.state_dir), checkpoint=self.checkpoint)
        self.client = make_client(config.server, config.token, timeout_s=config.timeout_s, transport=transport)
        self.api = DeviceApi(self.client)
        self.now = now
        self.log = log or (lambda line: None)
        self._recovered = False
        self.fetcher = TokenFetcher(self.client, self.store.download_dir, chunk_size=config.chunk_size,
                                    checkpoint=self.checkpoint)

    def close(self) -> None:
        self.client.close()

    # --- one cycle ----------------------------------------------------------------------------
    def run_once(self) -> dict[str, Any]:
        """One check-and-update cycle; returns ``{"outcome", "model", "version", "error"?}``.

        Outcomes: ``idle`` (nothing assigned), ``up-to-date``, ``installed``, ``rolled_back``
        (health check failed), ``failed`` (verification refused it), ``refused`` (not newer),
        ``retry`` (the download was cut; it resumes next time). Raises :class:`ServerUnreachable`
        when the server cannot be reached; the active slot is untouched in every case.
        """
        with self.store.lock():
            return self._cycle()

    def _cycle(self) -> dict[str, Any]:
        if not self._recovered:
            for note in self.store.recover():
                self.log(f"recovered: {note}")
            self._recovered = True
        self._flush_outbox()
        assignment = self.api.assignment()
        state = self.store.read_state()
        if not assignment:
            self._note_check(state)
            return {"outcome": "idle", "model": state.get("model"), "version": state.get("active_version")}
        model, version, target_path = _parse_assignment(assignment)
        key = f"{model}/{version}"
        active = self.store.active()
        # NOTE: versions are ordered within a model; an assignment of another model (the device
        # was moved to a different model) is installed whatever its number.
        if active and active.model == model and version <= active.version:
            self._note_check(state)
            if version == active.version:
                return {"outcome": "up-to-date", "model": model, "version": version}
            return self._refuse(state, model, version,
                                f"version {version} is not newer than the active version {active.version}")
        if key in (state.get("rejected") or {}):
            self._note_check(state)
            return {"outcome": "refused", "model": model, "version": version, "error": state["rejected"][key]}
        previous = state.get("pending") or {}
        same = previous.get("target_path") == target_path
        state["pending"] = {"model": model, "version": version, "target_path": target_path,
                            "rollout_id": assignment.get("rollout_id"), "stage": "downloading",
                            "since": previous.get("since") if same else now_iso(),
                            "check_attempts": int(previous.get("check_attempts") or 0) if same else 0}
        state["last_check"] = now_iso()
        self.store.write_state(state)
        self.checkpoint("state:pending")
        return self._update(model, version, target_path)

    def _note_check(self, state: dict[str, Any]) -> None:
        """Record the time of the last check, but write state.json for it at most every
        ``CHECK_WRITE_EVERY_S``: a device polling every minute must not rewrite its flash each time."""
        last = state.get("last_check")
        try:
            age = (_dt.datetime.now(_dt.UTC) - _dt.datetime.fromisoformat(last)).total_seconds() if last else None
        except ValueError:
            age = None
        if age is None or age >= CHECK_WRITE_EVERY_S:
            state["last_check"] = now_iso()
            self.store.write_state(state)

    def _update(self, model: str, version: int, target_path: str) -> dict[str, Any]:
        from tuf.api import exceptions as tuf_errors

        try:
            updater, info = self._verified_target(model, version, target_path)
            tar = self._download(updater, info, target_path)
        except ServerUnreachable:
            raise
        except tuf_errors.DownloadHTTPError as exc:
            if exc.status_code >= 500:
                return self._retry(model, version, f"update server error while fetching: {exc}")
            return self._fail(model, version, f"download refused: {exc}")
        except tuf_errors.DownloadLengthMismatchError as exc:
            self.fetcher.discard(target_path)
            return self._fail(model, version, f"bundle refused (length does not match the signed metadata): {exc}")
        except tuf_errors.DownloadError as exc:
            return self._retry(model, version, str(exc))
        except tuf_errors.LengthOrHashMismatchError as exc:
            self.fetcher.discard(target_path)
            return self._fail(model, version, f"bundle refused (does not match the signed hash/length): {exc}")
        except tuf_errors.ExpiredMetadataError as exc:
            return self._fail(model, version, f"metadata refused as expired (freeze attack?): {exc}")
        except tuf_errors.BadVersionNumberError as exc:
            return self._fail(model, version, f"metadata refused as older than already seen (rollback attack?): {exc}")
        except tuf_errors.UnsignedMetadataError as exc:
            return self._fail(model, version, f"metadata refused: not signed by the trusted keys: {exc}")
        except tuf_errors.RepositoryError as exc:
            return self._fail(model, version, f"metadata refused: {type(exc).__name__}: {exc}")
        return self._install(model, version, target_path, tar, info.hashes["sha256"])

    def _updater(self) -> Any:
        from tuf.ngclient import Updater, UpdaterConfig

        self.store.ensure_layout()
        base = str(self.client.base_url).rstrip("/")
        updater = Updater(metadata_dir=str(self.store.tuf_dir), metadata_base_url=f"{base}/tuf/metadata/",
                          target_dir=str(self.store.download_dir), target_base_url=f"{base}/tuf/targets/",
                          fetcher=self.fetcher, config=UpdaterConfig(prefix_targets_with_hash=False),
                          bootstrap=self._trusted_root())
        if self.now is not None:
            # NOTE: python-tuf takes "now" once, when the trusted set is created, and checks every
            # expiry against it; tests of the freeze attack move it forward here.
            updater._trusted_set.reference_time = self.now()
        return updater

    def _trusted_root(self) -> bytes:
        if self.config.root is not None:
            if not Path(self.config.root).is_file():
                raise EdgekilnError(f"{self.config.root}: trusted root file not found")
            return Path(self.config.root).read_bytes()
        stored = self.store.tuf_dir / "root.json"
        if stored.is_file():
            return stored.read_bytes()
        # NOTE: python-tuf re-creates the root.json symlink by unlink + symlink; a crash in between
        # leaves only root_history/, whose newest file is the newest root this device trusted.
        history = sorted((self.store.tuf_dir / "root_history").glob("*.root.json"),
                         key=lambda p: int(p.name.split(".")[0]))
        if history:
            return history[-1].read_bytes()
        raise EdgekilnError(f"{self.store.root}: device not enrolled: give the server's trusted root with --root FILE")

    def _verified_target(self, model: str, version: int, target_path: str) -> tuple[Any, Any]:
        """Refresh the metadata and return ``(updater, TargetFile)`` for the assigned target."""
        from tuf.api import exceptions as tuf_errors

        updater = self._updater()
        try:
            updater.refresh()
        except tuf_errors.DownloadError as exc:
            if isinstance(exc, tuf_errors.DownloadHTTPError) and exc.status_code < 500:
                raise
            raise ServerUnreachable(f"update server {self.client.base_url} unreachable while fetching metadata "
                                    f"({exc})") from None
        self.checkpoint("metadata-refreshed")
        info = updater.get_targetinfo(target_path)
        if info is None:
            raise tuf_errors.RepositoryError(f"target {target_path} is not in the signed targets metadata")
        custom = info.custom if isinstance(info.custom, dict) else {}
        if custom.get("model") != model or custom.get("version") != version:
            raise tuf_errors.RepositoryError(
                f"signed metadata says {target_path} is {custom.get('model')} v{custom.get('version')}, "
                f"the assignment said {model} v{version}")
        if "sha256" not in info.hashes:
            raise tuf_errors.RepositoryError(f"target {target_path} has no sha256 in the signed metadata")
        return updater, info

    def _download(self, updater: Any, info: Any, target_path: str) -> Path:
        final = self.store.download_dir / (quote(target_path, safe="") + ".tar")
        keep = {final.name, self.fetcher.partial_path(target_path).name}
        for stale in self.store.download_dir.iterdir():
            if stale.name not in keep:
                stale.unlink(missing_ok=True)   # a download of an assignment that was replaced
        if updater.find_cached_target(info, str(final)) is None:
            updater.download_target(info, str(final))
            self.checkpoint("download-verified")
        self.fetcher.discard(target_path)
        self.checkpoint("partial-removed")
        return final

    def _install(self, model: str, version: int, target_path: str, tar: Path, sha256: str) -> dict[str, Any]:
        state = self.store.read_state()
        state["pending"] = {**(state.get("pending") or {}), "stage": "installing"}
        self.store.write_state(state)
        self.checkpoint("state:installing")
        self._report_quietly({"model": model, "version": version, "status": "checking"})
        slot = self.store.inactive_name()
        # NOTE: always unpacked afresh, even when a crash left this slot sealed with the same
        # bundle: unpacking a verified local tar is cheap, and a disk error in an old copy must not
        # make a good version fail its health check (and be rejected for good).
        try:
            self.store.unpack(tar, slot)
        except EdgekilnError as exc:
            self.store.clear_slot(slot)
            return self._rollback(model, version, tar, f"bundle does not unpack: {exc}")
        self.store.seal(slot, model=model, version=version, target_path=target_path, sha256=sha256)
        # NOTE: like the boot counter of RAUC/Mender: a bundle whose check kills the agent (a
        # crash or out-of-memory inside the model) must not make it retry forever.
        state = self.store.read_state()
        attempts = int((state.get("pending") or {}).get("check_attempts") or 0) + 1
        if attempts > MAX_CHECK_ATTEMPTS:
            self.store.clear_slot(slot)
            return self._rollback(model, version, tar, f"the agent stopped {MAX_CHECK_ATTEMPTS} times while "
                                  "health-checking this bundle (a crash or out of memory in the model?)")
        state["pending"] = {**(state.get("pending") or {}), "stage": "checking", "check_attempts": attempts}
        self.store.write_state(state)
        self.checkpoint("state:checking")
        health = health_check_slot(self.store.slot_path(slot), latency_runs=self.config.latency_runs)
        self.checkpoint("health-checked")
        if not health["ok"]:
            self.store.clear_slot(slot)
            return self._rollback(model, version, tar, health.get("error") or "health check failed")
        self.store.switch(slot)
        state = self.store.read_state()
        latency = health.get("latency_ms")
        report = {"model": model, "version": version, "status": "installed",
                  **({"latency_ms": latency} if latency else {})}
        state.update(model=model, active_version=version, active_slot=slot, pending=None, last_error=None)
        state["history"] = [*state.get("history", []),
                            {"time": now_iso(), "model": model, "version": version, "status": "installed",
                             "max_abs_error": health.get("max_abs_error"), "latency_ms": latency}]
        state["outbox"] = [*state.get("outbox", []), report]
        self.store.write_state(state)
        self.checkpoint("state:installed")
        tar.unlink(missing_ok=True)
        self.log(f"installed {model} v{version} into slot {slot}")
        self._flush_outbox(quiet=True)
        self.checkpoint("reported")
        return {"outcome": "installed", "model": model, "version": version, "slot": slot, "latency_ms": latency}

    # --- outcomes -----------------------------------------------------------------------------
    def _rollback(self, model: str, version: int, tar: Path, error: str) -> dict[str, Any]:
        tar.unlink(missing_ok=True)
        self.log(f"rolled back {model} v{version}: {error}")
        return self._finish(model, version, "rolled_back", error, reject=True)

    def _fail(self, model: str, version: int, error: str) -> dict[str, Any]:
        self.log(f"update to {model} v{version} failed: {error}")
        return self._finish(model, version, "failed", error, reject=False)

    def _refuse(self, state: dict[str, Any], model: str, version: int, error: str) -> dict[str, Any]:
        key = f"{model}/{version}"
        if key in (state.get("rejected") or {}):
            return {"outcome": "refused", "model": model, "version": version, "error": error}
        self.log(f"refused {model} v{version}: {error}")
        result = self._finish(model, version, "failed", error, reject=True)
        return {**result, "outcome": "refused"}

    def _finish(self, model: str, version: int, status: str, error: str, *, reject: bool) -> dict[str, Any]:
        state = self.store.read_state()
        state["pending"] = None
        state["last_error"] = error
        if reject:
            state["rejected"] = {**(state.get("rejected") or {}), f"{model}/{version}": error}
        state["history"] = [*state.get("history", []),
                            {"time": now_iso(), "model": model, "version": version, "status": status, "error": error}]
        state["outbox"] = [*state.get("outbox", []),
                           {"model": model, "version": version, "status": status, "error": error[:1000]}]
        self.store.write_state(state)
        self.checkpoint(f"state:{status}")
        self._flush_outbox(quiet=True)
        return {"outcome": status, "model": model, "version": version, "error": error}

    def _retry(self, model: str, version: int, error: str) -> dict[str, Any]:
        state = self.store.read_state()
        state["last_error"] = error
        self.store.write_state(state)
        self.log(f"update to {model} v{version} interrupted: {error}")
        return {"outcome": "retry", "model": model, "version": version, "error": error}

    # --- reports ------------------------------------------------------------------------------
    def _flush_outbox(self, *, quiet: bool = False) -> None:
        """Send queued reports oldest first; a report leaves the queue only once the server took it."""
        state = self.store.read_state()
        while state.get("outbox"):
            try:
                self.api.report(state["outbox"][0])
            except ServerUnreachable:
                if quiet:
                    return
                raise
            state["outbox"] = state["outbox"][1:]
            self.store.write_state(state)

    def _report_quietly(self, body: dict[str, Any]) -> None:
        # NOTE: "checking" is informative only; the final report is queued durably.
        with contextlib.suppress(EdgekilnError):
            self.api.report(body)

    # --- daemon -------------------------------------------------------------------------------
    def serve(self, interval_s: float, *, max_backoff_s: float = 300.0, cycles: int | None = None,
              sleep: Callable[[float], None] = time.sleep) -> None:
        """Poll every ``interval_s``; when the server is unreachable, back off exponentially (with
        jitter) up to ``max_backoff_s``. The active model is never touched by a failed cycle."""
        backoff, done = interval_s, 0
        while cycles is None or done < cycles:
            done += 1
            try:
                result = self.run_once()
                backoff = interval_s
                if result["outcome"] not in ("idle", "up-to-date"):
                    self.log(_summary(result))
                wait = interval_s if result["outcome"] != "retry" else min(interval_s, 5.0)
            except ServerUnreachable as exc:
                self.log(f"{exc}; keeping the active model, retrying in {backoff:.0f} s")
                wait = backoff
                backoff = min(max_backoff_s, backoff * 2)
            except EdgekilnError as exc:
                # NOTE: a refused token or a malformed answer; a daemon keeps running and retries.
                self.log(f"error: {exc}; keeping the active model")
                wait = interval_s
            sleep(wait * random.uniform(0.9, 1.1))


def _parse_assignment(data: dict[str, Any]) -> tuple[str, int, str]:
    model, version, target = data.get("model"), data.get("version"), data.get("target_path")
    if not isinstance(model, str) or not MODEL_NAME.match(model):
        raise EdgekilnError(f"update server sent an invalid model name {model!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise EdgekilnError(f"update server sent an invalid version {version!r}")
    if target != f"{model}/{version}/bundle.tar":
        raise EdgekilnError(f"update server sent target path {target!r}, expected '{model}/{version}/bundle.tar'")
    return model, version, target


def _summary(result: dict[str, Any]) -> str:
    line = f"{result['outcome']}: {result.get('model')} v{result.get('version')}"
    return line + (f" ({result['error']})" if result.get("error") else "")


def status(state_dir: str | Path) -> dict[str, Any]:
    """The agent's state as ``edgekiln agent --status`` prints it (read only: repairs nothing)."""
    store = SlotStore(state_dir)
    if not store.root.is_dir():
        raise EdgekilnError(f"{store.root}: no agent state folder here")
    state = store.read_state()
    active = store.active()
    state.update(active_version=active.version if active else None, active_slot=active.name if active else None,
                 model=active.model if active else state.get("model"),
                 active_path=str(active.path) if active else None)
    state["reports_queued"] = len(state.pop("outbox", []) or [])
    return state
