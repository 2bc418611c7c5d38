"""Benchmark case: federated fine-tuning with Flower vs centralized training, and int8 updates.

20 simulated clients hold Dirichlet(0.5) label-skewed partitions of the 4,000 MNIST training
samples; 10 rounds on Flower's simulation engine (Ray, 2 CPUs). Runs: FedAvg, FedAvg with int8
update compression, FedProx; plus centralized training of the same model from the same
initialization on the union of the clients' data, for as many passes over the data.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from benchmarks.suite import CaseResult
from edgekiln.report import md_table

CLIENTS, ROUNDS, PARTITION = 20, 10, "dirichlet:0.5"


def federated(work: Path, quick: bool) -> CaseResult:
    from edgekiln.federated.run import federate
    from edgekiln.federated.settings import FederatedSettings

    clients, rounds = (5, 2) if quick else (CLIENTS, ROUNDS)
    if work.exists():
        shutil.rmtree(work)
    base = FederatedSettings(clients=clients, rounds=rounds, partition=PARTITION, seed=0)
    runs: dict[str, dict[str, Any]] = {}
    variants = {
        "FedAvg": (base, True),
        "FedAvg + int8 updates": (FederatedSettings(**{**base.to_dict(), "compress": "int8"}), False),
        "FedProx (mu 0.01)": (FederatedSettings(**{**base.to_dict(), "strategy": "fedprox"}), False),
    }
    for i, (label, (settings, centralized)) in enumerate(variants.items()):
        runs[label] = federate(settings, work / f"run{i}", centralized=centralized, quiet=True)
    ref = runs["FedAvg"]
    central = ref["centralized"]
    int8 = runs["FedAvg + int8 updates"]
    rows = [["centralized (same data, same init)", f"{central['accuracy']:.4f}", "-", "-", "-",
             f"{central['seconds']:.0f}"]]
    for label, r in runs.items():
        t = r["traffic"]
        rows.append([label, f"{r['accuracy']:.4f}", f"{(r['accuracy'] - central['accuracy']) * 100:+.2f}",
                     f"{t['bytes_up'] / 1e6:.2f}", f"{t['bytes_down'] / 1e6:.2f}", f"{r['wall_seconds']:.0f}"])
    up_ratio = ref["traffic"]["bytes_up"] / int8["traffic"]["bytes_up"]
    cost = (ref["accuracy"] - int8["accuracy"]) * 100
    s = base
    md = "\n".join([
        f"{clients} clients, {PARTITION} label skew over the 4,000 MNIST training samples (mean total-variation "
        f"distance of a client's label mix to the global one: {ref['partition']['label_skew_tv']:.2f}), "
        f"{rounds} rounds, every client every round; clients train {s.local_epochs} local epochs "
        f"({s.optimizer.upper()} with momentum 0.9, lr {s.lr:g} with {s.lr_decay} decay over the rounds, batch "
        f"{s.batch_size}, augmentation); the server evaluates the "
        "global model on the 1,000 held-out images after each round. Centralized: the example's recipe "
        f"(Adam, cosine, batch {central['batch_size']}), {central['epochs']} epochs = rounds x local epochs. "
        "Flower 1.42 simulation engine, 2 CPUs, one client actor per CPU. Bytes: Flower's `count_bytes` of "
        "every record the messages carry, all rounds.", "",
        md_table(["run", "accuracy", "vs centralized (points)", "uplink MB", "downlink MB", "wall s"], rows), "",
        f"int8 updates (update delta, per-channel scales): uplink {up_ratio:.2f}x smaller than float32 weights, "
        f"accuracy cost {cost:.2f} points (FedAvg {ref['accuracy']:.4f} -> {int8['accuracy']:.4f}; positive = "
        "a loss). Seeded: a rerun gives the same global model bit for bit.",
    ])
    raw = {"clients": clients, "rounds": rounds, "partition": PARTITION, "settings": base.to_dict(),
           "centralized": central, "uplink_ratio_int8": up_ratio, "int8_accuracy_cost_points": cost,
           "runs": {label: {"accuracy": r["accuracy"], "rounds": r["rounds"], "traffic": r["traffic"],
                            "wall_seconds": r["wall_seconds"]} for label, r in runs.items()}}
    return CaseResult("federated", "Federated fine-tuning (Flower): accuracy vs centralized, int8 updates", md, raw)
