"""The numpy learner: hand-written gradients against finite differences, optimizer steps against
a hand computation, frozen rows, determinism, and that it learns separable clusters; then the
streaming ``Runtime.learn`` / ``commit`` path on a bundle."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_save_npz, atomic_write_json
from edgekiln.runtime.bundle import LearnData, build_bundle, health_check
from edgekiln.runtime.engine import Runtime
from edgekiln.runtime.learner import (
    GateConfig,
    HeadLearner,
    LearnConfig,
    Optimizer,
    StreamConfig,
    loss_and_grads,
)
from edgekiln.runtime.replay import ReplayBuffer
from edgekiln.testing.streams import class_clusters
from edgekiln.testing.tiny import tiny_head_onnx

FAST = {"steps": 300, "lr": 1e-2}   # NOTE: the tiny model's features are ~10x MNIST's: 100 steps of 3e-3 underfit


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_head_onnx(tmp_path_factory.mktemp("learner") / "m.onnx")


def _layers(rng, dims, relu):
    return [(rng.standard_normal((o, i)), rng.standard_normal(o) * 0.1, r)
            for i, o, r in zip(dims[:-1], dims[1:], relu, strict=True)]


@pytest.mark.parametrize(("dims", "relu", "distill"), [((5, 4), (False,), 0.0), ((5, 6), (False,), 1.5),
                                                      ((5, 7, 6), (True, False), 0.7)],
                         ids=["ce", "ce+distill", "last-block+distill"])
def test_gradients_match_central_differences(dims, relu, distill):
    rng = np.random.default_rng(11)
    layers = _layers(rng, dims, relu)
    feats, labels = rng.standard_normal((9, dims[0])), rng.integers(0, dims[-1], 9)
    teacher = rng.standard_normal((9, 4)) * 2   # the deployed model had 4 classes
    kw = {"distill": distill, "temperature": 2.0}
    _, grads = loss_and_grads(layers, feats, labels, teacher, **kw)
    eps, worst = 1e-6, 0.0
    for li, (w, b, _) in enumerate(layers):
        for which, arr in ((0, w), (1, b)):
            num = np.zeros_like(arr)
            for idx in np.ndindex(arr.shape):
                old = arr[idx]
                arr[idx] = old + eps
                up = loss_and_grads(layers, feats, labels, teacher, **kw)[0]
                arr[idx] = old - eps
                down = loss_and_grads(layers, feats, labels, teacher, **kw)[0]
                arr[idx] = old
                num[idx] = (up - down) / (2 * eps)
            rel = np.abs(grads[li][which] - num).max() / max(np.abs(num).max(), 1e-12)
            worst = max(worst, rel)
    assert worst <= 1e-5, f"worst relative gradient error {worst:.2e} > 1e-5 (seed 11)"


def test_sgd_and_adam_steps_match_a_hand_computation():
    g = np.array([0.5, -0.25])
    p = np.array([1.0, -2.0])
    sgd = Optimizer("sgd", 0.1, [p])
    sgd.step([p], [g])
    assert p.tolist() == [1.0 - 0.1 * 0.5, -2.0 + 0.1 * 0.25]
    sgd.step([p], [g])   # momentum: v = 0.9 * g + g
    assert np.allclose(p, [0.95 - 0.1 * 1.9 * 0.5, -1.975 + 0.1 * 1.9 * 0.25], rtol=0, atol=1e-15)
    q = np.array([1.0, -2.0])
    adam = Optimizer("adam", 0.01, [q])
    adam.step([q], [g])   # the first bias-corrected step is lr * g / (|g| + eps)
    assert np.allclose(q, [1.0 - 0.01 * 0.5 / (0.5 + 1e-8), -2.0 + 0.01 * 0.25 / (0.25 + 1e-8)], rtol=0, atol=1e-15)
    adam.step([q], [2 * g])
    m, v = 0.9 * 0.1 * g + 0.1 * 2 * g, 0.999 * 0.001 * g * g + 0.001 * 4 * g * g
    step2 = 0.01 * (m / (1 - 0.81)) / (np.sqrt(v / (1 - 0.999**2)) + 1e-8)
    assert np.allclose(q, np.array([1.0 - 0.01 * 0.5 / (0.5 + 1e-8), -2.0 + 0.01 * 0.25 / (0.25 + 1e-8)]) - step2,
                       rtol=0, atol=1e-15)


def _replay(learner, seed=11, n=40):
    xo, yo = class_clusters(n, seed=seed)
    buf = ReplayBuffer(1 << 18, learner.spec.feature_dim)
    buf.add(learner.features(xo)[0], yo)
    learner.replay = buf
    return buf


def test_freeze_old_keeps_old_rows_bit_identical(model):
    learner = HeadLearner(model, LearnConfig(freeze_old=True, steps=20))
    w0 = learner.params()
    _replay(learner)
    x, y = class_clusters(6, classes=(8, 9), seed=5)
    learner.fit(x, y)
    w1 = learner.params()
    assert np.array_equal(w1["w2"][:8], w0["w2"]) and np.array_equal(w1["b2"][:8], w0["b2"])
    assert w1["w2"].shape == (10, 24) and not np.array_equal(w1["w2"][8:], np.zeros((2, 24)))


def test_learns_separable_clusters_and_keeps_the_old_ones(model):
    seed = 0
    learner = HeadLearner(model, LearnConfig(scope="last-block", seed=seed, **FAST))
    _replay(learner)
    x, y = class_clusters(10, classes=(8, 9), seed=5)
    xt, yt = class_clusters(30, classes=tuple(range(10)), seed=7)
    feats, deployed = learner.features(xt)
    assert np.abs(learner.logits(feats) - deployed).max() < 1e-4   # numpy tail == the file before training
    learner.fit(x, y)
    acc = float((learner.logits(feats).argmax(1) == yt).mean())
    assert acc >= 0.95, f"accuracy on 10 classes {acc:.3f} < 0.95 (seed {seed})"
    assert learner.state_bytes() > learner.replay.nbytes > 0
    assert learner.last_step["ms"] > 0 and learner.last_step["tracemalloc_peak_bytes"] > 0


def test_same_seed_same_params(model):
    outs = []
    for _ in range(2):
        learner = HeadLearner(model, LearnConfig(seed=3, steps=5), stream=StreamConfig(stream_steps=2, replay_batch=8))
        _replay(learner)
        x, y = class_clusters(3, classes=(7, 8), seed=9)
        for i in range(len(y)):
            learner.partial_fit(x[i:i + 1], y[i:i + 1])
        outs.append(learner.params())
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_configs_refuse_bad_values():
    with pytest.raises(EdgekilnError, match="optimizer"):
        LearnConfig(optimizer="rmsprop")
    with pytest.raises(EdgekilnError, match="scope"):
        LearnConfig(scope="all")
    with pytest.raises(EdgekilnError, match="holdout_share"):
        GateConfig(holdout_share=1.0)
    with pytest.raises(EdgekilnError, match="stream_steps"):
        StreamConfig(stream_steps=0)


@pytest.fixture(scope="module")
def learn_bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("rtlearn")
    run = d / "run"
    run.mkdir()
    tiny_head_onnx(run / "model.onnx", int8=True)
    atomic_save_npz(run / "eval.npz", **dict(zip("xy", class_clusters(30, seed=21), strict=True)))
    atomic_save_npz(d / "train.npz", **dict(zip("xy", class_clusters(60, seed=22), strict=True)))
    atomic_write_json(run / "report.json", {"artifact": "model.onnx", "metric": 0.9, "latency_ms": 0.1})
    build_bundle([run], d / "bundle", learn=LearnData(data=d / "train.npz", replay_bytes=1 << 16))
    return d


def test_runtime_learn_streams_then_commit_writes_a_gated_bundle(learn_bundle):
    rt = Runtime(learn_bundle / "bundle")
    x, y = class_clusters(16, classes=tuple(range(10)), seed=5)
    before = rt.infer(x[:1])
    order = np.random.default_rng(0).permutation(len(y))
    for i in order:
        out = rt.learn(x[i:i + 1], y[i:i + 1], config=LearnConfig(lr=1e-2), stream=StreamConfig(stream_steps=2))
    assert out["n_seen"] == 160 and out["classes"] == 10
    assert np.array_equal(rt.infer(x[:1]), before)   # inference keeps the deployed model until commit
    assert rt.stats()["learning"]["n_seen"] == 160
    res = rt.commit(learn_bundle / "adapted", gate=GateConfig(budget_old_drop=0.02))
    m = res.metrics
    assert res.accepted, res.reasons
    assert m["n_new"] == 8 and m["n_old"] == 8 * 25 + 32, m   # bundle holdout 25 per class + every 4th old sample
    assert m["new_after"] > m["new_before"] == 0.0
    assert health_check(res.out)["ok"] and Runtime(res.out).infer(x[:2]).shape == (2, 10)
    assert res.adaptation["classes_after"] == 10 and res.adaptation["gate"]["old_drop"] == m["old_drop"]
    written = Runtime(res.out).manifest.adaptation
    assert written["gate"] == res.adaptation["gate"] and written["id"] == res.adaptation["id"]


def test_bundle_learn_files_are_top_level_and_optional(learn_bundle):
    import json

    from edgekiln.runtime.manifest import Manifest

    data = json.loads((learn_bundle / "bundle" / "manifest.json").read_text())
    entry = data["learn"]["int8"]
    assert entry["storage"] == "int8" and entry["cut"] == "h1_DequantizeLinear_Output" and entry["classes"] == 8
    buf = ReplayBuffer.load(learn_bundle / "bundle" / entry["replay"])
    assert (buf.capacity_bytes, len(buf), buf.nbytes) == (65536, 480, 480 * 26)   # all 8 x 60 rows, int8 + label
    plain = {k: v for k, v in data.items() if k not in ("learn", "adaptation")}
    assert "learn" not in Manifest.from_dict(plain).to_dict()   # without it a manifest is as before
    assert Manifest.from_dict(data).learn == data["learn"]
    with pytest.raises(EdgekilnError, match="learn name variant"):
        Manifest.from_dict({**data, "learn": {"fp16": entry}})
