"""`edgekiln learn BUNDLE`: argument checks in one line with exit 2, the JSON outcome, and a run in a
subprocess where importing torch fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from learn_helpers import new_samples, run_learn, tiny_bundle

from edgekiln.cli.learn_cmd import parse_bytes
from tests.unit.runtime.test_no_torch import BLOCKER


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("learn-cli")
    new_samples(folder / "new.npz")
    np.savez(folder / "no_y.npz", x=np.zeros((4, 1, 8, 8), np.float32))
    return folder


def test_replay_bytes_units():
    assert [parse_bytes(t) for t in ("64KB", "64KiB", "1MB", "512", "100B")] == [65_536, 65_536, 1_048_576, 512, 100]
    for bad in ("64 potatoes", "-1KB", "", "KB"):
        with pytest.raises(Exception, match="--replay-bytes"):
            parse_bytes(bad)


@pytest.mark.parametrize(("args", "message"), [
    (["--new-classes", "9", "--out", "{tmp}/o"], "expected 8"),
    (["--data", "{data}/no_y.npz", "--out", "{tmp}/o"], "has no 'y'"),
    (["--new-classes", "8,9"], "give --out NEW_BUNDLE"),
    (["--replay-bytes", "lots", "--out", "{tmp}/o"], "--replay-bytes 'lots'"),
])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys, args, message):
    argv = [a.format(tmp=tmp_path, data=data) for a in args]
    if "--data" not in argv:
        argv = ["--data", str(data / "new.npz"), *argv]
    code = run_learn(["learn", tiny_bundle(), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (code, err)
    assert not (tmp_path / "o").exists(), "a refused run must not leave an output folder"


def test_learn_bundle_json_outcome_and_replay_bytes(data, tmp_path, capsys, monkeypatch):
    import edgekiln.fleet.adapt as fleet_adapt

    seen, real = {}, fleet_adapt.adapt_bundle
    monkeypatch.setattr(fleet_adapt, "adapt_bundle", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    out = tmp_path / "adapted"
    code = run_learn(["learn", tiny_bundle(), "--data", data / "new.npz", "--new-classes", "8,9", "--distill", "1",
                      "--budget-old-drop", "0.3", "--replay-bytes", "64KB", "--out", out, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0, result
    assert seen["replay_bytes"] == 65_536 and result["metrics"]["replay_bytes"] <= 65_536, (seen, result["metrics"])
    assert {"target", "accepted", "status", "id", "reasons", "metrics", "adaptation", "out"} <= set(result), result
    assert (result["target"], result["status"], result["out"], result["reasons"]) == ("bundle", "adapted", str(out),
                                                                                      [])
    assert result["adaptation"]["id"] == result["id"] and result["adaptation"]["classes_after"] == 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adaptation"]["id"] == result["id"]
    for key in ("old_before", "old_after", "old_drop", "budget", "n_old", "n_new", "ms_per_step", "peak_bytes"):
        assert isinstance(result["metrics"][key], int | float), (key, result["metrics"])


def test_learn_runs_where_torch_cannot_be_imported(data, tmp_path):
    """The `edgekiln learn` command in a subprocess whose meta-path blocker refuses torch."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(src)]), "OMP_NUM_THREADS": "1"}
    script = ("import sys\nfrom edgekiln.cli.app import main\ntry:\n    main(sys.argv[1:])\n"
              "finally:\n    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n")
    out = tmp_path / "adapted"
    proc = subprocess.run([sys.executable, "-c", script, "learn", str(tiny_bundle()), "--data", str(data / "new.npz"),
                           "--new-classes", "8,9", "--distill", "1", "--budget-old-drop", "0.3", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch imported: False" in proc.stderr and "accepted: adaptation" in proc.stdout, proc
    assert (out / "manifest.json").is_file()
