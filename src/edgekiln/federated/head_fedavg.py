"""Federated averaging over classifier heads only: devices train their head in numpy (no torch) and
upload the change of the head tensors, never data or features; the server averages them into the
next version's head.

Three steps, one function each:

- :func:`head_client_train` (device side, torch-free): the bundle's default variant, its replay
  buffer if the bundle has one, :class:`~edgekiln.runtime.learner.HeadLearner` on the device's
  samples; returns the head *deltas* keyed by the ONNX initializer names, float32 or int8
  (``compression.encode_update``: ``name`` int8 + ``name::scale``).
- :func:`fedavg_heads` (server side): the sample-weighted mean of the clients' heads, in float64.
- :func:`apply_heads`: the averaged head written into a copy of the run folder (``model.onnx``
  through ``write_params``; ``model.pt``'s last Linear layers too, when the folder has one, so
  ``optimize`` can fine-tune or quantize-aware-train it); ``loop.close_loop`` then ships it.

``edgekiln federate --scope head`` runs the same in Flower: :func:`head_start` is the first global
head (the bundle's, grown by the new classes), ``client_app.train_head`` calls
:func:`head_local_train` on each node, ``server_app.run_server_head`` evaluates with
:func:`head_evaluator`, and :func:`write_head_run` writes the run folder.

A grown head (new classes) has more rows than the base; the reference of a delta is the base
padded with zeros (:func:`grown_reference`), so ``reference + mean(delta)`` is the mean of the
clients' heads whatever their size. Uplink for a 10 x 128 head: 1,290 float32 = 5,160 bytes, or
1,290 int8 + 11 scales = 1,334 bytes (the whole MNIST CNN: 394 KB).

>>> import numpy as np
>>> a = {"w": np.array([[1.0, 2.0]], np.float32)}
>>> b = {"w": np.array([[3.0, 6.0]], np.float32)}
>>> fedavg_heads([a, b], [1, 3])["w"].tolist()
[[2.5, 5.0]]
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.federated.compression import SCALE_SUFFIX, decode_update, encode_update

HEAD_COMPRESSIONS = ("none", "int8")


def fedavg_heads(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``sum_i w_i * u_i / sum_i w_i`` per tensor, accumulated in float64 in client order.

    ``updates`` are whole heads or deltas (the mean of deltas is the delta of the mean); every
    client must send the same tensor names and shapes. ``weights`` are sample counts (FedAvg).
    """
    if not updates or len(updates) != len(weights):
        raise EdgekilnError(f"fedavg_heads: {len(updates)} updates for {len(weights)} weights")
    w = np.asarray(weights, np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise EdgekilnError(f"fedavg_heads: weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    names = list(updates[0])
    out: dict[str, np.ndarray] = {}
    for name in names:
        shapes = {np.shape(u[name]) if name in u else None for u in updates}
        if len(shapes) != 1 or None in shapes:
            raise EdgekilnError(f"fedavg_heads: tensor {name!r} is missing or differs in shape across clients "
                                f"({sorted(map(str, shapes))})")
        acc = np.zeros(np.shape(updates[0][name]), np.float64)
        for wi, u in zip(w, updates, strict=True):
            acc += wi * np.asarray(u[name], np.float64)
        out[name] = acc / w.sum()
    if any(set(u) != set(names) for u in updates):
        raise EdgekilnError("fedavg_heads: clients sent different tensor names")
    return out


def grown_reference(base: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """``base`` zero-padded at the end of every axis up to ``shapes`` (rows of new classes start at 0)."""
    out = {}
    for name, shape in shapes.items():
        b = np.asarray(base[name], np.float32)
        if b.ndim != len(shape) or any(s < t for s, t in zip(shape, b.shape, strict=True)):
            raise EdgekilnError(f"head tensor {name!r}: cannot grow {b.shape} to {tuple(shape)}")
        out[name] = np.pad(b, [(0, s - t) for s, t in zip(shape, b.shape, strict=True)])
    return out


def encode_head(local: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], *, compress: str = "none",
                granularity: str = "channel") -> dict[str, np.ndarray]:
    """The uplink payload: ``local - grown_reference(base)`` as float32, or int8 with scales."""
    if compress not in HEAD_COMPRESSIONS:
        raise EdgekilnError(f"head compression {compress!r}: known {', '.join(HEAD_COMPRESSIONS)}")
    local = {k: np.asarray(v, np.float32) for k, v in local.items()}
    reference = grown_reference(base, {k: v.shape for k, v in local.items()})
    if compress == "int8":
        return encode_update(local, reference, granularity)
    return {k: v - reference[k] for k, v in local.items()}


def decode_head(payload: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A client's head rebuilt from :func:`encode_head`'s payload (float32)."""
    shapes = {k: np.shape(v) for k, v in payload.items() if not k.endswith(SCALE_SUFFIX)}
    reference = grown_reference(base, shapes)
    if any(k.endswith(SCALE_SUFFIX) for k in payload):
        return decode_update(payload, reference)
    return {k: (reference[k] + np.asarray(payload[k], np.float32)).astype(np.float32) for k in reference}


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    """Bytes of tensor data one client uploads (what the uplink carries beyond framing)."""
    return int(sum(np.asarray(v).nbytes for v in payload.values()))


def bundle_model(bundle_dir: Path) -> tuple[Path, Path | None]:
    """``(the default variant's model file, its replay buffer file or None)`` of a bundle."""
    from edgekiln.runtime.manifest import load_manifest

    manifest = load_manifest(bundle_dir)
    variant = next(v for v in manifest.variants if v.name == manifest.default_variant)
    replay = bundle_dir / "learn" / variant.name / "replay.npz"
    return bundle_dir / variant.file, (replay if replay.is_file() else None)


def head_client_train(bundle_dir: str | Path, x: np.ndarray, y: np.ndarray, learn: Any, *, compress: str = "none",
                      granularity: str = "channel") -> dict[str, np.ndarray]:
    """Train the head of ``bundle_dir``'s default variant on ``(x, y)``; return the uplink payload.

    Torch-free (runtime only). The payload holds the head tensors' deltas and nothing else: no
    samples, features or replay rows leave the device.
    """
    from edgekiln.runtime.learner import HeadLearner
    from edgekiln.runtime.replay import ReplayBuffer

    model_path, replay_path = bundle_model(Path(bundle_dir))
    replay = ReplayBuffer.load(replay_path) if replay_path is not None else None
    learner = HeadLearner(model_path, learn, replay=replay, threads=1)
    base = {k: np.array(v, np.float32) for k, v in learner.params().items()}
    learner.fit(np.asarray(x, np.float32), np.asarray(y, np.int64))
    return encode_head(learner.params(), base, compress=compress, granularity=granularity)


def base_head(model_path: str | Path, *, scope: str = "head") -> dict[str, np.ndarray]:
    """The float32 head tensors of an ONNX file (dequantized for an int8 one)."""
    import onnx

    from edgekiln.runtime.head_split import find_tail, read_params

    proto = onnx.load(str(model_path))
    return read_params(proto, find_tail(proto, scope=scope))


def apply_heads(base_run: str | Path, params: Mapping[str, np.ndarray], out_run: str | Path, *,
                scope: str = "head", calib_features: np.ndarray | None = None) -> Path:
    """Copy the run folder ``base_run`` to ``out_run`` with its head replaced by ``params``.

    ``model.onnx`` is rewritten by ``write_params`` (an int8 head re-quantized; its activation
    QDQ recalibrated on ``calib_features``, by default the features of the run's ``calib.npz``).
    ``model.pt``, when present, gets the same tensors in its last Linear layers. Returns ``out_run``.
    """
    import onnx

    from edgekiln.fileio import atomic_write_bytes
    from edgekiln.runtime.head_split import find_tail, write_params

    base, out = Path(base_run), Path(out_run)
    if out.exists():
        raise EdgekilnError(f"{out}: already exists; choose a new folder")
    if not (base / "model.onnx").is_file():
        raise EdgekilnError(f"{base}: no model.onnx to put the averaged head into")
    proto = onnx.load(str(base / "model.onnx"))
    spec = find_tail(proto, scope=scope)
    if calib_features is None and spec.quantized:
        calib_features = _calib_features(base, scope)
    new = write_params(proto, spec, {k: np.asarray(v, np.float32) for k, v in params.items()},
                       calib_features=calib_features)
    shutil.copytree(base, out)
    atomic_write_bytes(out / "model.onnx", new.SerializeToString())
    if (base / "model.pt").is_file():
        _update_state_dict(out / "model.pt", spec, params)
    return out


def _calib_features(run: Path, scope: str) -> np.ndarray | None:
    from edgekiln.runtime.learner import HeadLearner, LearnConfig

    if not (run / "calib.npz").is_file():
        return None
    with np.load(run / "calib.npz") as f:
        x = np.asarray(f["x"], np.float32)
    return HeadLearner(run / "model.onnx", LearnConfig(scope=scope)).features(x)[0]


def _update_state_dict(pt_path: Path, spec: Any, params: Mapping[str, np.ndarray]) -> None:
    """Put the head's dense layers into the state dict's last 2-D ``*.weight`` tensors (torch layout)."""
    import io

    import torch

    from edgekiln.fileio import atomic_write_bytes

    state = torch.load(io.BytesIO(pt_path.read_bytes()), map_location="cpu", weights_only=True)
    linears = [k[: -len(".weight")] for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]
    if len(linears) < len(spec.layers):
        raise EdgekilnError(f"{pt_path}: {len(linears)} Linear layers, the head has {len(spec.layers)}")
    for prefix, dense in zip(linears[-len(spec.layers):], spec.layers, strict=True):
        # NOTE: read_params gives every weight as [out, in] whatever the file's layout: torch's layout.
        state[prefix + ".weight"] = torch.from_numpy(np.ascontiguousarray(params[dense.weight], np.float32))
        if prefix + ".bias" in state:
            state[prefix + ".bias"] = torch.from_numpy(np.asarray(params[dense.bias], np.float32).copy())
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(pt_path, buf.getvalue())


# ---- the Flower head mode (``edgekiln federate --scope head``) ---------------------------------------

def head_start(head: Any) -> tuple[Path, dict[str, np.ndarray]]:
    """``(the bundle's default model, its head grown by head.new_classes)``: the first global head.

    New classes must follow the model's (8 classes: 8, 9, ...); their rows start at zero.
    """
    import onnx

    from edgekiln.runtime.head_split import find_tail, read_params

    model, _ = bundle_model(Path(str(head.bundle)))
    proto = onnx.load(str(model))
    spec = find_tail(proto, scope=head.tail)
    new = head.classes()
    expected = tuple(range(spec.num_classes, spec.num_classes + len(new)))
    if tuple(sorted(new)) != expected:
        raise EdgekilnError(f"--new-classes {head.new_classes}: the model has {spec.num_classes} classes, "
                            f"expected {','.join(map(str, expected)) or 'none'}")
    params = read_params(proto, spec)
    last = spec.layers[-1]
    classes = spec.num_classes + len(new)
    shapes = {k: v.shape for k, v in params.items()}
    shapes[last.weight] = (classes, params[last.weight].shape[1])
    shapes[last.bias] = (classes,)
    return model, grown_reference(params, shapes)


def head_local_train(model: Path, head: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, learn: Any,
                     replay: Any = None) -> tuple[dict[str, np.ndarray], float]:
    """One device's round: the global ``head`` written into ``model``, trained on ``(x, y)`` (and
    ``replay``) with the numpy learner; returns the local head (same shapes) and the last loss."""
    import tempfile

    import onnx

    from edgekiln.runtime.head_split import find_tail, write_params
    from edgekiln.runtime.learner import HeadLearner

    proto = onnx.load(str(model))
    spec = find_tail(proto, scope=learn.scope)
    classes = int(np.shape(head[spec.layers[-1].bias])[0])
    y = np.asarray(y, np.int64)
    if len(y) and int(y.max()) >= classes:
        raise EdgekilnError(f"label {int(y.max())} on this device, but the federated head has {classes} classes "
                            "(add it to --new-classes)")
    calib = HeadLearner(model, learn).features(x)[0] if spec.quantized else None
    with tempfile.TemporaryDirectory(prefix="edgekiln-head-") as tmp:
        path = Path(tmp) / "global.onnx"
        path.write_bytes(write_params(proto, spec, dict(head), calib_features=calib).SerializeToString())
        learner = HeadLearner(path, learn, replay=replay)
        loss = learner.fit(np.asarray(x, np.float32), y)["loss"] if len(y) else float("nan")
        return learner.params(), float(loss)


def head_evaluator(model: Path, x: np.ndarray, y: np.ndarray, *,
                   scope: str = "head") -> Callable[[Mapping[str, np.ndarray]], tuple[float, float]]:
    """A function giving the top-1 accuracy and mean cross-entropy of ``model`` with a head written
    in (onnxruntime). ``model`` is read, and an int8 head's calibration features computed, once:
    the server evaluates every round's head on the same data."""
    import onnx

    from edgekiln.execution.ort import ort_session
    from edgekiln.runtime.head_split import find_tail, write_params
    from edgekiln.runtime.learner import HeadLearner, LearnConfig

    proto = onnx.load(str(model))
    spec = find_tail(proto, scope=scope)
    calib = HeadLearner(model, LearnConfig(scope=scope)).features(x[:256])[0] if spec.quantized else None

    def evaluate(head: Mapping[str, np.ndarray]) -> tuple[float, float]:
        sess = ort_session(write_params(proto, spec, dict(head), calib_features=calib).SerializeToString())
        name = sess.get_inputs()[0].name
        logits = np.concatenate([sess.run(None, {name: x[i:i + 256]})[0] for i in range(0, len(x), 256)])
        z = logits - logits.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        return float((logits.argmax(1) == y).mean()), float(-logp[np.arange(len(y)), y].mean())

    return evaluate


def write_head_run(out_dir: str | Path, result: Any, *, runtime: str, wall_seconds: float) -> dict[str, Any]:
    """The run folder of a head-mode run: ``settings.init`` with the averaged head put in
    (:func:`apply_heads`), its report.json gaining the rounds, traffic and the new accuracy."""
    import json

    from edgekiln.federated.report import traffic_totals
    from edgekiln.fileio import atomic_write_json

    s = result.settings
    if not s.init:
        raise EdgekilnError("--scope head needs --init: the run folder of the deployed model to put the head into")
    out = apply_heads(s.init, result.state_dict, out_dir, scope=s.head.tail)
    report = json.loads((out / "report.json").read_text())
    first, last = result.history[0], result.history[-1]
    report.update({"accuracy": last["accuracy"], "metric": last["accuracy"],
                   "federated": {"scope": "head", "runtime": runtime, "settings": s.to_dict(),
                                 "initial_accuracy": first["accuracy"], "rounds": result.history,
                                 "clients": result.clients, "traffic": traffic_totals(result.history),
                                 "wall_seconds": round(wall_seconds, 2), "server_seconds": result.seconds}})
    atomic_write_json(out / "report.json", report)
    return report


def federate_heads(settings: Any, out_dir: str | Path, *, cpus: int = 2, quiet: bool = False,
                   verbose: bool = False) -> dict[str, Any]:
    """``edgekiln federate --scope head``: simulate the head rounds, write the run folder; return its report."""
    from edgekiln.federated.simulation import simulate

    if settings.scope != "head":
        raise EdgekilnError("federate_heads needs settings with scope 'head'")
    result, seconds = simulate(settings, cpus=cpus, quiet=quiet, verbose=verbose)
    return write_head_run(out_dir, result, runtime="simulation", wall_seconds=seconds)
