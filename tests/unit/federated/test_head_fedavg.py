"""FedAvg over classifier heads: the exact weighted mean, the uplink payload (deltas of the head only,
float32 or int8 within scale/2), growing heads, and the averaged head written into a run folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.federated.head_fedavg import (
    decode_head,
    encode_head,
    fedavg_heads,
    grown_reference,
    payload_bytes,
)


def _head(rng: np.random.Generator, classes: int = 10, dim: int = 128) -> dict[str, np.ndarray]:
    return {"fc.weight": rng.standard_normal((classes, dim)).astype(np.float32),
            "fc.bias": rng.standard_normal(classes).astype(np.float32)}


def test_fedavg_heads_is_the_weighted_mean_in_float64() -> None:
    rng = np.random.default_rng(0)
    heads = [_head(rng) for _ in range(5)]
    weights = [20, 3, 7, 1, 40]
    avg = fedavg_heads(heads, weights)
    for name in heads[0]:
        expected = sum(np.float64(w) * h[name].astype(np.float64) for w, h in zip(weights, heads, strict=True))
        expected = expected / np.float64(sum(weights))
        err = float(np.abs(avg[name] - expected).max())
        assert avg[name].dtype == np.float64 and err == 0.0, f"{name}: max |avg - float64 mean| = {err} (want 0)"
    # equal weights and identical heads give the head back exactly
    same = fedavg_heads([heads[0]] * 3, [1, 1, 1])
    assert all(np.array_equal(same[k], heads[0][k].astype(np.float64)) for k in heads[0])


def test_fedavg_heads_refuses_mismatched_clients() -> None:
    rng = np.random.default_rng(1)
    a, b = _head(rng, 10), _head(rng, 9)
    with pytest.raises(EdgekilnError, match="differs in shape"):
        fedavg_heads([a, b], [1, 1])
    with pytest.raises(EdgekilnError, match="weights"):
        fedavg_heads([a, a], [0, 0])
    with pytest.raises(EdgekilnError, match="2 updates for 1 weights"):
        fedavg_heads([a, a], [1])


def test_int8_payload_round_trip_is_within_half_a_scale_and_only_holds_the_head() -> None:
    rng = np.random.default_rng(2)
    base = _head(rng, classes=8)
    local = {k: v.copy() for k, v in _head(rng, classes=10).items()}
    local["fc.weight"][:8] = base["fc.weight"] + 0.01 * rng.standard_normal((8, 128)).astype(np.float32)
    payload = encode_head(local, base, compress="int8", granularity="channel")
    assert set(payload) == {"fc.weight", "fc.weight::scale", "fc.bias", "fc.bias::scale"}, sorted(payload)
    assert payload["fc.weight"].dtype == np.int8 and payload["fc.weight"].shape == (10, 128)
    # 10x128 int8 + 10 row scales + 10 int8 biases + 1 bias scale (float32)
    assert payload_bytes(payload) == 1280 + 40 + 10 + 4 == 1334, payload_bytes(payload)
    back = decode_head(payload, base)
    for name, value in local.items():
        scale = payload[name + "::scale"]
        bound = (scale.reshape(-1, 1) if value.ndim == 2 else scale) / 2
        err = np.abs(back[name] - value)
        assert np.all(err <= bound * (1 + 1e-6)), f"{name}: max error {err.max():.3g} > scale/2 {np.max(bound):.3g}"
    fp = encode_head(local, base)
    assert payload_bytes(fp) == (1280 + 10) * 4 == 5160, payload_bytes(fp)
    ref = grown_reference(base, {k: v.shape for k, v in local.items()})
    for name, value in decode_head(fp, base).items():
        # float32 (local - ref) + ref: off by at most one rounding of the larger operand
        ulp = np.spacing(np.maximum(np.abs(local[name]), np.abs(ref[name])))
        err = np.abs(value - local[name])
        assert np.all(err <= ulp), f"{name}: float32 round trip off by {(err / ulp).max():.2f} ulp (max 1)"


def test_grown_reference_pads_new_rows_with_zeros_and_refuses_shrinking() -> None:
    base = {"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}
    ref = grown_reference(base, {"w": (4, 3), "b": (4,)})
    assert ref["w"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0]] and ref["b"].tolist() == [1, 1, 0, 0]
    with pytest.raises(EdgekilnError, match="cannot grow"):
        grown_reference(base, {"w": (1, 3), "b": (2,)})


@pytest.fixture(scope="module")
def head_bundle(tmp_path_factory):
    from edgekiln.fileio import atomic_save_npz, atomic_write_json
    from edgekiln.runtime.bundle import build_bundle
    from edgekiln.testing.streams import class_clusters
    from edgekiln.testing.tiny import tiny_head_onnx

    d = tmp_path_factory.mktemp("heads")
    run = d / "run"
    run.mkdir()
    tiny_head_onnx(run / "model.onnx", classes=8, seed=0)
    x, y = class_clusters(4, classes=tuple(range(8)), seed=3)
    atomic_save_npz(run / "eval.npz", x=x, y=y)
    atomic_save_npz(run / "calib.npz", x=x, y=y)
    atomic_write_json(run / "report.json", {"artifact": "model.onnx", "metric": 0.9, "latency_ms": 0.1})
    build_bundle([run], d / "bundle")
    return d


def test_devices_send_only_head_deltas_and_the_mean_is_written_like_write_params(head_bundle) -> None:
    import onnx

    from edgekiln.federated.head_fedavg import apply_heads, base_head, head_client_train
    from edgekiln.runtime.head_split import find_tail, write_params
    from edgekiln.runtime.learner import LearnConfig
    from edgekiln.testing.streams import class_clusters

    run, bundle = head_bundle / "run", head_bundle / "bundle"
    base = base_head(run / "model.onnx")
    proto = onnx.load(str(run / "model.onnx"))
    spec = find_tail(proto)
    payloads, weights = [], []
    for device in range(3):
        x, y = class_clusters(3 + device, classes=(0, 1, 8, 9), seed=10 + device)
        payload = head_client_train(bundle, x, y, LearnConfig(steps=5, seed=device), compress="int8")
        w, b = spec.layers[-1].weight, spec.layers[-1].bias
        assert set(payload) == {w, w + "::scale", b, b + "::scale"}, sorted(payload)
        # grown 8 -> 10 classes of a 24-wide head: int8 rows, a scale per row, int8 biases and one scale
        assert payload_bytes(payload) == 10 * 24 + 10 * 4 + 10 + 4 == 294, payload_bytes(payload)
        payloads.append(decode_head(payload, base))
        weights.append(len(y))
    mean = {k: v.astype(np.float32) for k, v in fedavg_heads(payloads, weights).items()}
    out = apply_heads(run, mean, head_bundle / "fed_run")
    expected = write_params(proto, spec, mean, calib_features=None).SerializeToString()
    assert (out / "model.onnx").read_bytes() == expected, "apply_heads wrote something else than write_params"
    assert (out / "eval.npz").is_file() and (out / "report.json").is_file(), sorted(p.name for p in out.iterdir())
    with pytest.raises(EdgekilnError, match="already exists"):
        apply_heads(run, mean, out)


def test_apply_heads_puts_the_head_into_model_pt(head_bundle, tmp_path) -> None:
    import io

    import torch

    from edgekiln.federated.head_fedavg import apply_heads, base_head

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.onnx").write_bytes((head_bundle / "run" / "model.onnx").read_bytes())
    state = {"0.weight": torch.zeros(4, 1, 3, 3), "0.bias": torch.zeros(4), "3.weight": torch.zeros(24, 16),
             "3.bias": torch.zeros(24), "5.weight": torch.zeros(8, 24), "5.bias": torch.zeros(8)}
    buf = io.BytesIO()
    torch.save(state, buf)
    (run / "model.pt").write_bytes(buf.getvalue())
    head = base_head(run / "model.onnx")
    grown = {k: np.concatenate([v, np.full((2, *v.shape[1:]), 0.5, np.float32)]) for k, v in head.items()}
    out = apply_heads(run, grown, tmp_path / "out")
    new = torch.load(io.BytesIO((out / "model.pt").read_bytes()), weights_only=True)
    (wname, w), (bname, b) = sorted(grown.items(), key=lambda kv: -kv[1].ndim)
    assert np.array_equal(new["5.weight"].numpy(), w) and np.array_equal(new["5.bias"].numpy(), b), (wname, bname)
    assert torch.equal(new["3.weight"], state["3.weight"]), "an earlier Linear was changed"


class InProcessGrid:
    """Flower's Grid for the strategy's ``start``: every message goes to the head ClientApp's train
    function (with its mods) in this process, node ``i`` holding ``data[i]``. No Ray, no network."""

    def __init__(self, data: list[Path]) -> None:
        self.data = data

    def get_node_ids(self) -> list[int]:
        return list(range(1, len(self.data) + 1))

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, RecordDict

        from edgekiln.federated.client_app import int8_update_mod, optional_clipping_mod, train_head

        replies = []
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            ctx = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": node - 1, "num-partitions": len(self.data),
                                       "data-path": str(self.data[node - 1])})
            replies.append(int8_update_mod(msg, ctx, lambda m, c: optional_clipping_mod(m, c, train_head)))
        return replies


def test_head_rounds_through_the_strategy_chain_write_a_grown_run_folder(head_bundle, tmp_path,
                                                                         _task_identity) -> None:
    import json

    import onnx

    from edgekiln.federated.head_fedavg import write_head_run
    from edgekiln.federated.server_app import run_server_head
    from edgekiln.federated.settings import FederatedSettings, HeadSettings
    from edgekiln.fileio import atomic_save_npz
    from edgekiln.testing.streams import class_clusters

    data = []
    for i in range(3):
        x, y = class_clusters(4, classes=(0, 3, 8, 9), seed=20 + i)
        data.append(atomic_save_npz(tmp_path / f"node{i}.npz", x=x, y=y))
    settings = FederatedSettings(example="digits", clients=3, rounds=2, partition="iid", compress="int8",
                                 init=str(head_bundle / "run"), scope="head",
                                 head=HeadSettings(bundle=str(head_bundle / "bundle"), new_classes="8,9", steps=5))
    result = run_server_head(InProcessGrid(data), settings)
    assert [h["round"] for h in result.history] == [0, 1, 2], result.history
    assert all(h["replies"] == 3 for h in result.history[1:]), result.history
    w = next(k for k, v in result.state_dict.items() if v.ndim == 2 and v.shape[0] == 10)
    assert result.state_dict[w].shape == (10, 24), {k: v.shape for k, v in result.state_dict.items()}
    # int8 uplink of the head tensors only: smaller than the same replies with float32 heads
    up, float_up = result.history[1]["bytes_up"], result.history[1]["float_bytes_up"]
    assert up < float_up, f"round 1 uplink {up} B vs {float_up} B as float32"
    report = write_head_run(tmp_path / "fed", result, runtime="test", wall_seconds=0.0)
    out = onnx.load(str(tmp_path / "fed" / "model.onnx")).graph.output[0]
    assert out.type.tensor_type.shape.dim[1].dim_value == 10, out
    assert report["federated"]["scope"] == "head" and report["accuracy"] == result.history[-1]["accuracy"]
    assert json.loads((tmp_path / "fed" / "report.json").read_text())["federated"]["rounds"] == result.history


def test_head_settings_travel_as_run_config_and_bad_ones_are_user_errors() -> None:
    from edgekiln.federated.settings import FederatedSettings, HeadSettings

    s = FederatedSettings(scope="head", head=HeadSettings(bundle="b", new_classes="8,9", tail="last-block", steps=7,
                                                          lr=0.01, distill=0.5))
    config = s.to_run_config()
    assert config["edgekiln-head-tail"] == "last-block" and config["edgekiln-scope"] == "head", config
    assert FederatedSettings.from_run_config(config) == s
    assert FederatedSettings(**s.to_dict()) == s and s.head.classes() == (8, 9)
    for kwargs, needle in [({"scope": "layers"}, "--scope 'layers'"), ({"scope": "head"}, "needs --bundle")]:
        with pytest.raises(EdgekilnError, match=needle):
            FederatedSettings(**kwargs)
    for kwargs, needle in [({"tail": "conv"}, "--head-tail"), ({"steps": 0}, "--head-steps"),
                           ({"new_classes": "8,x"}, "--new-classes")]:
        with pytest.raises(EdgekilnError, match=needle):
            HeadSettings(**kwargs)


@pytest.mark.parametrize(("args", "needle"), [
    (["--scope", "head"], "--scope head needs --bundle"),
    (["--scope", "head", "--bundle", "b", "--centralized"], "--scope head runs in simulation only"),
    (["--scope", "head", "--bundle", "b"], "--scope head needs --init"),
])
def test_federate_scope_head_flags_exit_2_with_one_line(args, needle, tmp_path, capsys) -> None:
    from edgekiln.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(["federate", "--out", str(tmp_path / "run"), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and needle in err and len(err.splitlines()) == 1, (exc.value.code, err)


def test_head_start_refuses_new_classes_that_do_not_follow_the_model(head_bundle) -> None:
    from edgekiln.federated.head_fedavg import head_start
    from edgekiln.federated.settings import HeadSettings

    model, head = head_start(HeadSettings(bundle=str(head_bundle / "bundle"), new_classes="8,9"))
    assert sorted(v.shape for v in head.values()) == [(10,), (10, 24)], {k: v.shape for k, v in head.items()}
    with pytest.raises(EdgekilnError, match="expected 8"):
        head_start(HeadSettings(bundle=str(head_bundle / "bundle"), new_classes="9"))
