"""Server side: Flower's strategies, composed, plus one edgekiln wrapper that measures the run.

The chain (outermost first), each a Flower ``Strategy``::

    RunRecorder                                   edgekiln: bytes per round, per-client records,
                                                  int8 updates rebuilt into weights
      DifferentialPrivacyClientSideFixedClipping  Flower: clipping norm to clients, noise on the
                                                  aggregate (only with --dp-clip)
        FedAvg | FedProx                          Flower: sampling and weighted averaging

:class:`RunRecorder` follows the shape of Flower's own DP wrappers (it holds a strategy and
delegates every call); it aggregates nothing itself. Bytes are Flower's ``count_bytes`` of each
record a message carries (array payloads plus keys), i.e. what crosses the wire up to the
framing of the transport.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)

from edgekiln.federated.client_app import COMPRESSED_KEY
from edgekiln.federated.compression import decode_update
from edgekiln.federated.settings import FederatedSettings


def message_bytes(msg: Message) -> int:
    """Bytes of every record in ``msg``'s content (arrays, metrics, configs), as Flower counts them."""
    return int(sum(record.count_bytes() for record in msg.content.values()))


def build_strategy(settings: FederatedSettings) -> RunRecorder:
    """The strategy chain for ``settings`` (see the module docstring)."""
    common: dict[str, Any] = {
        "fraction_train": settings.fraction_train,
        # NOTE: the server evaluates the global model on its held-out split after every round
        # (centralized evaluation); federated evaluation on clients is off to save client time.
        "fraction_evaluate": 0.0,
        "min_train_nodes": min(2, settings.clients),
        "min_available_nodes": settings.clients,   # wait until every SuperNode has connected
    }
    inner: Strategy
    if settings.strategy == "fedprox":
        inner = FedProx(proximal_mu=settings.proximal_mu, **common)
    else:
        inner = FedAvg(**common)
    if settings.dp_clip is not None:
        inner = DifferentialPrivacyClientSideFixedClipping(
            inner, noise_multiplier=settings.dp_noise, clipping_norm=settings.dp_clip,
            num_sampled_clients=settings.sampled_clients)
    return RunRecorder(inner, round_config=lambda r: {"edgekiln-lr": round_lr(settings, r)})


def round_lr(settings: FederatedSettings, server_round: int) -> float:
    """The client learning rate of ``server_round`` (1-based): constant, or cosine from ``lr`` to
    ``lr / 10`` over the rounds (``lr_decay='cosine'``)."""
    if settings.lr_decay == "none" or settings.rounds == 1:
        return settings.lr
    progress = (server_round - 1) / (settings.rounds - 1)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class RunRecorder(Strategy):
    """Delegates to ``strategy``; records traffic and client contributions; decodes int8 updates."""

    def __init__(self, strategy: Strategy, round_config: Callable[[int], dict[str, Any]] | None = None) -> None:
        self.strategy = strategy
        self.round_config = round_config
        self.rounds: dict[int, dict[str, Any]] = {}
        self.clients: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._global: dict[str, np.ndarray] = {}
        self._started = time.perf_counter()

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = {k: v.numpy() for k, v in arrays.items()}
        if self.round_config is not None:
            for key, value in self.round_config(server_round).items():
                config[key] = value
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.rounds[server_round] = {"round": server_round, "sampled": len(messages),
                                     "bytes_down": sum(message_bytes(m) for m in messages),
                                     "bytes_up": 0, "float_bytes_up": 0, "replies": 0, "failures": 0}
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # NOTE: replies arrive in completion order; sorted by partition the weighted sum is added up in
        # the same order every run, so a seeded run repeats bit for bit.
        replies = sorted(replies, key=_reply_order)
        entry = self.rounds.setdefault(server_round, {"round": server_round, "bytes_down": 0, "bytes_up": 0,
                                                      "float_bytes_up": 0, "replies": 0, "failures": 0})
        float_record = ArrayRecord({k: Array(v) for k, v in self._global.items()}) if self._global else None
        for msg in replies:
            if msg.has_error():
                entry["failures"] += 1
                self.errors.append(f"node {msg.metadata.src_node_id}: {msg.error.reason.strip().splitlines()[-1]}")
                continue
            entry["replies"] += 1
            sent = message_bytes(msg)
            entry["bytes_up"] += sent
            if COMPRESSED_KEY in msg.content.array_records:
                payload = {k: v.numpy() for k, v in msg.content.array_records[COMPRESSED_KEY].items()}
                weights = decode_update(payload, self._global)
                del msg.content[COMPRESSED_KEY]
                msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in weights.items()})
                # What the same reply would have cost with float weights (same metrics record).
                uncompressed = sent - payload_bytes(payload) + (float_record.count_bytes() if float_record else 0)
            else:
                uncompressed = sent
            entry["float_bytes_up"] += uncompressed
            self.clients.append(self._client_record(server_round, msg, sent))
        entry["aggregated_at_s"] = round(time.perf_counter() - self._started, 3)
        if entry["replies"] == 0:
            from edgekiln.errors import EdgekilnError

            reason = self.errors[-1] if self.errors else "no replies before the timeout"
            raise EdgekilnError(f"round {server_round}: no client finished training ({reason[:300]})")
        return self.strategy.aggregate_train(server_round, replies)

    def _client_record(self, server_round: int, msg: Message, sent: int) -> dict[str, Any]:
        metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
        arrays = next(iter(msg.content.array_records.values()))
        received = {k: v.numpy() for k, v in arrays.items()}
        norm = float(np.sqrt(sum(float(((received[k].astype(np.float64) - g) ** 2).sum())
                                 for k, g in self._global.items() if np.issubdtype(g.dtype, np.floating))))
        return {"round": server_round, "node_id": int(msg.metadata.src_node_id),
                "partition_id": int(metrics.get("partition-id", -1)),
                "samples": int(metrics.get("num-examples", 0)),
                "train_loss": float(metrics.get("train-loss", float("nan"))),
                "local_update_norm": float(metrics.get("local-update-norm", float("nan"))),
                "received_update_norm": norm, "bytes_up": sent}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def _reply_order(msg: Message) -> tuple[int, int]:
    if msg.has_error():
        return (1, int(msg.metadata.src_node_id))
    metrics = next(iter(msg.content.metric_records.values()), MetricRecord())
    return (0, int(metrics.get("partition-id", msg.metadata.src_node_id)))


def payload_bytes(payload: dict[str, np.ndarray]) -> int:
    """Flower's ``count_bytes`` of an ArrayRecord holding ``payload``."""
    return ArrayRecord({k: Array(v) for k, v in payload.items()}).count_bytes()
