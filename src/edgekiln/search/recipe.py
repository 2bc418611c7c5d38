"""The optimize recipe: model, data, metric, target, constraints and the search space.

A recipe is YAML (or the same object built from CLI flags: one code path). It is versioned,
validated on load (unknown keys are errors, pass names must be registered, every option
must be a field of that pass's config) and round-trips: ``Recipe.from_dict(r.to_dict()) == r``.

>>> r = Recipe.from_dict({"model": "runs/mnist", "target": "cortex-m7", "constraints": {"max_drop": 0.01}})
>>> r.constraints.max_drop, r.search.trials
(0.01, 24)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from edgekiln.errors import EdgekilnError

RECIPE_VERSION = 1
PREFERENCES = ("latency", "size", "accuracy")
SAMPLERS = ("tpe", "nsga2", "random", "grid")
EXECUTORS = ("local", "ray")
DEFAULT_TIMEOUT_S = 600.0
AUTO_METRIC = "auto"   # accuracy with labels, cosine without (chosen when the eval data is known)


@dataclass(frozen=True, kw_only=True)
class Constraints:
    """Budgets the selected model must meet. ``None`` means unconstrained."""

    max_drop: float | None = None          # absolute, in the metric's units (0.01 = one accuracy point)
    max_latency_ms: float | None = None    # on the target (estimated; measured for `host`)
    max_ram_bytes: int | None = None       # overrides the profile's RAM
    max_flash_bytes: int | None = None     # overrides the profile's flash

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class PassSpace:
    """One pass in the search: each option maps to the tuple of values to try.

    ``optional`` lets the search also try the pipeline without this pass.
    """

    name: str
    options: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    optional: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "optional": self.optional,
                "options": {k: list(v) for k, v in self.options.items()}}


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    trials: int = 24                 # number of trials (pipelines tried)
    # NOTE: 600 s: with a trial stopped at a sixth of it (100 s), MobileNetV3-small on raspberry-pi-4
    # ran every pipeline of its default space (4 int8 calibrations + fp16) in 449 s on this shared
    # 2-core machine (December 2026). 0 or None: no limit.
    timeout_s: float | None = DEFAULT_TIMEOUT_S  # no new trial near it; a running trial stops at its share
    seed: int = 0
    sampler: str = "tpe"
    workers: int = 1                 # trials in parallel on this machine
    executor: str = "local"          # local | ray
    ray_address: str | None = None   # an existing Ray cluster; None starts a local one
    bench_runs: int = 100            # timed runs per host latency measurement
    # microcontroller targets: write each candidate's C library, run it on the emulated CPU (QEMU, where
    # installed) for the fit and the selection, and give the run folder the selected model's library
    # (c/), its verify-c result and its measure-mcu report; False: the C backend's planned footprint
    # and the profile's estimates only (seconds faster per trial), no c/
    mcu_library: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    version: ClassVar[int] = RECIPE_VERSION

    model: str
    input_shape: tuple[str, ...] = ()  # --input-shape values (NAME=d0,d1 or d0,d1): fix dynamic dims
    calib: str | None = None
    eval: str | None = None
    # NOTE: "auto": accuracy when the evaluation data holds labels ``y``, else cosine against the input
    # model's outputs (search/optimize.py chosen_metric): none of the 22 corpus models' data has labels,
    # and `optimize MODEL --max-drop 0.01` stopped at the FP32 baseline on every one of them.
    metric: str = AUTO_METRIC
    target: str = "host"
    prefer: str = "latency"          # which feasible model wins: fastest on target, smallest, or most accurate
    constraints: Constraints = field(default_factory=Constraints)
    passes: tuple[PassSpace, ...] = ()   # empty: the default space for the model (see search.space)
    search: SearchSettings = field(default_factory=SearchSettings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "model": self.model, "input_shape": list(self.input_shape),
            "calib": self.calib, "eval": self.eval,
            "metric": self.metric, "target": self.target, "prefer": self.prefer,
            "constraints": self.constraints.to_dict(), "passes": [p.to_dict() for p in self.passes],
            "search": self.search.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        data = dict(data)
        version = data.pop("version", RECIPE_VERSION)
        if not isinstance(version, int) or version > RECIPE_VERSION:
            raise EdgekilnError(f"recipe version {version} is not supported (this edgekiln reads version <= {RECIPE_VERSION})")
        _no_unknown("recipe", data, {f.name for f in dataclasses.fields(cls)})
        if not data.get("model"):
            raise EdgekilnError("recipe: 'model' is required")
        constraints = _build("constraints", Constraints, data.pop("constraints", None) or {})
        search = _build("search", SearchSettings, data.pop("search", None) or {})
        passes = tuple(_pass_space(i, p) for i, p in enumerate(data.pop("passes", None) or [], 1))
        shapes = data.pop("input_shape", None) or ()
        data["input_shape"] = (shapes,) if isinstance(shapes, str) else tuple(str(s) for s in shapes)
        recipe = cls(constraints=constraints, search=search, passes=passes, **data)
        recipe.validate()
        return recipe

    def validate(self) -> None:
        if self.prefer not in PREFERENCES:
            raise EdgekilnError(f"recipe: prefer must be one of {', '.join(PREFERENCES)} (got '{self.prefer}')")
        if self.search.sampler not in SAMPLERS:
            raise EdgekilnError(f"recipe: search.sampler must be one of {', '.join(SAMPLERS)}")
        if self.search.executor not in EXECUTORS:
            raise EdgekilnError(f"recipe: search.executor must be one of {', '.join(EXECUTORS)}")
        if self.search.trials < 1 or self.search.workers < 1:
            raise EdgekilnError("recipe: search.trials and search.workers must be >= 1")
        if self.search.timeout_s is not None and self.search.timeout_s < 0:
            raise EdgekilnError(f"recipe: search.timeout_s must be >= 0 seconds, 0 for no limit "
                                f"(got {self.search.timeout_s!r})")
        c = self.constraints
        for name in ("max_drop", "max_latency_ms", "max_ram_bytes", "max_flash_bytes"):
            value = getattr(c, name)
            if value is not None and (not isinstance(value, (int, float)) or value < 0):
                raise EdgekilnError(f"recipe: constraints.{name} must be a non-negative number (got {value!r})")


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML recipe file; relative paths in it are taken relative to the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EdgekilnError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EdgekilnError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise EdgekilnError(f"{path}: a recipe is a YAML mapping")
    for key in ("model", "calib", "eval"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and ":" not in value:
            data[key] = str((path.parent / value).resolve())
    try:
        return Recipe.from_dict(data)
    except EdgekilnError as exc:
        raise EdgekilnError(f"{path}: {exc}") from exc


def dump_recipe(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def _pass_space(index: int, data: Any) -> PassSpace:
    """Validate one pass entry against the registry (the allow-list) and its config fields."""
    from edgekiln.passes.registry import get_pass

    if not isinstance(data, Mapping) or "pass" not in data:
        raise EdgekilnError(f"recipe: passes[{index}] must be a mapping with a 'pass' key")
    data = dict(data)
    _no_unknown(f"passes[{index}]", data, {"pass", "options", "optional"})
    spec = get_pass(str(data["pass"]))
    fields = {f.name for f in dataclasses.fields(spec.config_type)}
    options: dict[str, tuple[Any, ...]] = {}
    for key, value in (data.get("options") or {}).items():
        if key not in fields:
            raise EdgekilnError(f"recipe: pass '{spec.name}' has no option '{key}'; known: {', '.join(sorted(fields))}")
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if not values:
            raise EdgekilnError(f"recipe: pass '{spec.name}' option '{key}' lists no values")
        for v in values:  # each value must make a valid config on its own
            _try_config(spec, key, v)
        options[key] = values
    return PassSpace(name=spec.name, options=options, optional=bool(data.get("optional", True)))


def _try_config(spec: Any, key: str, value: Any) -> None:
    try:
        spec.config_type.from_dict({key: value})
    except EdgekilnError as exc:
        raise EdgekilnError(f"recipe: pass '{spec.name}' option {key}={value!r}: {exc}") from exc


def _build(section: str, cls: type, data: Any) -> Any:
    if not isinstance(data, Mapping):
        raise EdgekilnError(f"recipe: '{section}' must be a mapping")
    _no_unknown(section, data, {f.name for f in dataclasses.fields(cls)})
    return cls(**data)


def _no_unknown(section: str, data: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise EdgekilnError(f"{section}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")


