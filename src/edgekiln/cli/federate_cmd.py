"""`edgekiln federate`: federated fine-tuning with Flower's simulation engine; writes a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    app.command("federate")(federate_command)


def federate_command(
    out: Path = typer.Option(..., "--out", help="Run folder to write (created if missing)."),
    example: str = typer.Option("mnist", "--example", help="Built-in example whose model and data are used."),
    clients: int = typer.Option(20, "--clients", help="Number of simulated clients (Flower SuperNodes)."),
    rounds: int = typer.Option(10, "--rounds", help="Federated rounds."),
    partition: str = typer.Option("dirichlet:0.5", "--partition",
                                  help="How the training samples are spread: iid or dirichlet:ALPHA (smaller "
                                       "alpha = more label skew)."),
    strategy: str = typer.Option("fedavg", "--strategy", help="Flower strategy: fedavg or fedprox."),
    proximal_mu: float = typer.Option(0.01, "--proximal-mu", help="FedProx proximal term weight."),
    local_epochs: int = typer.Option(5, "--local-epochs", help="Local passes over each client's data per round."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="Client optimizer: sgd (momentum 0.9) "
                                                             "or adam (cosine decay within a round)."),
    lr: float = typer.Option(0.05, "--lr", help="Client learning rate (of round 1)."),
    lr_decay: str = typer.Option("cosine", "--lr-decay", help="Client learning rate over the rounds: cosine "
                                                              "(down to lr/10 in the last round) or none."),
    batch_size: int = typer.Option(32, "--batch-size", help="Client mini-batch size."),
    fraction_train: float = typer.Option(1.0, "--fraction-train", help="Share of clients sampled each round."),
    compress: str = typer.Option("none", "--compress", help="Uplink update compression: none or int8."),
    granularity: str = typer.Option("channel", "--granularity", help="int8 scales per 'tensor' or per 'channel'."),
    dp_clip: float = typer.Option(None, "--dp-clip", help="Clip each client's update to this L2 norm "
                                                          "(central DP, client-side clipping)."),
    dp_noise: float = typer.Option(0.0, "--dp-noise", help="Gaussian noise multiplier on the aggregate "
                                                           "(std = noise * clip / sampled clients)."),
    init: Path = typer.Option(None, "--init", help="Run folder (or model.pt) of the deployed model to fine-tune; "
                                                   "default: a fresh initialization."),
    centralized: bool = typer.Option(False, "--centralized", help="Also train centrally on the same data with "
                                                                  "the same number of passes, for comparison."),
    recipe: Path = typer.Option(None, "--recipe", help="After the last round, optimize the global model with this "
                                                       "recipe (the deployment's; its model is replaced)."),
    publish: str = typer.Option(None, "--publish", help="Update server URL: publish the optimized model as the "
                                                        "next version (needs --recipe)."),
    token: str = typer.Option(None, "--token", envvar="EDGEKILN_ADMIN_TOKEN",
                              help="Admin token for --publish (default: $EDGEKILN_ADMIN_TOKEN)."),
    model_name: str = typer.Option(None, "--model-name", help="Model name on the update server (default: the "
                                                              "example's name)."),
    channel: str = typer.Option("stable", "--channel", help="Channel to publish to."),
    ca: str = typer.Option(None, "--ca", envvar="EDGEKILN_CA",
                           help="With --publish: the CA certificate (PEM) of the server's TLS certificate."),
    insecure_http: bool = typer.Option(False, "--insecure-http", help="With --publish: allow plain http:// to "
                                                                      "another host (the token travels in clear)."),
    rollout_group: str = typer.Option(None, "--rollout-group", help="Also roll the new version out to this "
                                                                    "device group."),
    scope: str = typer.Option("model", "--scope", help="What clients train and send: the whole 'model' (torch) "
                                                       "or only the classifier 'head' of --bundle (numpy, no torch; "
                                                       "needs --init, the deployed model's run folder)."),
    bundle: Path = typer.Option(None, "--bundle", help="With --scope head: the deployed bundle whose default "
                                                       "variant's head the devices train."),
    new_classes: str = typer.Option("", "--new-classes", help="With --scope head: classes the head grows by, "
                                                              "e.g. 8,9 (they must follow the model's classes)."),
    head_tail: str = typer.Option("head", "--head-tail", help="With --scope head: train the last dense layer "
                                                              "('head') or the last two ('last-block')."),
    head_steps: int = typer.Option(100, "--head-steps", help="With --scope head: optimizer steps per round."),
    head_lr: float = typer.Option(3e-3, "--head-lr", help="With --scope head: Adam learning rate of the head."),
    seed: int = typer.Option(0, "--seed", help="Seeds the split, the partition, the initialization and clients."),
    flower_app: Path = typer.Option(None, "--flower-app", help="Instead of simulating: write a Flower App folder "
                                                               "with these settings for `flwr run` against "
                                                               "flower-superlink/flower-supernode, then exit."),
    cpus: int = typer.Option(2, "--cpus", help="CPUs the simulation engine may use (one per client actor)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Flower's and Ray's logs."),
) -> None:
    """Fine-tune a model with federated learning (Flower simulation) and write a run folder."""
    from edgekiln.errors import EdgekilnError
    from edgekiln.federated.run import federate
    from edgekiln.federated.settings import FederatedSettings, HeadSettings

    if cpus < 1:
        raise EdgekilnError(f"--cpus must be at least 1, got {cpus}")
    if publish and not recipe:
        raise EdgekilnError("--publish needs --recipe (the model is optimized before it is shipped)")
    if publish and not token:
        raise EdgekilnError("--publish needs --token (or EDGEKILN_ADMIN_TOKEN)")
    if recipe:
        from edgekiln.search.recipe import load_recipe

        load_recipe(recipe)  # a bad recipe fails now, not after the training
    settings = FederatedSettings(
        example=example, clients=clients, rounds=rounds, partition=partition, strategy=strategy,
        proximal_mu=proximal_mu, local_epochs=local_epochs, optimizer=optimizer, lr=lr, lr_decay=lr_decay,
        batch_size=batch_size, fraction_train=fraction_train, compress=compress, granularity=granularity,
        dp_clip=dp_clip, dp_noise=dp_noise, seed=seed, init=str(init) if init else None, scope=scope,
        head=HeadSettings(bundle=str(bundle) if bundle else None, new_classes=new_classes, tail=head_tail,
                          steps=head_steps, lr=head_lr))
    if flower_app and scope == "model":
        from edgekiln.federated.deployment import write_flower_app

        write_flower_app(flower_app, settings, out_dir=out)
        typer.echo(f"wrote the Flower App {flower_app}/ (the ServerApp writes the run folder to {out}/); run it with "
                   f"`flwr run {flower_app} <superlink-connection> --stream`; SuperNodes need "
                   f"--node-config 'partition-id=I num-partitions={clients}'")
        return
    if scope == "head":
        _federate_heads(settings, out, cpus, quiet, verbose, flower_app, centralized)
    else:
        r = federate(settings, out, centralized=centralized, cpus=cpus, quiet=quiet, verbose=verbose)
        t = r["traffic"]
        typer.echo(f"federated {example}: accuracy {r['initial_accuracy']:.4f} -> {r['accuracy']:.4f} after "
                   f"{rounds} rounds with {clients} clients ({partition}, {strategy}); wall {r['wall_seconds']:.1f} s")
        typer.echo(f"traffic: {t['bytes_down']:,} B down, {t['bytes_up']:,} B up"
                   + (f" ({t['uplink_ratio']:.2f}x less than float32 weights)" if compress != "none" else ""))
        if "centralized" in r:
            typer.echo(f"centralized training on the same data: accuracy {r['centralized']['accuracy']:.4f}")
        typer.echo(f"wrote {out}/: {', '.join(r['files'])}")
    if recipe:
        from edgekiln.runtime.transport_security import TlsOptions

        _close_loop(out, recipe, publish, token, model_name or example, channel, rollout_group, quiet,
                    TlsOptions(ca=ca or None, insecure_http=insecure_http))


def _federate_heads(settings: Any, out: Path, cpus: int, quiet: bool, verbose: bool, flower_app: Path | None,
                    centralized: bool) -> None:
    from edgekiln.errors import EdgekilnError
    from edgekiln.federated.head_fedavg import federate_heads

    if flower_app or centralized:
        raise EdgekilnError("--scope head runs in simulation only, without --centralized (--flower-app and "
                            "--centralized are for --scope model)")
    if not settings.init:
        raise EdgekilnError("--scope head needs --init: the run folder of the deployed model")
    r = federate_heads(settings, out, cpus=cpus, quiet=quiet, verbose=verbose)
    f, t = r["federated"], r["federated"]["traffic"]
    typer.echo(f"federated heads of {settings.head.bundle}: accuracy {f['initial_accuracy']:.4f} -> "
               f"{r['accuracy']:.4f} after {settings.rounds} rounds with {settings.clients} clients; "
               f"wall {f['wall_seconds']:.1f} s")
    typer.echo(f"traffic: {t['bytes_down']:,} B down, {t['bytes_up']:,} B up (head tensors only); wrote {out}/")


def _close_loop(out: Path, recipe: Path, server: str | None, token: str | None, model_name: str, channel: str,
                rollout_group: str | None, quiet: bool, tls: Any) -> None:
    from edgekiln.federated.loop import close_loop, optimize_only

    if server is None:
        res = optimize_only(out, recipe, out / "loop", quiet=quiet)
        typer.echo(f"optimized: {res['selected']} (metric {res['metric']:.4f}); wrote {out / 'loop'}/")
        return
    res = close_loop(out, recipe, out / "loop", server=server, token=str(token), model_name=model_name,
                     channel=channel, rollout_group=rollout_group, quiet=quiet, tls=tls)
    pub = res["published"]
    typer.echo(f"optimized: {res['selected']} (metric {res['metric']:.4f}); published {pub['model']} "
               f"v{pub['version']} to {channel} ({pub['length']:,} B)"
               + (f"; rollout {res['rollout']['id']} to group {rollout_group}" if res["rollout"] else ""))
