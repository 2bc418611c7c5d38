"""Delta updates: a bsdiff4 patch from the bundle tar a device runs to the tar of a new version.

A delta is an ordinary TUF target of the image repository, ``M/V/delta-from-B.bsdiff4``, signed
like the full bundle ``M/V/bundle.tar``; its ``custom["delta"]`` names the base (its version and
sha256) and the result (the full bundle's sha256 and length). The server makes one at publish
(:func:`make_delta`) only when it pays: the same graph (:func:`same_graph`), at most half of the
weights changed (:func:`worth_trying`, a numpy pre-check that spares the 40 s bsdiff of a full
federated round) and a patch at most half the bundle.

The agent (:func:`try_delta`) rebuilds the base tar from its active slot
(:func:`~edgekiln.fleet.bundle_tar.write_reproducible`; bundles are reproducible tars), checks it
against the sha256 sealed at install, downloads the delta through TUF (length and hash checked),
patches, and accepts the result only when its sha256 and length are those the director and the
image metadata signed for the full bundle. Any failure (no bsdiff4 on armv7l, a slot edited, a
slot adapted on the device, a corrupt delta, no room) returns None and the full bundle is
downloaded as before.

    >>> delta_path("digits", 3, 2)
    'digits/3/delta-from-2.bsdiff4'
    >>> parse_delta_path("digits/3/delta-from-2.bsdiff4")
    ('digits', 3, 2)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from edgekiln.errors import EdgekilnError

FORMAT = "bsdiff4"
# NOTE: bsdiff4 needs about 26x the bundle in RAM while diffing (250 MB for 9.5 MB, measured) and
# ~1 s per MB: larger bundles always ship whole
MAX_INPUT_BYTES = 32 * 1024**2
MAX_RATIO = 0.5                  # a patch above half the bundle is not worth a second target
MAX_CHANGED = 0.5                # share of differing 4-byte words above which bsdiff is not tried
DELTA_PATH = re.compile(r"^(?P<model>[a-z0-9][a-z0-9._-]{0,63})/(?P<version>[1-9][0-9]{0,9})/"
                        r"delta-from-(?P<base>[1-9][0-9]{0,9})\.bsdiff4$")
_MAGIC = b"BSDIFF40"


def delta_path(model: str, version: int, base_version: int) -> str:
    """The target path of the delta that turns ``base_version``'s bundle into ``version``'s."""
    return f"{model}/{version}/delta-from-{base_version}.bsdiff4"


def parse_delta_path(path: str) -> tuple[str, int, int] | None:
    m = DELTA_PATH.match(path)
    return (m["model"], int(m["version"]), int(m["base"])) if m else None


def sha256_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, length) of a file, read in 1 MiB chunks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


# --- server: when is a delta worth making ----------------------------------------------------
def _members(tar_path: Path) -> dict[str, tuple[int, int]]:
    """Regular files of a tar: name -> (offset of the data, size)."""
    with tarfile.open(tar_path, mode="r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def changed_share(base: Path, new: Path) -> float:
    """The share of ``new``'s file bytes (as 4-byte words) that differ from ``base``: members are
    compared by name, so a shifted offset costs nothing; a member missing or resized counts whole.
    O(n) with numpy, a few ms for 10 MB."""
    old_m, new_m = _members(base), _members(new)
    a = np.memmap(base, dtype=np.uint8, mode="r") if base.stat().st_size else np.zeros(0, np.uint8)
    b = np.memmap(new, dtype=np.uint8, mode="r") if new.stat().st_size else np.zeros(0, np.uint8)
    total = changed = 0
    for name, (off, size) in new_m.items():
        words = (size + 3) // 4
        total += words
        other = old_m.get(name)
        if other is None or other[1] != size:
            changed += words
            continue
        x, y = a[other[0]:other[0] + size], b[off:off + size]
        n4 = size // 4 * 4
        changed += int(np.count_nonzero(x[:n4].view(np.uint32) != y[:n4].view(np.uint32)))
        changed += int(size > n4 and not np.array_equal(x[n4:], y[n4:]))
    return changed / total if total else 0.0


def worth_trying(base: Path, new: Path, *, max_changed: float = MAX_CHANGED) -> bool:
    """False when more than ``max_changed`` of the weights moved (a full FedAvg round: bsdiff would
    spend ~40 s on a 10 MB bundle to save 5%)."""
    return changed_share(base, new) <= max_changed


def _graph_signature(data: bytes) -> Any:
    import onnx

    model = onnx.load_from_string(data)
    g = model.graph

    def attr(a: Any) -> Any:
        if a.type == onnx.AttributeProto.TENSOR:
            return a.name, a.t.data_type, tuple(a.t.dims)   # NOTE: a Constant's values are weights
        return a.name, a.SerializeToString()

    return (sorted((o.domain, o.version) for o in model.opset_import),
            [(n.op_type, n.domain, tuple(n.input), tuple(n.output), tuple(attr(a) for a in n.attribute))
             for n in g.node],
            [(v.name, v.type.SerializeToString()) for v in g.input],
            [(v.name, v.type.SerializeToString()) for v in g.output],
            [(t.name, t.data_type, tuple(t.dims)) for t in g.initializer])


def same_graph(base_tar: Path, new_tar: Path) -> bool:
    """The same variants and, for each, the same ONNX nodes, inputs, outputs and initializer names,
    dtypes and dims (the weights' values are ignored). Parses ONNX: server side only."""
    try:
        sides = []
        for path in (base_tar, new_tar):
            with tarfile.open(path, mode="r:") as tar:
                manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
                variants = sorted((str(v["name"]), str(v["file"])) for v in manifest["variants"])
                graphs = [_graph_signature(tar.extractfile(file).read())  # type: ignore[union-attr]
                          for _, file in variants]
            sides.append((variants, graphs))
    except Exception:  # noqa: BLE001 - a bundle we cannot parse is simply not diffed
        return False
    return sides[0] == sides[1]


def explain_delta(base: Path, new: Path, *, max_bytes: int = MAX_INPUT_BYTES,
                  max_ratio: float = MAX_RATIO) -> tuple[bytes | None, str]:
    """(patch, "") or (None, why not)."""
    try:
        import bsdiff4
    except ImportError:
        return None, "bsdiff4 is not installed"
    sizes = base.stat().st_size, new.stat().st_size
    if max(sizes) > max_bytes:
        return None, f"bundle larger than {max_bytes} bytes"
    share = changed_share(base, new)
    if share > MAX_CHANGED:
        return None, f"{share:.0%} of the bytes changed"
    if not same_graph(base, new):
        return None, "a different graph"
    patch = bsdiff4.diff(base.read_bytes(), new.read_bytes())
    if len(patch) > max_ratio * sizes[1]:
        return None, f"the patch is {len(patch) / sizes[1]:.2f}x the bundle"
    return patch, ""


def make_delta(base: Path, new: Path, *, max_bytes: int = MAX_INPUT_BYTES, max_ratio: float = MAX_RATIO) -> bytes | None:
    """The bsdiff4 patch from tar ``base`` to tar ``new``, or None when it does not pay (see
    :func:`explain_delta`). Releases the GIL while diffing: run it in a worker thread."""
    return explain_delta(base, new, max_bytes=max_bytes, max_ratio=max_ratio)[0]


def delta_custom(model: str, version: int, base_version: int, base_sha256: str, result_sha256: str,
                 result_length: int) -> dict[str, Any]:
    """The signed ``custom`` of a delta target."""
    return {"model": model, "version": version,
            "delta": {"format": FORMAT, "base_version": base_version, "base_sha256": base_sha256,
                      "result_sha256": result_sha256, "result_length": result_length}}


# --- agent -----------------------------------------------------------------------------------
def _patch_length(path: Path) -> int | None:
    """The result length a bsdiff4 patch declares in its header (None: not a bsdiff4 patch)."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if len(head) < 32 or head[:8] != _MAGIC:
        return None
    raw = int.from_bytes(head[24:32], "little")
    return -(raw & ~(1 << 63)) if raw >> 63 else raw


def try_delta(updater: Any, info: Any, store: Any, fetcher: Any, final: Path, log: Callable[[str], None], *,
              transfer: dict[str, Any] | None = None) -> Path | None:
    """Build the verified full bundle at ``final`` from the active slot and a signed delta; None
    (nothing left behind) means "download the full bundle". ``info`` is the full bundle's verified
    ``TargetFile``; ``store`` the :class:`~edgekiln.fleet.slots.SlotStore`; ``fetcher`` the
    :class:`~edgekiln.fleet.fetcher.TokenFetcher`. ``transfer``, when given, is filled with
    ``{"kind": "delta"|"full", "bytes": delta bytes or None, "fallback": reason or None}``."""
    note = transfer if transfer is not None else {}
    note.update(kind="full", bytes=None, fallback=None)
    custom = info.custom if isinstance(info.custom, dict) else {}
    model, version = custom.get("model"), custom.get("version")
    active = store.active()
    if active is None or active.model != model or not isinstance(version, int) or active.version >= version:
        return None

    def skip(reason: str, detail: str) -> None:
        log(f"delta skipped: {reason} ({detail}); downloading the full bundle")
        note["fallback"] = reason

    if getattr(active, "adaptation", None):
        # NOTE: the slot's files were rewritten on the device (edgekiln learn): they can never
        # rebuild the signed base, so not even the delta's metadata is fetched.
        skip("adapted", "active slot was adapted on the device")
        return None
    dpath = delta_path(str(model), version, active.version)
    dinfo = updater.get_targetinfo(dpath)
    if dinfo is None:
        return None

    try:
        import bsdiff4
    except ImportError:
        skip("bsdiff4 missing", "pip install bsdiff4; no wheel for armv7l")
        return None
    meta = (dinfo.custom or {}).get("delta") if isinstance(dinfo.custom, dict) else None
    expect = {"format": FORMAT, "base_version": active.version, "base_sha256": active.sha256,
              "result_sha256": info.hashes.get("sha256"), "result_length": info.length}
    bad = [k for k, v in expect.items() if not isinstance(meta, dict) or meta.get(k) != v]
    if bad:
        skip("delta metadata mismatch", f"{', '.join(bad)} differ from the active slot and the signed bundle")
        return None
    quoted = quote(dpath, safe="")
    base_tmp = store.download_dir / (quoted + ".base")
    delta_file = store.download_dir / (quoted + ".bsdiff4")
    result_tmp = final.with_name(final.name + ".patched")
    try:
        from edgekiln.fleet.bundle_tar import write_reproducible
        from edgekiln.fleet.slots import SPACE_MARGIN, NoSpace

        try:
            store.check_space(active_bytes(active.path) + 2 * dinfo.length + info.length + SPACE_MARGIN)
        except NoSpace as exc:
            skip("no space", str(exc))
            return None
        store.download_dir.mkdir(parents=True, exist_ok=True)
        try:
            write_reproducible(active.path, base_tmp)
        except EdgekilnError as exc:   # no manifest.json, a symlink: not the sealed bundle any more
            skip("base changed", str(exc)[:200])
            return None
        if sha256_file(base_tmp)[0] != active.sha256:
            skip("base changed", f"the files of slot {active.name} no longer rebuild the sealed bundle")
            return None
        return _fetch_and_patch(updater, dinfo, info, fetcher, dpath, base_tmp, delta_file, result_tmp, final,
                                bsdiff4, skip, note)
    except OSError as exc:
        skip("io error", f"{type(exc).__name__}: {exc}")
        return None
    finally:
        for path in (base_tmp, delta_file, result_tmp):
            path.unlink(missing_ok=True)
        fetcher.discard(dpath)


def _fetch_and_patch(updater: Any, dinfo: Any, info: Any, fetcher: Any, dpath: str, base_tmp: Path,
                     delta_file: Path, result_tmp: Path, final: Path, bsdiff4: Any,
                     skip: Callable[[str, str], None], note: dict[str, Any]) -> Path | None:
    from tuf.api import exceptions as tuf_errors

    from edgekiln.fleet.slots import NoSpace

    try:
        updater.download_target(dinfo, str(delta_file))
    except tuf_errors.LengthOrHashMismatchError as exc:
        skip("delta corrupt", str(exc)[:200])
        return None
    except (tuf_errors.DownloadError, tuf_errors.RepositoryError, NoSpace) as exc:
        skip("delta download failed", str(exc)[:200])
        return None
    declared = _patch_length(delta_file)
    if declared != info.length:
        skip("delta result mismatch", f"the patch declares {declared} bytes, the signed bundle has {info.length}")
        return None
    try:
        bsdiff4.file_patch(str(base_tmp), str(result_tmp), str(delta_file))
    except (ValueError, RuntimeError, MemoryError) as exc:
        skip("delta result mismatch", f"the patch does not apply: {exc}")
        return None
    digest, length = sha256_file(result_tmp)
    if (digest, length) != (info.hashes.get("sha256"), info.length):
        skip("delta result mismatch", f"patched bundle has sha256 {digest[:16]}... and {length} bytes, not the "
                                      "signed ones")
        return None
    with open(result_tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(result_tmp, final)
    note.update(kind="delta", bytes=dinfo.length)
    return final


def active_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (the size of the rebuilt base tar, give or take headers)."""
    return sum(p.stat().st_size + 1024 for p in folder.rglob("*") if p.is_file())
