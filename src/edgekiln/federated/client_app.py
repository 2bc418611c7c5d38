"""The Flower ``ClientApp``: fine-tune the global model on this node's local data.

Flower's Message API (1.42): ``@app.train`` receives the global weights (``arrays``) and the
round's ``config``; it replies with the local weights and a ``metrics`` record whose
``num-examples`` is what FedAvg weights by. Two mods wrap training, outermost first:

1. :func:`int8_update_mod` (edgekiln's): when the config asks for ``int8``, replaces the reply's
   weights with the int8-quantized update ``local - global`` (see ``compression.py``), stored
   under ``int8-update``; the server's :class:`~edgekiln.federated.strategy.RunRecorder` rebuilds
   the weights before Flower's strategy aggregates them.
2. :func:`optional_clipping_mod`: Flower's own ``fixedclipping_mod`` (central DP, client-side
   clipping) when the server's ``DifferentialPrivacyClientSideFixedClipping`` sent a clipping
   norm; a no-op otherwise. It runs inside the compression mod, so the update is clipped first
   and the clipped update is what gets quantized.

``head_app`` is the same for ``--scope head``: the client trains only the classifier head of the
deployed bundle, in numpy with onnxruntime features (no torch), and replies with the head
tensors; the same two mods apply to them.

The SuperNode's node config names the partition: ``partition-id`` and ``num-partitions``
(set by the simulation engine, or ``flower-supernode --node-config``), optionally ``data-path``
(an ``.npz`` with ``x`` and ``y``: a device's own data instead of a partition of the example).
"""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

COMPRESSED_KEY = "int8-update"
app = ClientApp()
head_app = ClientApp()


def _config(msg: Message) -> ConfigRecord:
    return msg.content.config_records.get("config", ConfigRecord())


def int8_update_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Send the int8-quantized update instead of float weights when ``edgekiln-compress`` is ``int8``."""
    from edgekiln.federated.compression import encode_update

    config = _config(msg)
    if config.get("edgekiln-compress") != "int8" or "arrays" not in msg.content.array_records:
        return call_next(msg, ctx)
    reference = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    out = call_next(msg, ctx)
    if out.has_error() or len(out.content.array_records) != 1:
        return out
    key, record = next(iter(out.content.array_records.items()))
    local = {k: v.numpy() for k, v in record.items()}
    payload = encode_update(local, reference, str(config.get("edgekiln-granularity", "channel")))
    del out.content[key]
    out.content[COMPRESSED_KEY] = ArrayRecord({k: Array(v) for k, v in payload.items()})
    return out


def optional_clipping_mod(msg: Message, ctx: Context, call_next: Any) -> Message:
    """Flower's ``fixedclipping_mod`` when the round's config carries a clipping norm."""
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    if KEY_CLIPPING_NORM in _config(msg):
        return fixedclipping_mod(msg, ctx, call_next)
    return call_next(msg, ctx)


def _local_data(msg: Message, ctx: Context) -> tuple[Any, Any, int, dict[str, Any]]:
    from edgekiln.federated.task import client_data

    config = dict(_config(msg))
    node = ctx.node_config
    partition_id = int(node.get("partition-id", 0))
    clients = int(node.get("num-partitions", config.get("edgekiln-clients", 1)))
    x, y = client_data(str(config["edgekiln-example"]), str(config["edgekiln-partition"]), clients, partition_id,
                       int(config["edgekiln-seed"]), data_path=str(node["data-path"]) if node.get("data-path") else None)
    return x, y, partition_id, config


def _model_from(msg: Message, config: dict[str, Any]) -> Any:
    from edgekiln.federated.task import build_model

    model = build_model(str(config["edgekiln-example"]), int(config["edgekiln-seed"]))
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return model


@app.train(mods=[int8_update_mod, optional_clipping_mod])
def train(msg: Message, ctx: Context) -> Message:
    """One round of local training; replies with the new local weights and per-client metrics."""
    import numpy as np

    from edgekiln.federated.task import train_local

    x, y, partition_id, config = _local_data(msg, ctx)
    model = _model_from(msg, config)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    server_round = int(config.get("server-round", 0))
    loss = train_local(model, x, y, example=str(config["edgekiln-example"]),
                       epochs=int(config["edgekiln-local-epochs"]), lr=float(config["edgekiln-lr"]),
                       batch_size=int(config["edgekiln-batch-size"]),
                       # NOTE: a different shuffle per round and client, reproducible from the run seed.
                       seed=int(config["edgekiln-seed"]) * 100_003 + server_round * 1009 + partition_id,
                       proximal_mu=float(config.get("proximal-mu", 0.0)),
                       optimizer=str(config.get("edgekiln-optimizer", "sgd")))
    norm = float(np.sqrt(sum(float(((v.float() - start[k].float()) ** 2).sum())
                             for k, v in model.state_dict().items())))
    metrics = MetricRecord({"num-examples": len(y), "train-loss": loss, "local-update-norm": norm,
                            "partition-id": partition_id})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@head_app.train(mods=[int8_update_mod, optional_clipping_mod])
def train_head(msg: Message, ctx: Context) -> Message:
    """One round of head training on this node's data (numpy, no torch); replies with the local head."""
    from pathlib import Path

    import numpy as np

    from edgekiln.federated.head_fedavg import bundle_model, head_local_train
    from edgekiln.runtime.learner import LearnConfig
    from edgekiln.runtime.replay import ReplayBuffer

    x, y, partition_id, config = _local_data(msg, ctx)
    tail = str(config["edgekiln-head-tail"])
    model, replay_path = bundle_model(Path(str(config["edgekiln-head-bundle"])))
    replay = ReplayBuffer.load(replay_path) if replay_path is not None else None
    start = {k: v.numpy() for k, v in msg.content.array_records["arrays"].items()}
    server_round = int(config.get("server-round", 0))
    learn = LearnConfig(scope=tail, steps=int(config["edgekiln-head-steps"]),
                        lr=float(config["edgekiln-head-lr"]), distill=float(config["edgekiln-head-distill"]),
                        seed=int(config["edgekiln-seed"]) * 100_003 + server_round * 1009 + partition_id)
    local, loss = head_local_train(model, start, x, y, learn, replay=replay)
    norm = float(np.sqrt(sum(float(((local[k] - v) ** 2).sum()) for k, v in start.items())))
    metrics = MetricRecord({"num-examples": len(y), "train-loss": loss, "local-update-norm": norm,
                            "partition-id": partition_id})
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(local[k])) for k in start}),
                          "metrics": metrics})
    return Message(content=content, reply_to=msg)
