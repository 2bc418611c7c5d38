"""Run the Flower apps on Flower's Simulation Engine (Ray-backed) on this machine.

Each simulated SuperNode runs the :mod:`~edgekiln.federated.client_app` in a Ray actor; the
ServerApp runs in this process. Resources are kept small for 2-core machines: one CPU per
client actor, so at most ``cpus`` clients train at once, one torch thread each.

NOTE: Flower 1.42 marks the Python entry point ``flwr.simulation.run_simulation`` deprecated in
favour of ``flwr run`` against a (managed, background) SuperLink. ``edgekiln federate`` is a
library call that must return its result and leave no daemon behind, so it uses the Python
entry point, which drives the same Simulation Engine; deployment (``flwr run`` against
``flower-superlink`` and ``flower-supernode`` processes) runs the very same apps, see
``tests/integration/test_federated_deployment.py``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.federated.settings import FederatedSettings


def simulate(settings: FederatedSettings, *, cpus: int = 2, quiet: bool = False, verbose: bool = False) -> Any:
    """Run ``settings`` in the simulation engine; return the :class:`ServerResult` and wall seconds.

    >>> r, seconds = simulate(FederatedSettings(clients=3, rounds=2, partition="iid"), quiet=True)  # doctest: +SKIP
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgekiln.federated.client_app import app, head_app
    from edgekiln.federated.server_app import ServerResult, make_server_app

    # NOTE: Ray actors inherit this process's environment; one torch/OpenMP thread per client.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    client_app = head_app if settings.scope == "head" else app   # head: numpy head training, no torch
    if settings.scope == "model" and settings.init and not (Path(settings.init) / "model.pt").is_file() \
            and not Path(settings.init).is_file():
        raise EdgekilnError(f"--init {settings.init}: no model.pt to fine-tune from")
    sink: list[ServerResult | BaseException] = []
    columns = [TextColumn("[bold]federate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}")]
    with Progress(*columns, disable=quiet, transient=True) as bar:
        task = bar.add_task("starting the simulation engine", total=settings.rounds)

        def on_round(entry: dict[str, Any]) -> None:
            if entry["round"] > 0:
                bar.update(task, advance=1, description=f"round {entry['round']}: accuracy {entry['accuracy']:.4f}")

        server_app = make_server_app(settings, sink, on_round)
        backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                   "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose,
                                 "logging_level": logging.INFO if verbose else logging.ERROR}}
        start = time.perf_counter()
        with _flower_logs(verbose), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from flwr.simulation import run_simulation

            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=settings.clients,
                           backend_config=backend, verbose_logging=verbose)
        seconds = time.perf_counter() - start
    if not sink:
        raise EdgekilnError("the federated simulation ended without a result (rerun with --verbose for "
                            "Flower's log)")
    if isinstance(sink[0], EdgekilnError):
        raise sink[0]
    if isinstance(sink[0], BaseException):
        raise EdgekilnError(f"the federated server failed: {type(sink[0]).__name__}: {str(sink[0])[:300]}")
    return sink[0], seconds


class _flower_logs:  # noqa: N801 - used as a context manager
    """Flower logs every round at INFO (and its deprecation notices); keep only errors unless ``verbose``."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.logger = logging.getLogger("flwr")
        self.level = self.logger.level

    def __enter__(self) -> None:
        if not self.verbose:
            self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)
