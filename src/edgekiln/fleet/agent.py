"""The device agent: poll the update server, install verified bundles A/B, roll back bad ones.

One cycle (:meth:`Agent.run_once`), in the order of ``docs/fleet-protocol.md``:

1. repair what a crash left (:meth:`SlotStore.recover`) and send queued reports;
2. refresh this device's director metadata (a second TUF repository, ``/director/metadata/``,
   from the enrolled director root): its one target ``assignment`` is the signed instruction, bound
   to this device's token; refuse a version that is not newer than the active one or not above the
   highest version this device has run of that model (``high_water``). The unsigned
   ``/v1/device/assignment`` is never asked;
3. refresh the image repository's TUF metadata (``tuf.ngclient.Updater`` from the enrolled root)
   and look the target up: its signed length, sha256, model and version must equal the director's;
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
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edgekiln.errors import EdgekilnError
from edgekiln.fleet import agent_metadata as md
from edgekiln.fleet.agent_metadata import MetadataRefused
from edgekiln.fleet.fetcher import DEFAULT_CHUNK, DeviceApi, ServerUnreachable, TokenFetcher, make_client
from edgekiln.fleet.slot_health import health_check_slot
from edgekiln.fleet.slots import NoSpace, SlotStore, now_iso

MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CHECK_WRITE_EVERY_S = 900.0
MAX_CHECK_ATTEMPTS = 3   # health checks interrupted by the agent's death before a bundle is rejected
@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    server: str                       # base URL of the update server
    token: str                        # the device token from `edgekiln devices add`
    state_dir: Path                   # the device's state folder (slots, downloads, TUF metadata)
    root: Path | None = None          # trusted root.json given at enrolment (later runs use the stored one)
    director_root: Path | None = None  # trusted director root (default: director-root.json next to `root`)
    ca: Path | None = None            # CA certificate (PEM) the server's TLS certificate must chain to
    insecure_http: bool = False       # allow plain http:// to a non-loopback server (tokens in clear)
    chunk_size: int = DEFAULT_CHUNK   # download chunk size in bytes
    timeout_s: float = 30.0           # per HTTP request
    latency_runs: int = 20            # inferences on the sample inputs for the reported latency stats
    delta: bool = True                # try a signed delta from the active version before the full bundle


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
        self.client = make_client(config.server, config.token, timeout_s=config.timeout_s, transport=transport,
                                  ca=config.ca, insecure_http=config.insecure_http)
        self.device_id = hashlib.sha256(config.token.encode("utf-8")).hexdigest()[:32]
        self.api = DeviceApi(self.client)
        self.now = now
        self.log = log or (lambda line: None)
        self._recovered = False
        self._transfer: dict[str, Any] = {}   # how the bundle being installed came: see _transfer_report
        self.fetcher = TokenFetcher(self.client, self.store.download_dir, chunk_size=config.chunk_size,
                                    checkpoint=self.checkpoint)
        self.named_fetcher = md.NamedFetcher(self.fetcher)   # what both TUF updaters fetch through

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
            self._seed_high_water()
            self._recovered = True
        self._flush_outbox()
        state = self.store.read_state()
        try:
            director = self._director_target()
        except MetadataRefused as exc:
            return self._director_failed(state, str(exc))
        if director is None:
            self._note_check(state)
            return {"outcome": "idle", "model": state.get("model"), "version": state.get("active_version")}
        custom = director.custom if isinstance(director.custom, dict) else {}
        if custom.get("device_id") != self.device_id:
            return self._director_failed(state, "metadata refused: director metadata is for another device "
                                                f"({str(custom.get('device'))[:64]!r})")
        model, version, target_path = _parse_assignment(custom)
        key = f"{model}/{version}"
        active = self.store.active()
        # NOTE: versions are ordered within a model; an assignment of another model (the device
        # was moved to a different model) is installed if it is above that model's high-water mark.
        if active and active.model == model and version <= active.version:
            self._note_check(state)
            if version == active.version:
                return {"outcome": "up-to-date", "model": model, "version": version}
            return self._refuse(state, model, version,
                                f"version {version} is not newer than the active version {active.version}")
        high = (state.get("high_water") or {}).get(model)
        if isinstance(high, int) and version <= high:
            self._note_check(state)
            return self._refuse(state, model, version,
                                f"refused: {model} v{version} is {'below' if version < high else 'not above'} the "
                                f"highest version this device has run (v{high}); roll back by publishing a new, "
                                "higher version")
        if key in (state.get("rejected") or {}):
            self._note_check(state)
            return {"outcome": "refused", "model": model, "version": version, "error": state["rejected"][key]}
        previous = state.get("pending") or {}
        same = previous.get("target_path") == target_path
        state["pending"] = {"model": model, "version": version, "target_path": target_path,
                            "rollout_id": custom.get("rollout_id"), "stage": "downloading",
                            "since": previous.get("since") if same else now_iso(),
                            "check_attempts": int(previous.get("check_attempts") or 0) if same else 0}
        state["last_check"] = now_iso()
        self.store.write_state(state)
        self.checkpoint("state:pending")
        return self._update(model, version, target_path, director)

    def _seed_high_water(self) -> None:
        """The active slot's version is the floor of its model (for state folders from before
        ``high_water`` existed, and for a crash between the switch and the state write)."""
        active = self.store.active()
        if active is None:
            return
        state = self.store.read_state()
        high = dict(state.get("high_water") or {})
        if not isinstance(high.get(active.model), int) or high[active.model] < active.version:
            high[active.model] = active.version
            state["high_water"] = high
            self.store.write_state(state)

    def _director_failed(self, state: dict[str, Any], error: str) -> dict[str, Any]:
        """Director metadata refused: nothing is installed; reported once per distinct error."""
        self._note_check(state)
        if state.get("last_error") != error:
            self.log(f"update refused: {error}")
            state = self.store.read_state()
            state["last_error"] = error
            state["outbox"] = [*state.get("outbox", []), {"status": "failed", "error": error[:1000]}]
            self.store.write_state(state)
            self._flush_outbox(quiet=True)
        return {"outcome": "failed", "model": None, "version": None, "error": error}

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

    def _update(self, model: str, version: int, target_path: str, director: Any) -> dict[str, Any]:
        from tuf.api import exceptions as tuf_errors

        try:
            updater, info = self._verified_target(model, version, target_path, director)
            self.store.check_space(self.store.space_needed(target_path, info.length, info.custom))
            tar = self._download(updater, info, target_path)
        except ServerUnreachable:
            raise
        except MetadataRefused as exc:
            return self._fail(model, version, str(exc))
        except NoSpace as exc:
            self._final_tar(target_path).unlink(missing_ok=True)   # tuf's copy of the .part may have been cut
            return self._no_space(model, version, exc)
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
        try:
            return self._install(model, version, target_path, tar, info.hashes["sha256"])
        except NoSpace as exc:
            return self._no_space(model, version, exc)

    def _updater(self, *, director: bool = False) -> Any:
        from tuf.ngclient import Updater, UpdaterConfig

        self.store.ensure_layout()
        base = str(self.client.base_url).rstrip("/")
        if director:
            folder = self.store.root / "director"
            folder.mkdir(parents=True, exist_ok=True)
            updater = Updater(metadata_dir=str(folder), metadata_base_url=f"{base}/director/metadata/",
                              fetcher=self.named_fetcher,
                              config=UpdaterConfig(prefix_targets_with_hash=False, **md.DIRECTOR_LIMITS),
                              bootstrap=self._trusted_director_root(folder))
        else:
            updater = Updater(metadata_dir=str(self.store.tuf_dir), metadata_base_url=f"{base}/tuf/metadata/",
                              target_dir=str(self.store.download_dir), target_base_url=f"{base}/tuf/targets/",
                              fetcher=self.named_fetcher, config=UpdaterConfig(prefix_targets_with_hash=False),
                              bootstrap=self._trusted_root())
        if self.now is not None:
            # NOTE: python-tuf takes "now" once, when the trusted set is created, and checks every
            # expiry against it; tests of the freeze attack move it forward here.
            updater._trusted_set.reference_time = self.now()
        return updater

    def _director_target(self) -> Any:
        """Refresh the director metadata; its ``assignment`` target (a ``TargetFile``) or None."""
        self._trusted_root()   # NOTE: an unenrolled device hears about --root first, before any request
        updater = self._updater(director=True)
        md.refresh(updater, self.named_fetcher, self.client.base_url)
        self.checkpoint("director-refreshed")
        return updater.get_targetinfo(md.ASSIGNMENT)

    def _trusted_director_root(self, folder: Path) -> bytes:
        given = self.config.director_root
        if given is None and self.config.root is not None:
            given = Path(self.config.root).with_name("director-root.json")
        if given is not None and Path(given).is_file():
            return Path(given).read_bytes()
        found = md.stored_root(folder)
        if found is not None:
            return found
        if self.config.director_root is not None:
            raise EdgekilnError(f"{self.config.director_root}: trusted director root file not found")
        raise EdgekilnError(f"{self.store.root}: not enrolled with the director: give --director-root FILE "
                            "(the server's KEYS/director-root.json)")

    def _trusted_root(self) -> bytes:
        if self.config.root is not None:
            if not Path(self.config.root).is_file():
                raise EdgekilnError(f"{self.config.root}: trusted root file not found")
            return Path(self.config.root).read_bytes()
        found = md.stored_root(self.store.tuf_dir)
        if found is not None:
            return found
        raise EdgekilnError(f"{self.store.root}: device not enrolled: give the server's trusted root with --root FILE")

    def _verified_target(self, model: str, version: int, target_path: str, director: Any) -> tuple[Any, Any]:
        """Refresh the image metadata and return ``(updater, TargetFile)`` for the assigned target,
        which must be what the director's signed ``assignment`` says."""
        updater = self._updater()
        md.refresh(updater, self.named_fetcher, self.client.base_url)
        self.checkpoint("metadata-refreshed")
        info = updater.get_targetinfo(target_path)
        if info is None:
            raise MetadataRefused(f"metadata refused: target {target_path} is not in the signed targets metadata")
        custom = info.custom if isinstance(info.custom, dict) else {}
        for what, image, signed in (("length", info.length, director.length),
                                    ("sha256", info.hashes.get("sha256"), director.hashes.get("sha256")),
                                    ("model", custom.get("model"), model), ("version", custom.get("version"), version)):
            if image is None or image != signed:
                raise MetadataRefused(f"metadata refused: image and director metadata disagree about the {what} of "
                                      f"{target_path} ({str(image)[:70]} vs {str(signed)[:70]})")
        return updater, info

    def _download(self, updater: Any, info: Any, target_path: str) -> Path:
        final = self._final_tar(target_path)
        keep = {final.name, self.fetcher.partial_path(target_path).name}
        for stale in self.store.download_dir.iterdir():
            if stale.name not in keep:
                stale.unlink(missing_ok=True)   # a download of an assignment that was replaced
        self._transfer = {}
        if updater.find_cached_target(info, str(final)) is None:
            from edgekiln.fleet import delta

            if not self.config.delta or delta.try_delta(updater, info, self.store, self.fetcher, final, self.log,
                                                        transfer=self._transfer) is None:
                updater.download_target(info, str(final))
                self._transfer.update(kind="full", bytes=None)
            self.checkpoint("download-verified")
        self.fetcher.discard(target_path)
        self.checkpoint("partial-removed")
        return final

    def _final_tar(self, target_path: str) -> Path:
        return self.store.download_dir / (quote(target_path, safe="") + ".tar")

    def _install(self, model: str, version: int, target_path: str, tar: Path, sha256: str) -> dict[str, Any]:
        info_length = tar.stat().st_size
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
        except NoSpace:
            raise   # NOTE: not the bundle's fault: retried later, never rejected
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
                  **({"latency_ms": latency} if latency else {}), **self._transfer_report(info_length)}
        # NOTE: a model adapted on the device (fleet.adapt) keeps its version number, so only a
        # higher version gets here: the server's model supersedes the local adaptation.
        superseded = (state.get("adaptation") or {}).get("id")
        state.update(model=model, active_version=version, active_slot=slot, pending=None, last_error=None,
                     adaptation=None)
        high = dict(state.get("high_water") or {})
        high[model] = max(version, int(high.get(model) or 0))
        state["high_water"] = high
        state["history"] = [*state.get("history", []),
                            {"time": now_iso(), "model": model, "version": version, "status": "installed",
                             "max_abs_error": health.get("max_abs_error"), "latency_ms": latency,
                             **({"superseded_adaptation": superseded} if superseded else {})}]
        state["outbox"] = [*state.get("outbox", []), report]
        self.store.write_state(state)
        self.checkpoint("state:installed")
        tar.unlink(missing_ok=True)
        self.log(f"installed {model} v{version} into slot {slot}")
        self._flush_outbox(quiet=True)
        self.checkpoint("reported")
        return {"outcome": "installed", "model": model, "version": version, "slot": slot, "latency_ms": latency}

    def _transfer_report(self, length: int) -> dict[str, Any]:
        """The report's ``transfer`` (``{kind, bytes, fallback}``) for a bundle fetched by this process."""
        t = self._transfer
        if not t:
            return {}   # fetched before a restart: how is not known
        self._transfer = {}
        return {"transfer": {"kind": t.get("kind") or "full", "bytes": int(t.get("bytes") or length),
                             "fallback": t.get("fallback")}}

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

    def _no_space(self, model: str, version: int, exc: NoSpace) -> dict[str, Any]:
        """Not rejected: retried every cycle until space is freed, reported once per (model, version, free)."""
        error = str(exc)   # "no space left on the device (need N bytes, M free): where"
        if self.store.read_state().get("last_error") == error:
            return self._retry(model, version, error)   # reported already (same model, version and free bytes)
        return self._fail(model, version, error)

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
            except EdgekilnError as exc:
                # NOTE: a server from before on-device learning refuses adaptation reports (422);
                # they are information only, and resending one forever would block the queue.
                if state["outbox"][0].get("status") not in ("adapted", "adapt_rejected") or "HTTP 422" not in str(exc):
                    raise
                self.log(f"adaptation report dropped: {exc}")
            state["outbox"] = state["outbox"][1:]
            self.store.write_state(state)

    def _report_quietly(self, body: dict[str, Any]) -> None:
        # NOTE: "checking" is informative only; the final report is queued durably.
        with contextlib.suppress(EdgekilnError):
            self.api.report(body)

    # --- daemon -------------------------------------------------------------------------------
    def serve(self, interval_s: float, *, max_backoff_s: float = 300.0, cycles: int | None = None,
              sleep: Callable[[float], None] | None = None, **push: Any) -> None:
        """Check every ``interval_s`` (or on a push notice: ``fleet/agent_loop.run_daemon``, which
        takes ``channel=``, ``wake=``, ``push_poll_s=``, ...); back off exponentially (with jitter)
        up to ``max_backoff_s`` while the server is unreachable. A failed cycle never touches the
        active model."""
        from edgekiln.fleet.agent_loop import run_daemon

        run_daemon(self, interval_s=interval_s, max_backoff_s=max_backoff_s, cycles=cycles, sleep=sleep, **push)


def _parse_assignment(data: dict[str, Any]) -> tuple[str, int, str]:
    model, version, target = data.get("model"), data.get("version"), data.get("target_path")
    if not isinstance(model, str) or not MODEL_NAME.match(model):
        raise EdgekilnError(f"update server sent an invalid model name {model!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise EdgekilnError(f"update server sent an invalid version {version!r}")
    if target != f"{model}/{version}/bundle.tar":
        raise EdgekilnError(f"update server sent target path {target!r}, expected '{model}/{version}/bundle.tar'")
    return model, version, target


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
