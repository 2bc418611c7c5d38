"""The server chain RunRecorder -> (Flower DP wrapper) -> Flower FedAvg, and the client mods.

edgekiln aggregates nothing itself; these tests check that what reaches Flower's FedAvg
(after int8 updates are rebuilt) averages to the hand-computed, sample-weighted mean, and that
the bytes recorded are the bytes the messages carry.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from edgekiln.federated.client_app import COMPRESSED_KEY, int8_update_mod, optional_clipping_mod
from edgekiln.federated.compression import SCALE_SUFFIX, encode_update
from edgekiln.federated.settings import FederatedSettings
from edgekiln.federated.strategy import build_strategy, message_bytes

pytestmark = pytest.mark.usefixtures("_task_identity")  # conftest: Flower's task identity set, then restored


class FakeGrid:
    """The part of Flower's Grid the strategies use: the connected node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


GLOBAL = {"w": np.linspace(-1, 1, 2048, dtype=np.float32).reshape(32, 64), "b": np.zeros(32, np.float32)}


def _local(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: v + (rng.standard_normal(v.shape) * 0.05).astype(np.float32) for k, v in GLOBAL.items()}


def _reply(instruction: Message, arrays: dict[str, np.ndarray], samples: int, compress: bool) -> Message:
    record_key = COMPRESSED_KEY if compress else "arrays"
    payload = encode_update(arrays, GLOBAL) if compress else arrays
    content = RecordDict({record_key: ArrayRecord({k: Array(v) for k, v in payload.items()}),
                          "metrics": MetricRecord({"num-examples": samples, "partition-id": instruction.metadata.dst_node_id,
                                                   "train-loss": 0.5, "local-update-norm": 1.0})})
    return Message(content=content, reply_to=instruction)


def _run_round(settings: FederatedSettings, samples: dict[int, int], compress: bool) -> tuple:
    strategy = build_strategy(settings)
    messages = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                             ConfigRecord(), FakeGrid(sorted(samples))))
    locals_ = {m.metadata.dst_node_id: _local(m.metadata.dst_node_id) for m in messages}
    replies = [_reply(m, locals_[m.metadata.dst_node_id], samples[m.metadata.dst_node_id], compress)
               for m in messages]
    sent = sum(message_bytes(r) for r in replies)
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, messages, locals_, arrays, sent


def _hand_fedavg(locals_: dict[int, dict[str, np.ndarray]], samples: dict[int, int]) -> dict[str, np.ndarray]:
    total = sum(samples.values())
    return {k: sum(samples[n] / total * locals_[n][k].astype(np.float64) for n in samples) for k in GLOBAL}


def test_fedavg_weights_by_samples_like_the_hand_computation() -> None:
    samples = {1: 30, 2: 10, 3: 60}
    strategy, messages, locals_, arrays, sent = _run_round(FederatedSettings(clients=3, partition="iid"),
                                                           samples, compress=False)
    expected = _hand_fedavg(locals_, samples)
    got = {k: v.numpy() for k, v in arrays.items()}
    for k in GLOBAL:
        err = float(np.abs(got[k] - expected[k]).max())
        assert err < 1e-6, f"{k}: FedAvg differs from the sample-weighted mean by {err:.2e}"
    rnd = strategy.rounds[1]
    assert rnd["bytes_up"] == sent and rnd["replies"] == 3
    assert rnd["bytes_down"] == sum(message_bytes(m) for m in messages)
    assert sorted(c["samples"] for c in strategy.clients) == [10, 30, 60]


