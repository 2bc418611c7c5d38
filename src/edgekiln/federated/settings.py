"""The settings of one federated run, shared by the ServerApp, the ClientApp and the CLI.

One frozen config; it travels as Flower's run config (flat ``key = value`` pairs, what
``flwr run --run-config`` overrides) and the ClientApp receives the part it needs in each
round's ``ConfigRecord``, so simulation and deployment read the same values.

>>> s = FederatedSettings(clients=3, rounds=2, partition="iid")
>>> FederatedSettings.from_run_config(s.to_run_config()) == s
True
>>> h = FederatedSettings(scope="head", head=HeadSettings(bundle="b", new_classes="8,9"))
>>> h.to_run_config()["edgekiln-head-new-classes"], FederatedSettings.from_run_config(h.to_run_config()) == h
('8,9', True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.federated.compression import GRANULARITIES
from edgekiln.federated.partition import PartitionSpec

STRATEGIES = ("fedavg", "fedprox")
OPTIMIZERS = ("sgd", "adam")
LR_DECAYS = ("cosine", "none")
COMPRESSIONS = ("none", "int8")
SCOPES = ("model", "head")
HEAD_SCOPES = ("head", "last-block")
SETTINGS_VERSION = 1
_PREFIX = "edgekiln-"
_HEAD_PREFIX = _PREFIX + "head-"


@dataclass(frozen=True, kw_only=True)
class HeadSettings:
    """What a device trains when only heads are federated (``--scope head``): numpy, no torch.

    Its fields travel as ``edgekiln-head-*`` run-config keys.
    """

    bundle: str | None = None     # the deployed bundle whose default variant's head the devices train
    new_classes: str = ""         # classes the head grows by, e.g. "8,9" (must follow the model's classes)
    tail: str = "head"            # what trains: the last dense layer ('head') or the last two ('last-block')
    steps: int = 100              # full-batch optimizer steps per round on each device
    lr: float = 3e-3              # Adam learning rate of the head
    distill: float = 0.0          # weight of distillation on the round's starting logits (0: off)

    def __post_init__(self) -> None:
        checks = [
            (self.tail in HEAD_SCOPES, f"--head-tail {self.tail!r}: known {', '.join(HEAD_SCOPES)}"),
            (self.steps >= 1, f"--head-steps must be at least 1, got {self.steps}"),
            (self.lr > 0, f"--head-lr must be positive, got {self.lr}"),
            (self.distill >= 0, f"--head-distill must be >= 0, got {self.distill}"),
        ]
        for ok, message in checks:
            if not ok:
                raise EdgekilnError(message)
        self.classes()

    def classes(self) -> tuple[int, ...]:
        """``new_classes`` as integers (``"8,9"`` -> ``(8, 9)``)."""
        try:
            return tuple(int(c) for c in self.new_classes.split(",") if c.strip())
        except ValueError:
            raise EdgekilnError(f"--new-classes {self.new_classes!r}: give class numbers, e.g. 8,9") from None


@dataclass(frozen=True, kw_only=True)
class FederatedSettings:
    """What a federated fine-tuning run does. Every field is one ``--flag`` of ``edgekiln federate``."""

    version: int = SETTINGS_VERSION
    example: str = "mnist"            # built-in example whose model and data are used
    clients: int = 20                 # number of clients (SuperNodes); each holds one partition
    rounds: int = 10                  # federated rounds
    partition: str = "dirichlet:0.5"  # 'iid' or 'dirichlet:ALPHA' over the training part
    strategy: str = "fedavg"          # Flower strategy: fedavg or fedprox
    proximal_mu: float = 0.01         # FedProx proximal weight (ignored by fedavg)
    local_epochs: int = 5             # passes over its partition per round on each client
    optimizer: str = "sgd"            # client optimizer: sgd (momentum 0.9) or adam (cosine decay)
    lr: float = 0.05                  # client learning rate (of round 1)
    lr_decay: str = "cosine"          # over the rounds: none, or cosine down to lr / 10 in the last round
    batch_size: int = 32              # client mini-batch
    fraction_train: float = 1.0       # share of clients sampled each round
    compress: str = "none"            # uplink update compression: none or int8
    granularity: str = "channel"      # int8 scales: per 'tensor' or per output 'channel'
    dp_clip: float | None = None      # client-side update clipping norm (Flower's fixedclipping_mod)
    dp_noise: float = 0.0             # Gaussian noise multiplier added to the aggregate (with dp_clip)
    seed: int = 0                     # data split, partition, initialization, client shuffling
    init: str | None = None           # run folder with model.pt to fine-tune (None: fresh init)
    scope: str = "model"              # what clients train and send: the whole 'model' (torch) or the 'head' (numpy)
    head: HeadSettings = dataclasses.field(default_factory=HeadSettings)  # the head mode's settings

    def __post_init__(self) -> None:
        if isinstance(self.head, Mapping):  # from to_dict()
            object.__setattr__(self, "head", HeadSettings(**self.head))
        if self.version != SETTINGS_VERSION:
            raise EdgekilnError(f"federated settings version {self.version} is not supported "
                                f"(this edgekiln reads version {SETTINGS_VERSION})")
        PartitionSpec.parse(self.partition)
        checks = [
            (self.clients >= 1, f"--clients must be at least 1, got {self.clients}"),
            (self.rounds >= 1, f"--rounds must be at least 1, got {self.rounds}"),
            (self.local_epochs >= 1, f"--local-epochs must be at least 1, got {self.local_epochs}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (0 < self.fraction_train <= 1, f"--fraction-train must be in (0, 1], got {self.fraction_train}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer!r}: known {', '.join(OPTIMIZERS)}"),
            (self.lr_decay in LR_DECAYS, f"--lr-decay {self.lr_decay!r}: known {', '.join(LR_DECAYS)}"),
            (self.strategy in STRATEGIES, f"--strategy {self.strategy!r}: known {', '.join(STRATEGIES)}"),
            (self.compress in COMPRESSIONS, f"--compress {self.compress!r}: known {', '.join(COMPRESSIONS)}"),
            (self.granularity in GRANULARITIES,
             f"--granularity {self.granularity!r}: known {', '.join(GRANULARITIES)}"),
            (self.proximal_mu >= 0, f"--proximal-mu must be >= 0, got {self.proximal_mu}"),
            (self.dp_clip is None or self.dp_clip > 0, f"--dp-clip must be positive, got {self.dp_clip}"),
            (self.dp_noise >= 0, f"--dp-noise must be >= 0, got {self.dp_noise}"),
            (self.dp_noise == 0 or self.dp_clip is not None, "--dp-noise needs --dp-clip (noise is scaled by it)"),
            (self.scope in SCOPES, f"--scope {self.scope!r}: known {', '.join(SCOPES)}"),
            (self.scope != "head" or bool(self.head.bundle), "--scope head needs --bundle (the deployed bundle)"),
        ]
        for ok, message in checks:
            if not ok:
                raise EdgekilnError(message)

    @property
    def sampled_clients(self) -> int:
        """Clients sampled per round, as Flower's FedAvg computes it (at least 2)."""
        return min(self.clients, max(int(self.clients * self.fraction_train), 2))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_run_config(self) -> dict[str, Any]:
        """Flat Flower run config (``None`` becomes ``""``: Flower config values cannot be null);
        the head settings as ``edgekiln-head-*`` keys."""
        flat = {k: v for k, v in self.to_dict().items() if k != "head"}
        flat.update({"head-" + k: v for k, v in dataclasses.asdict(self.head).items()})
        return {_PREFIX + k.replace("_", "-"): ("" if v is None else v) for k, v in flat.items()}

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> FederatedSettings:
        values = _values(cls, {k: v for k, v in config.items() if not k.startswith(_HEAD_PREFIX)}, _PREFIX)
        head = _values(HeadSettings, {k: v for k, v in config.items() if k.startswith(_HEAD_PREFIX)}, _HEAD_PREFIX)
        return cls(**values, head=HeadSettings(**head))


def _values(cls: Any, config: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in config.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):].replace("-", "_")
        if name not in types or name == "head":
            raise EdgekilnError(f"run config key {key!r} is not a federated setting")
        values[name] = _coerce(name, raw, str(types[name]))
    return values


def _coerce(name: str, raw: Any, type_name: str) -> Any:
    if raw == "" and "None" in type_name:
        return None
    if type_name.startswith("int"):
        return int(raw)
    if type_name.startswith("float"):
        return float(raw)
    return str(raw)
