"""Deployment bundles, the Runtime API and the switching policies."""

from __future__ import annotations

import json
import re

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
    (lambda b, m: (b / m["variants"][1]["file"]).unlink(), "variant 'fp32-1' file models/fp32-1.onnx is missing"),
    (lambda b, m: m["variants"][1].update(name="fp32"), "duplicate variant names ['fp32', 'fp32']"),
    (lambda b, m: m.update(variants=[]), "lists no model variants"),
    (lambda b, m: m["variants"][0].update(colour="blue"), "malformed entry"),
    (lambda b, m: (b / "samples.npz").unlink(), "samples.npz named in the manifest is missing"),
    (lambda b, m: m["inputs"][0].pop("shape"), "missing field 'shape'"),
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


@pytest.mark.timed
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


def test_old_manifests_without_optional_fields_still_load(bundle):
    """Fleet OTA reads bundles written before the optional fields existed: they must load."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for key in ("sample_inputs", "sample_outputs", "health_tolerance"):
        manifest.pop(key)
    for v in manifest["variants"]:
        for key in ("metric", "metric_name", "latency_ms", "macs", "provenance"):
            v.pop(key)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    m = load_manifest(bundle)
    assert m.sample_inputs is None and m.variants[0].latency_ms == {} and m.health_tolerance == 1e-3
    assert Runtime(bundle).infer(np.zeros((1, 1, 8, 8), np.float32)).shape == (1, 10)


@pytest.mark.parametrize("report,message", [
    (None, "not an edgekiln run folder (no report.json)"),
    ({"metric": 0.9}, "the run folder names no model"),
    ({"selected": {"artifact": "gone.onnx"}}, "gone.onnx named in report.json is missing"),
])
def test_bundle_refuses_run_folders_it_cannot_use(tmp_path, report, message):
    run = tmp_path / "run"
    run.mkdir()
    if report is not None:
        atomic_write_json(run / "report.json", report)
    with pytest.raises(EdgekilnError, match=re.escape(message)):
        build_bundle([run], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*")), "a partial bundle was left"


def test_bundle_refuses_existing_output_and_missing_model(tmp_path):
    a = _run_folder(tmp_path / "a", accuracy=0.9, latency=1.0)
    (tmp_path / "out").mkdir()
    with pytest.raises(EdgekilnError, match="already exists"):
        build_bundle([a], tmp_path / "out")
    (a / "model.onnx").unlink()
    with pytest.raises(EdgekilnError, match="model.onnx named in report.json is missing"):
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


def _simulate(policy, latency, n, *, seed=0):
    """Drive ``policy`` with latencies ``latency(i, variant)``; returns the served variants."""
    mon = Monitor(window=50)
    variants, expected = ("big", "small"), {"big": 1.0, "small": 0.5}
    current, served = "big", []
    rng = np.random.default_rng(seed)
    for i in range(n):
        current = policy.decide(DeviceState(variants=variants, current=current, monitor=mon,
                                            expected_latency_ms=expected, requests=i))
        mon.record(current, latency(i, current) * rng.uniform(0.95, 1.05))
        served.append(current)
    return served


def _switches(served):
    return sum(a != b for a, b in zip(served, served[1:], strict=False))


def test_latency_policy_steps_down_under_load_and_back_up_when_it_passes():
    """Budget 2 ms; a load makes 'big' take 3 ms during requests 0-299, then 1 ms again."""
    served = _simulate(LatencyBudgetPolicy(budget_ms=2.0, min_samples=10, dwell=50),
                       lambda i, v: (3.0 if i < 300 else 1.0) if v == "big" else 0.5, 800)
    first_small = served.index("small")
    assert first_small <= 11, f"stepped down only at request {first_small} (min_samples 10)"
    back = next(i for i in range(300, 800) if served[i:] == ["big"] * (800 - i))
    assert back <= 300 + 400, f"back on 'big' for good only from request {back}; the load ended at 300"
    assert _switches(served) <= 8, f"{_switches(served)} switches: {served}"


def test_latency_policy_backs_off_when_only_the_big_variant_is_loaded():
    """A load only 'big' feels is invisible to the predicted p95: every step up is a probe that
    fails. The wait between probes doubles, so switching stays rare and the budget holds."""
    budget = 2.0
    served = _simulate(LatencyBudgetPolicy(budget_ms=budget, min_samples=10, dwell=50),
                       lambda i, v: 3.0 if v == "big" else 0.5, 1500)
    over = sum(v == "big" for v in served[20:]) / len(served[20:])
    assert _switches(served) <= 10, f"{_switches(served)} switches in 1500 requests: the policy flaps"
    assert over <= 0.05, f"{100 * over:.1f}% of requests served over the {budget} ms budget (limit 5%)"


def test_users_can_plug_in_their_own_policy(bundle):
    class EveryThird:
        """A user's policy: the fast variant on every third request, looking only at the state."""

        def decide(self, state):
            return state.variants[-1] if state.requests % 3 == 2 else state.variants[0]

    rt = Runtime(bundle, policy=EveryThird())
    x = np.zeros((1, 1, 8, 8), np.float32)
    for _ in range(9):
        rt.infer(x)
    counts = {k: v["count"] for k, v in rt.stats()["variants"].items()}
    assert counts == {"fp32": 6, "fp32-1": 3}, counts


def test_a_policy_naming_an_unknown_variant_is_refused(bundle):
    class Broken:
        def decide(self, state):
            return "nope"

    with pytest.raises(EdgekilnError, match="has no variant 'nope'; it has: fp32, fp32-1"):
        Runtime(bundle, policy=Broken()).infer(np.zeros((1, 1, 8, 8), np.float32))