def test_int8_updates_average_within_half_a_scale_of_the_float_result() -> None:
    samples = {1: 30, 2: 10, 3: 60}
    settings = FederatedSettings(clients=3, partition="iid", compress="int8")
    strategy, _, locals_, arrays, sent = _run_round(settings, samples, compress=True)
    expected = _hand_fedavg(locals_, samples)
    total = sum(samples.values())
    for k in GLOBAL:
        # Each client's error is at most scale/2 per element; FedAvg averages them with the same weights.
        scales = {n: encode_update(locals_[n], GLOBAL)[k + SCALE_SUFFIX] for n in samples}
        bound = sum(samples[n] / total * float(np.max(scales[n])) / 2 for n in samples) + 1e-6
        err = float(np.abs(arrays[k].numpy() - expected[k]).max())
        assert err <= bound, f"{k}: int8 FedAvg error {err:.2e} > bound {bound:.2e}"
    rnd = strategy.rounds[1]
    assert rnd["bytes_up"] == sent < rnd["float_bytes_up"]


def test_dp_wrapper_sends_the_clipping_norm_to_clients() -> None:
    strategy = build_strategy(FederatedSettings(clients=2, partition="iid", dp_clip=0.5, dp_noise=0.0))
    messages = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                                             ConfigRecord(), FakeGrid([1, 2])))
    assert [float(m.content["config"][KEY_CLIPPING_NORM]) for m in messages] == [0.5, 0.5]


def _train_message(config: dict) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
                          "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=1, message_type="train")


def _fake_train(msg: Message, ctx: Context) -> Message:
    """A client whose update is large (norm ~ 46), so clipping to 0.2 has work to do."""
    arrays = {k: v + np.float32(1.0) for k, v in GLOBAL.items()}
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 5})})
    return Message(content=content, reply_to=msg)


@pytest.mark.parametrize("clip", [None, 0.2])
def test_client_mods_clip_then_compress(clip: float | None) -> None:
    config = {"edgekiln-compress": "int8", "edgekiln-granularity": "tensor"}
    if clip is not None:
        config[KEY_CLIPPING_NORM] = clip
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    msg = _train_message(config)
    out = int8_update_mod(msg, ctx, lambda m, c: optional_clipping_mod(m, c, _fake_train))
    assert list(out.content.array_records) == [COMPRESSED_KEY]
    payload = {k: v.numpy() for k, v in out.content.array_records[COMPRESSED_KEY].items()}
    assert payload["w"].dtype == np.int8
    delta = np.concatenate([(payload[k].astype(np.float32) * payload[k + SCALE_SUFFIX]).ravel() for k in GLOBAL])
    norm = float(np.linalg.norm(delta))
    want = clip if clip is not None else float(np.sqrt(2080.0))   # 2,080 elements, each moved by 1.0
    # int8 adds at most scale/2 per element: sqrt(2080) * scale / 2 in norm.
    tol = np.sqrt(2080) * max(float(payload[k + SCALE_SUFFIX]) for k in GLOBAL) / 2
    assert abs(norm - want) <= tol, f"clip {clip}: update norm {norm:.4f}, expected {want:.4f} +- {tol:.4f}"


def test_no_compression_requested_leaves_the_reply_alone() -> None:
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    out = int8_update_mod(_train_message({}), ctx, lambda m, c: optional_clipping_mod(m, c, _fake_train))
    assert list(out.content.array_records) == ["arrays"]


def test_dp_noise_on_the_aggregate_has_the_stated_std() -> None:
    # Flower's client-side-clipping wrapper adds N(0, (noise * clip / sampled)^2) to the aggregate.
    np.random.seed(0)  # noqa: NPY002 - Flower draws the noise from numpy's global generator
    samples = {1: 30, 2: 10, 3: 60}
    settings = FederatedSettings(clients=3, partition="iid", dp_clip=0.3, dp_noise=1.0)
    _, _, locals_, arrays, _ = _run_round(settings, samples, compress=False)
    expected = _hand_fedavg(locals_, samples)
    noise = np.concatenate([(arrays[k].numpy() - expected[k]).ravel() for k in GLOBAL])
    want = 1.0 * 0.3 / 3
    # 2,080 draws: the sample std is within 5% of the true one with overwhelming probability.
    assert abs(noise.std() / want - 1) < 0.05, f"noise std {noise.std():.4f}, expected {want:.4f} (seed 0)"
    assert abs(noise.mean()) < 4 * want / np.sqrt(noise.size), f"noise mean {noise.mean():.5f}"
