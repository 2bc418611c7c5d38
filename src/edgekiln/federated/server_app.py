"""The Flower ``ServerApp``: run the strategy chain for the configured rounds.

:func:`run_server` is the whole server logic, used by both runtimes:

- simulation: ``edgekiln federate`` builds a ``ServerApp`` around it (:func:`make_server_app`)
  and gets the :class:`ServerResult` back in-process;
- deployment: ``flwr run`` loads :data:`app` (``edgekiln.federated.server_app:app``) in the
  SuperLink's ServerApp process; it reads the settings from the run config and writes the run
  folder to the run config's ``out-dir``.

After every round the server evaluates the global model on its held-out split (centralized
evaluation: Flower's ``evaluate_fn``). With ``scope = "head"`` the global model is only the
classifier head of the deployed bundle (:func:`run_server_head`): the same strategy chain
averages the head arrays, and the evaluation writes them into the bundle's model (onnxruntime).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from edgekiln.federated.settings import FederatedSettings

OUT_DIR_KEY = "out-dir"
app = ServerApp()


@dataclass
class ServerResult:
    """What a finished run hands to the report: per-round history, client records, final weights."""

    settings: FederatedSettings
    history: list[dict[str, Any]] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)
    state_dict: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def client_config(settings: FederatedSettings) -> ConfigRecord:
    """The part of the settings every ClientApp needs, sent in each round's config."""
    keys = ("example", "partition", "clients", "seed", "local_epochs", "optimizer", "lr", "batch_size", "compress",
            "granularity")
    config = {"edgekiln-" + k.replace("_", "-"): getattr(settings, k) for k in keys}
    if settings.scope == "head":
        h = settings.head
        config.update({"edgekiln-head-bundle": str(h.bundle), "edgekiln-head-tail": h.tail,
                       "edgekiln-head-steps": h.steps, "edgekiln-head-lr": h.lr, "edgekiln-head-distill": h.distill})
    return ConfigRecord(config)


def _round_evaluator(measure: Callable[[ArrayRecord], tuple[float, float]], strategy: Any,
                     result: ServerResult, start: float,
                     on_round: Callable[[dict[str, Any]], None] | None) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Flower's ``evaluate_fn`` for both modes: ``measure`` gives (accuracy, loss) of the global arrays;
    the round's history entry (with the strategy's per-round record) goes to ``result`` and ``on_round``."""

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        acc, loss = measure(arrays)
        entry = {"round": server_round, "accuracy": acc, "loss": loss,
                 "elapsed_s": round(time.perf_counter() - start, 3)}
        entry.update({k: v for k, v in strategy.rounds.get(server_round, {}).items() if k != "round"})
        result.history.append(entry)
        if on_round is not None:
            on_round(entry)
        return MetricRecord({"accuracy": acc, "loss": loss})

    return evaluate


def run_server(grid: Grid, settings: FederatedSettings,
               on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerResult:
    """Run ``settings.rounds`` rounds on ``grid``; return the history and the final global model."""
    if settings.scope == "head":
        return run_server_head(grid, settings, on_round)
    from edgekiln.federated.strategy import build_strategy
    from edgekiln.federated.task import accuracy_and_loss, build_model, server_data

    # NOTE: Flower's strategies sample clients with the global `random` module and its DP wrapper
    # draws noise from the global numpy generator; seed both so a run repeats exactly.
    random.seed(settings.seed)
    np.random.seed(settings.seed)  # noqa: NPY002 - Flower's DP noise uses the legacy global generator
    model = build_model(settings.example, settings.seed, settings.init)
    eval_x, eval_y = server_data(settings.example, settings.seed)
    strategy = build_strategy(settings)
    result = ServerResult(settings=settings)
    start = time.perf_counter()

    def measure(arrays: ArrayRecord) -> tuple[float, float]:
        model.load_state_dict(arrays.to_torch_state_dict())
        return accuracy_and_loss(model, eval_x, eval_y)

    evaluate = _round_evaluator(measure, strategy, result, start, on_round)
    flower_result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=settings.rounds,
        train_config=client_config(settings), evaluate_fn=evaluate)
    result.seconds = round(time.perf_counter() - start, 3)
    result.clients = strategy.clients
    final = flower_result.arrays if len(flower_result.arrays) else ArrayRecord(model.state_dict())
    result.state_dict = final.to_torch_state_dict()
    return result


def run_server_head(grid: Grid, settings: FederatedSettings,
                    on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerResult:
    """The head mode of :func:`run_server`: the global arrays are the bundle's head (grown by the new
    classes); ``result.state_dict`` holds the final head as numpy arrays."""
    from flwr.app import Array

    from edgekiln.federated.head_fedavg import head_evaluator, head_start
    from edgekiln.federated.strategy import build_strategy
    from edgekiln.federated.task import server_data

    random.seed(settings.seed)
    np.random.seed(settings.seed)  # noqa: NPY002 - Flower's DP noise uses the legacy global generator
    model, head = head_start(settings.head)
    eval_x, eval_y = server_data(settings.example, settings.seed)
    strategy = build_strategy(settings)
    result = ServerResult(settings=settings)
    start = time.perf_counter()

    accuracy = head_evaluator(model, eval_x, eval_y, scope=settings.head.tail)

    def measure(arrays: ArrayRecord) -> tuple[float, float]:
        return accuracy({k: v.numpy() for k, v in arrays.items()})

    evaluate = _round_evaluator(measure, strategy, result, start, on_round)
    initial = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in head.items()})
    flower_result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=settings.rounds,
                                   train_config=client_config(settings), evaluate_fn=evaluate)
    result.seconds = round(time.perf_counter() - start, 3)
    result.clients = strategy.clients
    final = flower_result.arrays if len(flower_result.arrays) else initial
    result.state_dict = {k: v.numpy() for k, v in final.items()}
    return result


def make_server_app(settings: FederatedSettings, sink: list[ServerResult | BaseException],
                    on_round: Callable[[dict[str, Any]], None] | None = None) -> ServerApp:
    """A ServerApp for the simulation runtime that appends its :class:`ServerResult` (or the
    exception that stopped it) to ``sink``."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            sink.append(run_server(grid, settings, on_round))
        except BaseException as exc:
            sink.append(exc)
            raise

    return server


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point: settings from the run config, run folder to ``out-dir``."""
    from edgekiln.federated.report import write_run_folder

    config = dict(context.run_config)
    settings = FederatedSettings.from_run_config(config)
    result = run_server(grid, settings)
    out = str(config.get(OUT_DIR_KEY) or "")
    if out and settings.scope == "head":
        from edgekiln.federated.head_fedavg import write_head_run

        write_head_run(out, result, runtime="deployment", wall_seconds=result.seconds)
    elif out:
        write_run_folder(out, result, runtime="deployment", wall_seconds=result.seconds)
