"""Deployment bundles, the Runtime API and the switching policies."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import atomic_write_json
from edgekiln.runtime.bundle import build_bundle, health_check
from edgekiln.runtime.engine import Runtime
from edgekiln.runtime.manifest import load_manifest
from edgekiln.runtime.monitor import Monitor
from edgekiln.runtime.policies import CpuLoadPolicy, DeviceState, LatencyBudgetPolicy, PowerPolicy
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx


def _run_folder(path, *, accuracy, latency, seed=0):
    path.mkdir(parents=True)
    tiny_conv_onnx(path / "model.onnx", seed=seed)
    random_npz(path / "eval.npz", (1, 1, 8, 8), n=8, seed=3)
    atomic_write_json(path / "report.json", {"artifact": "model.onnx", "metric": accuracy, "latency_ms": latency,
                                             "metric_name": "accuracy"})
    return path


@pytest.fixture
def bundle(tmp_path):
    a = _run_folder(tmp_path / "big", accuracy=0.98, latency=2.0, seed=0)
    b = _run_folder(tmp_path / "small", accuracy=0.95, latency=0.5, seed=1)
    build_bundle([a, b], tmp_path / "bundle", name="digits", version="3")
    return tmp_path / "bundle"


def test_bundle_manifest_lists_variants_with_hashes_and_samples(bundle):
    m = load_manifest(bundle)
    assert (m.name, m.version, m.default_variant) == ("digits", "3", "fp32")
    assert [v.name for v in m.variants] == ["fp32", "fp32-1"]
    assert m.variants[0].metric == 0.98 and m.variants[0].latency_ms == {"onnxruntime": 2.0}
    assert m.inputs[0].name == "input" and m.sample_inputs == "samples.npz"
    assert health_check(bundle)["ok"]


@pytest.mark.parametrize("tamper,message", [
    (lambda b, m: (b / m["variants"][0]["file"]).write_bytes(b"junk"), "does not match its SHA-256"),
    (lambda b, m: m.update(schema_version=99), "schema_version 99 is not supported"),
    (lambda b, m: m.pop("variants"), "missing field 'variants'"),
    (lambda b, m: m["variants"][0].update(file="../../etc/passwd"), "is not inside the bundle"),
    (lambda b, m: m.update(default_variant="nope"), "has no variant 'nope'"),
])
def test_invalid_bundles_are_refused_with_the_reason(bundle, tamper, message):
    manifest = json.loads((bundle / "manifest.json").read_text())
    tamper(bundle, manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EdgekilnError) as err:
        load_manifest(bundle)
    assert message in str(err.value)


def test_runtime_infers_and_reports_stats(bundle):
    rt = Runtime(bundle)
    x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    for _ in range(5):
        y = rt.infer(x)
    assert y.shape == (1, 10)
    stats = rt.stats()
    assert stats["variants"]["fp32"]["count"] == 5 and stats["variants"]["fp32"]["p95_ms"] > 0
    with pytest.raises(EdgekilnError, match=r"input 'input' has shape \[1, 1, 9, 9\], the model expects"):
        rt.infer(np.zeros((1, 1, 9, 9), np.float32))


def test_runtime_imports_and_runs_without_torch(bundle):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from edgekiln.runtime.engine import Runtime\n"
        f"rt = Runtime({str(bundle)!r})\n"
        "print(rt.infer(np.zeros((1, 1, 8, 8), np.float32)).shape)\n"
        "assert 'torch' not in sys.modules or sys.modules['torch'] is None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 10)" in out.stdout


def test_latency_budget_policy_keeps_p95_within_budget_under_load(bundle):
    """A synthetic load adds 3 ms to the big variant; the budget is 2.5 ms."""
    x = np.zeros((1, 1, 8, 8), np.float32)
    budget = 2.5

    def run(policy):
        rt = Runtime(bundle, policy=policy, window=30)
        rt.current = "fp32"
        lat = []
        for _ in range(120):
            rt.slowdown_ms = 3.0 if rt.current == "fp32" else 0.0
            rt.infer(x)
            lat.append(rt.monitor.variants[rt.current].window[-1])
        return np.percentile(lat[-60:], 95), rt

    fixed_p95, _ = run(None)
    adaptive_p95, rt = run(LatencyBudgetPolicy(budget_ms=budget, min_samples=5, dwell=20))
    assert fixed_p95 > budget, f"fixed largest variant p95 {fixed_p95:.2f} ms should exceed the {budget} ms budget"
    assert adaptive_p95 <= budget, f"adaptive p95 {adaptive_p95:.2f} ms > budget {budget} ms"
    assert rt.current == "fp32-1"


def test_latency_policy_does_not_flap():
    mon = Monitor(window=20)
    policy = LatencyBudgetPolicy(budget_ms=10.0, min_samples=5, dwell=10, hysteresis=0.2)
    variants = ("big", "small")
    expected = {"big": 8.0, "small": 4.0}
    current, switches = "big", 0
    rng = np.random.default_rng(0)
    for i in range(300):
        # big takes ~9-11 ms (around the budget); small ~5 ms: the predicted big p95 stays above 8 ms.
        mon.record(current, (10.0 if current == "big" else 5.0) + rng.uniform(-1, 1))
        nxt = policy.decide(DeviceState(variants=variants, current=current, monitor=mon, expected_latency_ms=expected,
                                        requests=i))
        switches += nxt != current
        current = nxt
    assert switches <= 1, f"{switches} switches in 300 requests: the policy flaps"


def test_power_and_load_policies_have_hysteresis():
    v = ("big", "small")
    p = PowerPolicy(low=0.2, hysteresis=0.05)
    assert p.decide(DeviceState(variants=v, current="big", battery_level=0.19)) == "small"
    assert p.decide(DeviceState(variants=v, current="small", battery_level=0.22)) == "small"
    assert p.decide(DeviceState(variants=v, current="small", battery_level=0.3)) == "big"
    assert p.decide(DeviceState(variants=v, current="big", power_saver=True, battery_level=0.9)) == "small"
    c = CpuLoadPolicy(high=0.8, hysteresis=0.15)
    assert c.decide(DeviceState(variants=v, current="big", cpu_load=0.85)) == "small"
    assert c.decide(DeviceState(variants=v, current="small", cpu_load=0.7)) == "small"
    assert c.decide(DeviceState(variants=v, current="small", cpu_load=0.5)) == "big"


def test_bundle_refuses_existing_output_and_missing_model(tmp_path):
    a = _run_folder(tmp_path / "a", accuracy=0.9, latency=1.0)
    (tmp_path / "out").mkdir()
    with pytest.raises(EdgekilnError, match="already exists"):
        build_bundle([a], tmp_path / "out")
    (a / "model.onnx").unlink()
    with pytest.raises(EdgekilnError, match="model file model.onnx named in report.json is missing"):
        build_bundle([a], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_cascade_threshold_meets_the_budget_and_escalates_least():
    from edgekiln.runtime.cascade import Cascade, choose_threshold

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    big = rng.standard_normal((400, 10))
    big[np.arange(400), labels] += 6.0                       # big: almost always right
    small = rng.standard_normal((400, 10))
    confident = rng.random(400) < 0.7
    small[np.arange(400), labels] += np.where(confident, 6.0, 0.5)   # small: right when confident
    choice = choose_threshold(small, big, labels, max_drop=0.01)
    assert choice["accuracy"] >= choice["big_accuracy"] - 0.01, choice
    assert choice["escalated"] < 0.5, f"escalates {choice['escalated']:.2f} of inputs; expected < 0.5"

    cascade = Cascade(lambda x: small[x], lambda x: big[x], choice["threshold"])
    out = cascade(np.arange(400))
    acc = float((out.logits.argmax(1) == labels).mean())
    assert abs(acc - choice["accuracy"]) < 1e-12
    assert cascade.counts["escalated"] == int(out.escalated.sum())


def test_cascade_keeps_answering_when_the_server_fails():
    from edgekiln.runtime.cascade import Cascade

    small = np.eye(10)[[0, 1, 2]] * 0.1  # all low confidence: everything escalates

    def down(x):
        raise ConnectionError("server down")

    out = Cascade(lambda i: small[i], down, threshold=0.99)(np.arange(3))
    assert out.fallback_failed.all() and not out.escalated.any()
    assert out.logits.argmax(1).tolist() == [0, 1, 2]
