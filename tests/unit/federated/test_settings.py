"""Federated settings: one config, carried as Flower's run config, validated on construction."""

from __future__ import annotations

import pytest

from edgekiln.errors import EdgekilnError
from edgekiln.federated.deployment import write_flower_app
from edgekiln.federated.settings import FederatedSettings


def test_run_config_round_trip_keeps_types_and_none() -> None:
    s = FederatedSettings(clients=5, rounds=3, partition="dirichlet:0.3", strategy="fedprox", proximal_mu=0.1,
                          compress="int8", granularity="tensor", dp_clip=1.5, dp_noise=0.8, seed=4)
    config = s.to_run_config()
    assert config["edgekiln-dp-clip"] == 1.5 and config["edgekiln-init"] == ""
    assert FederatedSettings.from_run_config(config) == s
    assert FederatedSettings.from_run_config(FederatedSettings().to_run_config()).dp_clip is None


def test_flower_app_folder_carries_the_settings_as_run_config(tmp_path) -> None:
    import tomllib

    s = FederatedSettings(clients=3, rounds=1, partition="iid", compress="int8")
    app = write_flower_app(tmp_path / "app", s, out_dir=tmp_path / "out")
    project = tomllib.loads((app / "pyproject.toml").read_text())
    flwr = project["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "edgekiln_flower.server:app", "clientapp": "edgekiln_flower.client:app"}
    assert FederatedSettings.from_run_config(flwr["config"]) == s
    assert flwr["config"]["out-dir"] == str((tmp_path / "out").resolve())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"clients": 0}, "--clients"), ({"rounds": 0}, "--rounds"), ({"strategy": "fedsgd"}, "--strategy"),
    ({"compress": "int4"}, "--compress"), ({"partition": "dirichlet:0"}, "--partition"),
    ({"dp_noise": 1.0}, "--dp-noise needs --dp-clip"), ({"dp_clip": -1.0}, "--dp-clip"),
    ({"fraction_train": 0.0}, "--fraction-train"), ({"granularity": "row"}, "--granularity"),
])
def test_bad_settings_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(EdgekilnError, match=message):
        FederatedSettings(**kwargs)


def test_unknown_run_config_key_is_rejected() -> None:
    with pytest.raises(EdgekilnError, match="edgekiln-rounnds"):
        FederatedSettings.from_run_config({"edgekiln-rounnds": 3})


def test_cosine_round_lr_goes_from_lr_to_a_tenth() -> None:
    from edgekiln.federated.strategy import round_lr

    s = FederatedSettings(rounds=10, lr=0.03, lr_decay="cosine")
    lrs = [round_lr(s, r) for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.03) and lrs[-1] == pytest.approx(0.003)
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False)), lrs
    assert round_lr(FederatedSettings(rounds=10, lr=0.03, lr_decay="none"), 7) == 0.03
