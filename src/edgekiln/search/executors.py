"""Where trials run: in a worker process of their own, in local worker processes, or on a Ray cluster.

Each executor takes a list of trial payloads and returns their result dicts in the same order;
:func:`edgekiln.search.trial.run_trial` does the work and is deterministic per payload, so the
executor never changes the results, only the wall time.

Serial trials run one at a time in one spawned worker process (:class:`TrialWorker`), reused from
trial to trial and search to search: a native crash in a runtime (onnxruntime segfaulted loading
the fp16 CRNN of the corpus, and the whole search died with exit 139 and no message) ends that
trial only, with the crash and where it happened as its error; and a trial still running at its
hard time limit (``payload["hard_limit_s"]``: a calibration inside onnxruntime that never reaches
the trial's cooperative clock) is stopped, so the search keeps its ``--timeout``.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.search.recipe import SearchSettings
from edgekiln.search.trial import Candidate, run_trial

POLL_S = 0.2   # how often the parent looks at a running trial's worker
START_S = 120.0  # a worker not ready after this long (imports on a loaded machine) is given up
READY = "ready"


def run_batch(payloads: Sequence[dict[str, Any]], settings: SearchSettings) -> list[dict[str, Any]]:
    if settings.executor == "ray":
        return _run_ray(payloads, settings)
    if settings.workers > 1 and len(payloads) > 1:
        return _run_processes(payloads, settings.workers)
    return [run_isolated(p) for p in payloads]


def run_isolated(payload: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_trial` in the shared :class:`TrialWorker` (started on first use)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = TrialWorker()
    return _WORKER.run(payload)


def close_worker() -> None:
    """Stop the shared worker. NOTE: a search leaves it running for the next one in this process
    (imports cost seconds: a cold worker per call added 3-10 s to each small search); it is a
    daemon process, ended with this one, and stopped on Ctrl-C, a crash or a hard time limit."""
    global _WORKER
    if _WORKER is not None:
        _WORKER.close()
        _WORKER = None


_WORKER: TrialWorker | None = None


class TrialWorker:
    """One spawned process that runs trials one at a time; it is started again after a crash or a kill.

    >>> w = TrialWorker()
    >>> w.run({"number": 0, "label": "nothing", "steps": [], "artifact": {}})["state"]
    'failed'
    >>> w.close()
    """

    def __init__(self) -> None:
        self._proc: Any = None
        self._conn: Any = None

    def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self._proc is None or not self._proc.is_alive():
            problem = self._start()
            if problem:
                return _failed(payload, time.monotonic(), problem)
        start = time.monotonic()
        hard = payload.get("hard_limit_s")
        self._conn.send(payload)
        try:
            while True:
                if self._conn.poll(POLL_S):
                    try:
                        return self._conn.recv()
                    except EOFError:
                        break                       # died while answering
                if not self._proc.is_alive():
                    break
                if hard is not None and time.monotonic() - start > hard:
                    self._stop()
                    return _failed(payload, start, f"timeout: stopped at the trial's hard time limit ({hard:.3g} s) "
                                                   "inside a step that does not check the trial's clock")
        except BaseException:
            self._stop()                            # Ctrl-C: the worker ignores SIGINT; it is stopped here
            raise
        self._proc.join(1.0)
        code = self._proc.exitcode
        self._proc = None
        return _failed(payload, start, _crash_message(code, _crash_file(payload)))

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(5.0)
            except (OSError, EOFError):
                pass
        self._stop()

    def _start(self) -> str | None:
        """Start the worker and wait until it has imported what trials use (not counted in a trial's
        time); a worker that cannot start is the reason, else None."""
        import multiprocessing as mp

        ctx = mp.get_context("spawn")   # a fresh interpreter: torch and OpenMP do not survive fork
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_loop, args=(child,), daemon=True, name="edgekiln-trial")
        self._proc.start()
        child.close()
        try:
            if self._conn.poll(START_S) and self._conn.recv() == READY:
                return None
        except EOFError:
            pass
        self._stop()
        return f"failed: the trial worker process did not start within {START_S:g} s"

    def _stop(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(3.0)
                if self._proc.is_alive():
                    self._proc.kill()
                    self._proc.join(3.0)
            self._proc = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _worker_loop(conn: Any) -> None:
    """The worker: run each payload received, send back its result; ``None`` ends it."""
    import faulthandler

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # NOTE: what every trial loads, loaded before the first trial's clock starts (2 s here, cold)
    import onnx  # noqa: F401
    import onnxruntime.quantization  # noqa: F401

    import edgekiln.passes.registry as passes
    import edgekiln.pipeline  # noqa: F401
    from edgekiln.execution.runtimes import available_runtimes

    passes.registry()
    available_runtimes()   # imports the installed runtimes (onnxruntime, OpenVINO)
    conn.send(READY)
    while True:
        try:
            payload = conn.recv()
        except EOFError:
            return
        if payload is None:
            return
        crash = _crash_file(payload)
        if crash is None:
            conn.send(run_trial(payload))
            continue
        with crash.open("w") as log:
            faulthandler.enable(file=log)
            result = run_trial(payload)
            faulthandler.disable()
        crash.unlink(missing_ok=True)
        conn.send(result)


def _crash_file(payload: dict[str, Any]) -> Path | None:
    """Where the worker writes the Python stack if the trial crashes: next to its work folder."""
    work = payload.get("work_dir")
    if not work:
        return None
    path = Path(work)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.name + ".crash.txt")


def _crash_message(exitcode: int | None, crash: Path | None) -> str:
    """One line: the signal and, from the stack faulthandler wrote, the innermost frame and the
    innermost edgekiln frame."""
    if exitcode is not None and exitcode < 0:
        try:
            how = f"{signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"signal {-exitcode}"
    else:
        how = f"exit code {exitcode}"
    where = ""
    frames = _frames(crash)
    if frames:
        ours = [f"{f[0].split('/edgekiln/', 1)[1]}:{f[1]} {f[2]}" for f in frames if "/edgekiln/" in f[0]][:3]
        where = f" in {Path(frames[0][0]).name}:{frames[0][2]}" + (f" < {' < '.join(ours)}" if ours else "") + \
            f" (stack: {crash})"
    return f"crashed: the trial's process died of {how}{where}; the search went on without it"


def _frames(crash: Path | None) -> list[tuple[str, str, str]]:
    """(file, line, function) of the crashing thread, innermost first, from a faulthandler dump."""
    import re

    if crash is None or not crash.is_file():
        return []
    text = crash.read_text(errors="replace")
    block = text.split("Current thread", 1)[-1] if "Current thread" in text else text
    return re.findall(r'File "([^"]+)", line (\d+) in (\S+)', block)


def _failed(payload: dict[str, Any], start: float, error: str) -> dict[str, Any]:
    cand = Candidate(number=payload["number"], label=payload["label"], steps=payload.get("steps", []),
                     state="failed", error=error, seconds=round(time.monotonic() - start, 3))
    return cand.to_dict()


def _run_processes(payloads: Sequence[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # NOTE: "spawn" gives each worker a fresh interpreter: torch and OpenMP do not survive fork.
    with ProcessPoolExecutor(max_workers=min(workers, len(payloads)), mp_context=mp.get_context("spawn"),
                             initializer=_worker_init) as pool:
        return list(pool.map(run_trial, payloads))


def _worker_init() -> None:
    import os

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def _run_ray(payloads: Sequence[dict[str, Any]], settings: SearchSettings) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise EdgekilnError("--executor ray needs Ray: pip install 'edgekiln[search]'") from None
    if not ray.is_initialized():
        try:
            if settings.ray_address:
                ray.init(address=settings.ray_address, ignore_reinit_error=True, log_to_driver=False)
            else:
                ray.init(num_cpus=max(1, settings.workers), include_dashboard=False, ignore_reinit_error=True,
                         log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError and friends
            raise EdgekilnError(f"cannot reach the Ray cluster at {settings.ray_address or 'local'}: "
                                f"{str(exc).splitlines()[0][:200]}") from exc
    remote = ray.remote(num_cpus=1)(run_trial)
    return list(ray.get([remote.remote(p) for p in payloads]))
