"""The A/B slot store: safe unpack, fsync before seal, atomic switch, recovery from crashes."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.fleet import slots as slots_mod
from edgekiln.fleet.agent_testing import bundle_tar
from edgekiln.fleet.slot_health import health_check_slot
from edgekiln.fleet.slots import NoSpace, SlotStore
from edgekiln.runtime.engine import Runtime


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundles")
    return {"good": bundle_tar(folder, version=1), "v2": bundle_tar(folder, version=2, seed=1),
            "broken": bundle_tar(folder, version=3, seed=2, broken=True)}


def _install(store: SlotStore, tar, version: int) -> str:
    slot = store.inactive_name()
    store.unpack(tar, slot)
    store.seal(slot, model="digits", version=version, target_path=f"digits/{version}/bundle.tar", sha256="x" * 64)
    store.switch(slot)
    return slot


def _tar_with(tmp_path, add) -> str:
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        add(tar)
    return path


def _file(tar, name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sparse(tar):
    """10 KiB of tar that declares a 101,000,000-byte file of holes (PAX ``GNU.sparse`` 0.1)."""
    info = tarfile.TarInfo("models/holes.bin")
    info.size = 10
    info.pax_headers = {"GNU.sparse.size": "101000000", "GNU.sparse.map": "0,5,100999995,5",
                        "GNU.sparse.name": "models/holes.bin"}
    tar.addfile(info, io.BytesIO(b"x" * 10))


def _link(tar, name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


@pytest.mark.parametrize("add,message", [
    (lambda t: _file(t, "/etc/evil"), "not a plain relative path"),
    (lambda t: _file(t, "../evil"), "not a plain relative path"),
    (lambda t: _file(t, "models/../../evil"), "not a plain relative path"),
    (lambda t: _link(t, "models", "/etc"), "is a link"),
    (lambda t: _link(t, "inside", "manifest.json", tarfile.LNKTYPE), "is a link"),
    (lambda t: (_file(t, "a"), _file(t, "./a")), "appears twice"),
    (_sparse, "'models/holes.bin' is a sparse file"),
])
def test_unpack_refuses_unsafe_members_and_leaves_nothing_active(tmp_path, add, message):
    store = SlotStore(tmp_path / "state")
    store.recover()
    with pytest.raises(EdgekilnError, match=message):
        store.unpack(_tar_with(tmp_path, add), "a")
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()
    assert store.sealed("a") is None and store.active() is None
    written = sum(p.stat().st_size for p in store.slots_dir.rglob("*") if p.is_file())
    assert written == 0, f"{written} bytes were extracted from a refused bundle"


def test_unpack_fsyncs_every_file_and_folder_before_the_seal(tmp_path, tars, monkeypatch):
    store = SlotStore(tmp_path / "state")
    store.recover()
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(slots_mod.os, "fsync", recording_fsync)
    dest = store.unpack(tars["good"], "a")
    files = [str(p) for p in dest.rglob("*") if p.is_file()]
    folders = [str(dest), str(dest / "models"), str(store.slots_dir)]
    missing = [p for p in files + folders if p not in synced]
    assert not missing, f"not fsynced before sealing: {missing}"
    assert store.sealed("a") is None, "unpack alone must not seal the slot"


def test_switch_is_a_symlink_rename_and_refuses_an_unsealed_slot(tmp_path, tars):
    store = SlotStore(tmp_path / "state")
    store.recover()
    assert _install(store, tars["good"], 1) == "a"
    assert os.readlink(store.root / "active") == "slots/a"
    store.unpack(tars["v2"], "b")
    with pytest.raises(EdgekilnError, match="not sealed"):
        store.switch("b")
    assert store.active().version == 1
    store.seal("b", model="digits", version=2, target_path="digits/2/bundle.tar", sha256="y" * 64)
    store.switch("b")
    assert os.readlink(store.root / "active") == "slots/b" and store.active().version == 2
    assert not list(store.root.glob(".active.new.*")), "temporary symlink left behind"
    with pytest.raises(EdgekilnError, match="it is the active slot"):
        store.clear_slot("b")


def test_recover_removes_half_written_slot_and_stale_temp_symlink(tmp_path, tars):
    store = SlotStore(tmp_path / "state")
    store.recover()
    _install(store, tars["good"], 1)
    store.unpack(tars["v2"], "b")                     # crash before the seal
    os.symlink("slots/b", store.root / ".active.new.999")  # crash between symlink() and rename()
    notes = store.recover()
    assert any("half-written slot b" in n for n in notes) and any("stale temporary symlink" in n for n in notes)
    assert not store.slot_path("b").exists() and not (store.root / ".active.new.999").exists()
    assert store.active().version == 1 and health_check_slot(store.active().path, latency_runs=1)["ok"]
    assert store.recover() == [], "a second recovery must find nothing to repair"


def test_recover_completes_an_update_that_crashed_after_the_switch(tmp_path, tars):
    store = SlotStore(tmp_path / "state")
    store.recover()
    _install(store, tars["good"], 1)
    store.write_state({**store.read_state(), "model": "digits", "active_version": 1, "active_slot": "a",
                       "pending": {"model": "digits", "version": 2, "target_path": "digits/2/bundle.tar"}})
    _install(store, tars["v2"], 2)                    # switched; the crash came before state.json
    notes = store.recover()
    state = store.read_state()
    assert any("switched before the crash" in n for n in notes), notes
    assert (state["active_version"], state["active_slot"], state["pending"]) == (2, "b", None)
    assert state["outbox"] == [{"model": "digits", "version": 2, "status": "installed"}]


def test_state_json_is_written_atomically_and_reread(tmp_path):
    store = SlotStore(tmp_path / "state")
    store.recover()
    store.write_state({**store.read_state(), "last_error": "x", "history": [{"n": i} for i in range(80)]})
    data = json.loads((store.root / "state.json").read_text())
    assert data["last_error"] == "x" and len(data["history"]) == slots_mod.HISTORY_KEEP
    assert not list(store.root.glob(".state.json.*")), "temporary file left behind"


def test_health_check_passes_a_good_slot_with_latency_and_fails_a_broken_one(tmp_path, tars):
    store = SlotStore(tmp_path / "state")
    store.recover()
    good = store.unpack(tars["good"], "a")
    result = health_check_slot(good, latency_runs=5)
    assert result["ok"] and result["max_abs_error"] <= 1e-3, result
    assert result["latency_ms"]["p50"] > 0 and result["latency_ms"]["p95"] >= result["latency_ms"]["p50"]
    broken = store.unpack(tars["broken"], "b")
    bad = health_check_slot(broken)
    assert not bad["ok"] and "health check failed" in bad["error"], bad
    y = Runtime(good).infer(np.zeros((1, 1, 8, 8), np.float32))
    assert y.shape == (1, 10)


def test_only_one_agent_at_a_time_may_use_a_state_folder(tmp_path):
    first, second = SlotStore(tmp_path / "state"), SlotStore(tmp_path / "state")
    with first.lock(), pytest.raises(EdgekilnError, match="another agent is running"), second.lock():
        pass
    with second.lock():   # released when the first cycle ended
        pass


def test_recover_removes_temporary_files_of_interrupted_atomic_writes(tmp_path):
    store = SlotStore(tmp_path / "state")
    store.recover()
    (store.root / ".state.json.abc123.tmp").write_text("{half")
    (store.slots_dir / ".a.json.xyz.tmp").write_text("{half")
    (store.tuf_dir / "tmpk2j4h1").write_text("{half")           # python-tuf's temporary metadata file
    notes = store.recover()
    assert len([n for n in notes if n.startswith("removed leftover")]) == 3, notes
    assert not list(store.tuf_dir.iterdir())
    assert not list(store.root.glob(".state.json.*")) and not list(store.slots_dir.glob(".*"))


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_space_needed_counts_download_copy_and_unpack_minus_what_is_on_disk(tmp_path, tars):
    store = SlotStore(tmp_path / "state")
    store.recover()
    margin, target = slots_mod.SPACE_MARGIN, "digits/2/bundle.tar"
    # nothing on disk: the .part grows to 10,000, tuf copies it (10,000), then 30,000 are unpacked
    # after the .part is gone: peak max(20,000, 10,000 + 30,000)
    assert store.space_needed(target, 10_000, {"unpacked_bytes": 30_000}) == 40_000 + margin
    assert store.space_needed(target, 10_000, {}) == 20_000 + margin, "no unpacked_bytes: the length stands in"
    (store.download_dir / "digits%2F2%2Fbundle.tar.part").write_bytes(b"x" * 4_000)
    assert store.space_needed(target, 10_000, {"unpacked_bytes": 30_000}) == 36_000 + margin
    (store.download_dir / "digits%2F2%2Fbundle.tar.tar").write_bytes(b"x" * 10_000)   # the agent's verified copy
    assert store.space_needed(target, 10_000, {"unpacked_bytes": 30_000}) == 26_000 + margin
    _install(store, tars["good"], 1)
    store.unpack(tars["v2"], "b")          # the inactive slot's blocks are freed by the next unpack
    freed = sum(p.stat().st_blocks * 512 for p in store.slot_path("b").rglob("*") if p.is_file())
    assert store.space_needed(target, 10_000, {"unpacked_bytes": 30_000}) == max(0, 26_000 - freed) + margin


def test_check_space_refuses_more_than_the_free_bytes_and_says_how_much(tmp_path):
    store = SlotStore(tmp_path / "state")
    store.recover()
    store.check_space(1 << 20)
    with pytest.raises(NoSpace, match=r"need 1125899906842624 bytes, \d+ free") as err:
        store.check_space(1 << 50)
    assert err.value.needed == 1 << 50 and 0 <= err.value.free < 1 << 50, (err.value.needed, err.value.free)


def test_state_json_is_written_on_a_full_disk_by_giving_up_the_reserve(tmp_path, monkeypatch):
    store = SlotStore(tmp_path / "state")
    store.recover()
    reserve = store.root / slots_mod.RESERVE_FILE
    assert reserve.stat().st_blocks * 512 >= slots_mod.RESERVE_BYTES, "the reserve must be allocated, not sparse"
    real, calls = slots_mod.atomic_write_json, []

    def full_once(path, obj):
        calls.append(reserve.exists())
        if len(calls) == 1:
            _enospc()
        return real(path, obj)

    monkeypatch.setattr(slots_mod, "atomic_write_json", full_once)
    store.write_state({**store.read_state(), "last_error": "no space"})
    assert calls == [True, False], "the second write must come after the reserve was deleted"
    assert store.read_state()["last_error"] == "no space"
    assert reserve.stat().st_size == slots_mod.RESERVE_BYTES, "the reserve is taken back once there is room"
    monkeypatch.setattr(slots_mod, "atomic_write_json", _enospc)
    with pytest.raises(NoSpace, match="state.json could not be written"):
        store.write_state(store.read_state())
    with pytest.raises(OSError, match="No space"):      # no reserve left to give: the error stands
        store.write_state(store.read_state())


def test_a_full_disk_while_unpacking_clears_the_slot_and_keeps_the_active_one(tmp_path, tars, monkeypatch):
    store = SlotStore(tmp_path / "state")
    store.recover()
    _install(store, tars["good"], 1)
    real = slots_mod.shutil.copyfileobj

    def half_then_full(src, out, length=0):
        out.write(src.read(100))
        out.flush()
        _enospc()

    monkeypatch.setattr(slots_mod.shutil, "copyfileobj", half_then_full)
    with pytest.raises(NoSpace, match="while unpacking into slot b; the slot was cleared") as err:
        store.unpack(tars["v2"], "b")
    monkeypatch.setattr(slots_mod.shutil, "copyfileobj", real)
    assert err.value.needed > 0
    assert not store.slot_path("b").exists() and store.sealed("b") is None
    assert store.active().version == 1 and health_check_slot(store.active().path, latency_runs=1)["ok"]
