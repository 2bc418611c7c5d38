"""``edgekiln federate`` as a library call: simulate, optionally compare, write the run folder.

>>> from edgekiln.federated.settings import FederatedSettings
>>> r = federate(FederatedSettings(clients=3, rounds=2, partition="iid"), "runs/fed", quiet=True)  # doctest: +SKIP
>>> r["accuracy"], r["traffic"]["bytes_up"]  # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError
from edgekiln.federated.settings import FederatedSettings


def federate(settings: FederatedSettings, out_dir: str | Path, *, centralized: bool = False, cpus: int = 2,
             quiet: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Run ``settings`` on Flower's simulation engine and write the run folder; return report.json's data.

    With ``centralized``, the same model is also trained on the union of the clients' data
    (the example's own recipe, as many passes over the data as the federated run made), and
    report.json gets a ``centralized`` block to compare against.
    """
    from edgekiln.federated.report import write_run_folder
    from edgekiln.federated.simulation import simulate

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EdgekilnError(f"{out}: exists and is not a folder")
    result, seconds = simulate(settings, cpus=cpus, quiet=quiet, verbose=verbose)
    extra = {"centralized": centralized_baseline(settings, quiet=quiet)} if centralized else None
    return write_run_folder(out, result, runtime="simulation", wall_seconds=seconds, extra=extra)


def centralized_baseline(settings: FederatedSettings, *, quiet: bool = True) -> dict[str, Any]:
    """Train the same model from the same initialization on all training data, no federation.

    Epochs = ``rounds * local_epochs`` (the passes each sample made in the federated run);
    optimizer, batch size and augmentation are the example's own (``edgekiln example``).
    """
    from edgekiln.federated.task import accuracy_and_loss, build_model, example_splits
    from edgekiln.models.examples import EXAMPLES
    from edgekiln.models.training import train_classifier

    spec = EXAMPLES[settings.example]
    data = example_splits(settings.example, settings.seed)
    model = build_model(settings.example, settings.seed, settings.init)
    epochs = settings.rounds * settings.local_epochs
    start = time.perf_counter()
    train_classifier(model, data.train_x, data.train_y, epochs=epochs, batch_size=spec.batch_size, lr=spec.lr,
                     seed=settings.seed, quiet=quiet, augment=spec.augment, description="centralized")
    acc, loss = accuracy_and_loss(model, data.eval_x, data.eval_y)
    return {"accuracy": acc, "loss": loss, "epochs": epochs, "batch_size": spec.batch_size, "lr": spec.lr,
            "samples": len(data.train_y), "seconds": round(time.perf_counter() - start, 2)}
