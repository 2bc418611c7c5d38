"""Where trials run: in this process, in local worker processes, or on a Ray cluster.

Each executor takes a list of trial payloads and returns their result dicts in the same order;
:func:`edgekiln.search.trial.run_trial` does the work and is deterministic per payload, so the
executor never changes the results, only the wall time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.search.recipe import SearchSettings
from edgekiln.search.trial import run_trial


def run_batch(payloads: Sequence[dict[str, Any]], settings: SearchSettings) -> list[dict[str, Any]]:
    if settings.executor == "ray":
        return _run_ray(payloads, settings)
    if settings.workers > 1 and len(payloads) > 1:
        return _run_processes(payloads, settings.workers)
    return [run_trial(p) for p in payloads]


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
