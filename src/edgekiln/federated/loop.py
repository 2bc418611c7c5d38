"""Closing the loop: federated model -> ``edgekiln optimize`` (the deployment's recipe) -> bundle ->
published to the update server as the model's next version, for the fleet's agents to install.

The recipe is the one the previous deployment was optimized with; only its ``model`` is
replaced by the federated run folder (and data paths it names are kept). The version is one
above the highest the server holds for the model, unless given.

>>> close_loop("runs/fed", "recipe.yaml", "runs/fed/loop", server="http://fleet:8080",  # doctest: +SKIP
...            token=ADMIN, model_name="mnist")["published"]["version"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekiln.errors import EdgekilnError


def close_loop(run_dir: str | Path, recipe: str | Path, out_dir: str | Path, *, server: str, token: str,
               model_name: str, version: int | None = None, channel: str = "stable",
               rollout_group: str | None = None, quiet: bool = True, transport: Any = None,
               tls: Any = None) -> dict[str, Any]:
    """Optimize the federated model with ``recipe``, bundle the selected model, publish it; with
    ``rollout_group``, also start a rollout of the new version to that device group (all at once).
    ``tls`` (a :class:`~edgekiln.runtime.transport_security.TlsOptions`) for an https server's CA.

    Writes ``out_dir/optimize`` (optimize's run folder), ``out_dir/bundle`` and
    ``out_dir/loop.json``; returns loop.json's data.
    """
    from edgekiln.fileio import atomic_write_json
    from edgekiln.fleet.client import list_models, publish, rollout_start
    from edgekiln.runtime.bundle import build_bundle

    run_dir, out = Path(run_dir), Path(out_dir)
    if version is None:
        # NOTE: asked before optimizing, so a bad URL or token fails in seconds, not after the search.
        held = [int(m["version"]) for m in list_models(server, token, transport=transport, tls=tls) if m["model"] == model_name]
        version = max(held, default=0) + 1
    found = optimize_only(run_dir, recipe, out, quiet=quiet)
    manifest = build_bundle([out / "optimize"], out / "bundle", name=model_name, version=str(version))
    record = publish(out / "bundle", server, token, channel, model=model_name, version=version,
                     transport=transport, tls=tls)
    rollout = (rollout_start(server, token, model_name, version, rollout_group, transport=transport, tls=tls)
               if rollout_group else None)
    data = {**found, "bundle": str(out / "bundle"),
            "variants": [v.name for v in manifest.variants], "published": record,
            "rollout": rollout}
    atomic_write_json(out / "loop.json", data)
    return data


def optimize_only(run_dir: str | Path, recipe: str | Path, out_dir: str | Path, *, quiet: bool = True) -> dict[str, Any]:
    """``edgekiln optimize`` of the federated run folder with ``recipe`` into ``out_dir/optimize``."""
    from edgekiln.search.optimize import optimize
    from edgekiln.search.recipe import Recipe, load_recipe

    run_dir, out = Path(run_dir), Path(out_dir)
    from edgekiln.models.run_folder import RunFolder

    RunFolder(run_dir).read()  # one-line error when it holds no model
    if (out / "optimize").exists():
        raise EdgekilnError(f"{out / 'optimize'}: exists; choose a new folder")
    rec = Recipe.from_dict({**load_recipe(recipe).to_dict(), "model": str(run_dir)})
    result = optimize(rec, out / "optimize", quiet=quiet)
    if result.selected is None:
        raise EdgekilnError(f"optimize of {run_dir} selected no model (interrupted?)")
    return {"run": str(run_dir), "recipe": str(recipe), "selected": result.selected.label,
            "metric": result.selected.metric, "baseline_metric": result.baseline.metric,
            "optimize": str(out / "optimize")}
