"""What the `edgekiln learn` tests share: one tiny bundle with learning data (built once per test
process), device states made from it with the slot steps an install takes, the device samples,
and the CLI run in-process."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.fileio import atomic_save_npz, atomic_write_json
from edgekiln.fleet.slots import SlotStore

MODEL, VERSION = "tiny", 1
_BUILT: dict[str, Path] = {}


def run_learn(argv: Sequence[Any]) -> int:
    """``edgekiln ARGV...`` in-process; its exit code."""
    from cli_run import run_cli

    return run_cli(argv)


def tiny_bundle() -> Path:
    """A bundle of ``tiny_head_onnx`` (8 classes of ``class_clusters``) with ``learn/fp32/replay.npz``
    (64 KiB) and ``holdout.npz`` (25 per class); built once per process, never modified."""
    if "bundle" not in _BUILT:
        from edgekiln.runtime.bundle import LearnData, build_bundle
        from edgekiln.testing.streams import class_clusters
        from edgekiln.testing.tiny import tiny_head_onnx

        d = Path(tempfile.mkdtemp(prefix="edgekiln-learn-test-"))
        run = d / "run"
        run.mkdir()
        tiny_head_onnx(run / "model.onnx", classes=8, seed=0)
        atomic_save_npz(run / "eval.npz", **dict(zip("xy", class_clusters(30, seed=5), strict=True)))
        atomic_write_json(run / "report.json", {"artifact": "model.onnx", "metric": 0.95, "latency_ms": 0.1})
        atomic_save_npz(d / "train.npz", **dict(zip("xy", class_clusters(60, seed=6), strict=True)))
        build_bundle([run], d / "bundle", name=MODEL, version=str(VERSION),
                     learn=LearnData(data=d / "train.npz", replay_bytes=64 * 1024))
        _BUILT["bundle"] = d / "bundle"
    return _BUILT["bundle"]


def new_samples(path: Path, *, n: int = 12, seed: int = 100, classes: tuple[int, ...] = (8, 9)) -> Path:
    """``n`` device samples of each new class as the ``.npz`` ``edgekiln learn --data`` takes."""
    from edgekiln.testing.streams import class_clusters

    x, y = class_clusters(n, classes=classes, seed=seed)
    return atomic_save_npz(path, x=x, y=y)


def device_state(state: Path, bundle: Path | None = None) -> SlotStore:
    """A device state folder with ``bundle`` installed into slot a, by the steps an install takes:
    unpack the bundle's tar, seal it with the tar's sha256, switch, record it in state.json."""
    from edgekiln.fleet.client import tar_bundle

    store = SlotStore(state)
    store.ensure_layout()
    tar = tar_bundle(bundle or tiny_bundle(), store.root.parent / f"{store.root.name}.tar")
    store.unpack(tar, "a")
    store.seal("a", model=MODEL, version=VERSION, target_path=f"{MODEL}/{VERSION}/bundle.tar",
               sha256=hashlib.sha256(tar.read_bytes()).hexdigest())
    store.switch("a")
    store.write_state({**store.read_state(), "model": MODEL, "active_version": VERSION, "active_slot": "a"})
    tar.unlink()
    return store


def copy_state(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def infer_classes(bundle: Path) -> int:
    from edgekiln.runtime.engine import Runtime

    y = Runtime(bundle, warmup=0).infer(np.zeros((1, 1, 8, 8), np.float32))
    return int(y.shape[-1])
