"""The on-device runtime imports and runs with torch absent: a meta-path blocker on PYTHONPATH
makes every ``import torch`` fail in a subprocess, which loads a bundle, infers, runs a staged
early-exit model and the ``edgekiln run`` command, and learns on the device (``Runtime.learn``,
``commit``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekiln.fileio import atomic_write_json
from edgekiln.runtime.bundle import build_bundle
from edgekiln.testing.streams import class_clusters
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx, tiny_head_onnx

BLOCKER = '''
import sys

class _NoTorch:
    """Refuses torch and everything under it, as on a device where it is not installed."""
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
'''


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    src = Path(__file__).resolve().parents[3] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(src)]), "OMP_NUM_THREADS": "1"}
    return env


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("nt")
    run = d / "run"
    run.mkdir()
    tiny_conv_onnx(run / "model.onnx")
    random_npz(run / "eval.npz", (1, 1, 8, 8), n=4, seed=1)
    atomic_write_json(run / "report.json", {"artifact": "model.onnx", "metric": 0.9, "latency_ms": 0.1})
    build_bundle([run], d / "bundle")
    np.save(d / "x.npy", np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32))
    return d


def _run(args, env, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, **kw)


def test_the_blocker_really_blocks_torch(no_torch_env):
    out = _run([sys.executable, "-c", "import torch"], no_torch_env)
    assert out.returncode != 0 and "blocked by the test" in out.stderr, out.stderr[-500:]


def test_runtime_loads_a_bundle_and_infers_without_torch(no_torch_env, bundle):
    code = (
        "import sys, numpy as np\n"
        "from edgekiln.runtime.engine import Runtime\n"
        "from edgekiln.runtime.bundle import health_check\n"
        "from edgekiln.runtime.policies import LatencyBudgetPolicy\n"
        "from edgekiln.runtime import cascade, early_exit, split_exec, split_plan, monitor\n"
        f"rt = Runtime({str(bundle / 'bundle')!r}, policy=LatencyBudgetPolicy(budget_ms=5.0))\n"
        f"y = rt.infer(np.load({str(bundle / 'x.npy')!r}))\n"
        "assert health_check(rt.root)['ok']\n"
        "assert 'torch' not in sys.modules\n"
        "print(y.shape, rt.stats()['variants']['fp32']['count'])\n"
    )
    out = _run([sys.executable, "-c", code], no_torch_env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(1,", "10)", "1"], out.stdout


def test_edgekiln_run_command_works_without_torch(no_torch_env, bundle):
    out = _run([sys.executable, "-m", "edgekiln.cli", "run", str(bundle / "bundle"), "--input",
                str(bundle / "x.npy"), "--repeat", "3"], no_torch_env)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["output_shape"] == [1, 10] and summary["variants"]["fp32"]["count"] == 3, summary


@pytest.fixture(scope="module")
def learn_bundle(tmp_path_factory):
    from edgekiln.fileio import atomic_save_npz
    from edgekiln.runtime.bundle import LearnData

    d = tmp_path_factory.mktemp("ntlearn")
    run = d / "run"
    run.mkdir()
    tiny_head_onnx(run / "model.onnx", int8=True)
    atomic_save_npz(run / "eval.npz", **dict(zip("xy", class_clusters(5, seed=21), strict=True)))
    atomic_save_npz(d / "train.npz", **dict(zip("xy", class_clusters(10, seed=22), strict=True)))
    atomic_write_json(run / "report.json", {"artifact": "model.onnx", "metric": 0.9, "latency_ms": 0.1})
    build_bundle([run], d / "bundle", learn=LearnData(data=d / "train.npz", replay_bytes=8192))
    x, y = class_clusters(4, classes=(0, 8), seed=5)
    atomic_save_npz(d / "new.npz", x=x, y=y)
    return d


def test_runtime_learn_and_commit_without_torch(no_torch_env, learn_bundle):
    code = (
        "import sys, time, numpy as np\n"
        "from edgekiln.runtime.engine import Runtime\n"
        "from edgekiln.runtime.learner import GateConfig\n"
        f"d = np.load({str(learn_bundle / 'new.npz')!r})\n"
        f"rt = Runtime({str(learn_bundle / 'bundle')!r})\n"
        "ms = []\n"
        "for i in range(5):\n"
        "    t = time.perf_counter(); out = rt.learn(d['x'][i:i + 1], d['y'][i:i + 1])\n"
        "    ms.append((time.perf_counter() - t) * 1000)\n"
        f"res = rt.commit({str(learn_bundle / 'out')!r}, gate=GateConfig(budget_old_drop=1.0, min_new_gain=-1.0))\n"
        "assert 'torch' not in sys.modules\n"
        "print(out['classes'], out['n_seen'], res.accepted, round(max(ms[1:]), 3))\n"
    )
    out = _run([sys.executable, "-c", code], no_torch_env)
    assert out.returncode == 0, out.stderr[-2000:]
    classes, seen, accepted, ms = out.stdout.split()
    assert (classes, seen, accepted) == ("9", "5", "True"), out.stdout
    # the first call loads the learner (onnx, a session); the next ones are one streaming step each
    assert 0 < float(ms) < 250, f"slowest learn call after the first {ms} ms (limit 250 ms on a loaded machine)"
