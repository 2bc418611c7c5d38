"""The search space: which pipelines `optimize` may try, and how a trial picks one.

A point in the space is a list of :class:`~edgekiln.pipeline.Step`. Sampling goes through an
Optuna trial (``suggest_categorical``) so any Optuna sampler can drive it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from edgekiln.models.artifact import ONNX_FLOAT, ModelArtifact
from edgekiln.passes.registry import get_pass, registry
from edgekiln.pipeline import Step
from edgekiln.search.recipe import PassSpace, Recipe

SKIP = "skip"


def default_space(artifact: ModelArtifact, recipe: Recipe, precisions: Sequence[str], *,
                  target_kind: str = "host") -> tuple[PassSpace, ...]:
    """The space used when a recipe lists no passes: prune (when the PyTorch source is known)
    then quantize with the schemes the target supports. On host and Linux-class targets
    (``target_kind``) int8 keeps the quantize pass's speed rule (timed on every installed ONNX
    runtime, as the trial is); on a microcontroller it is off: the integer C/TFLite kernels run
    every op in int8. FP32 itself is the baseline, measured and compared with anyway.

    On a microcontroller (``target_kind="mcu"``) only what edgekiln's C library runs is searched:
    static int8 QDQ, quantization required (no FP32, fp16 or dynamic int8 pipeline), whatever
    else the profile lists."""
    mcu = target_kind == "mcu"
    spaces = []
    if artifact.torch is not None and "prune" in registry():
        spaces.append(PassSpace(name="prune", optional=True,
                                options={"mode": ("structured",), "ratio": (0.3, 0.4, 0.5, 0.6),
                                         "finetune_epochs": (5,)}))
    if artifact.kind != ONNX_FLOAT:
        # NOTE: an already quantized (or fp16) model is not quantized again (the pass takes float
        # models only): the search measures it as it is, with whatever passes came before.
        return tuple(spaces)
    if "quantize" in registry() and "int8" in precisions and _matmul_model(artifact):
        # NOTE: transformer-style models (weighted MatMul/Gemm, no Conv). Both int8 schemes: on MiniLM
        # dynamic int8 is fastest on onnxruntime, static int8 on OpenVINO (trials are timed on every
        # installed runtime). Static without the float outlier rows: they bought +0.002 cosine for
        # 10% more latency there, and the quantize pass's max_drop keeps layers float if needed.
        # fp16 ran slower than fp32 (18.2 vs 16.8 ms CPU time): not searched.
        options_t: dict[str, tuple[Any, ...]] = {"scheme": ("int8",) if mcu else ("int8-dynamic", "int8"),
                                                 "smooth_alpha": (0.5, 0.7, 0.85), "outlier_rows": (False,)}
        if mcu:
            options_t.update({"speed_rule": ("off",), "activations": ("int8",)})
        if recipe.constraints.max_drop is not None:
            options_t["max_drop"] = (recipe.constraints.max_drop,)
        # NOTE: not optional: the FP32 model is measured as the baseline anyway, and on MiniLM a seeded
        # TPE spent 3 of 4 trials re-measuring it with quantization switched off.
        spaces.append(PassSpace(name="quantize", optional=False, options=options_t))
        return tuple(spaces)
    if "quantize" in registry():
        schemes = []
        if "int8" in precisions:
            schemes.append("int8")
        if "fp16" in precisions and not artifact.torch and not mcu:
            schemes.append("fp16")
        options: dict[str, tuple[Any, ...]] = {"scheme": tuple(schemes) or ("int8",),
                                               "calibration": ("minmax", "percentile", "entropy", "mse")}
        linux_class = target_kind in ("host", "linux")
        if not linux_class:
            # NOTE: int8 activations, no float islands: what the integer C/TFLite kernels run (and no
            # timing-based choice, so a search on a microcontroller target gives the same models every run)
            options.update({"speed_rule": ("off",), "activations": ("int8",)})
        if recipe.constraints.max_drop is not None and not linux_class:
            options["max_drop"] = (recipe.constraints.max_drop,)
        # NOTE: on a Linux-class target the trials quantize every layer (seconds each) and the accuracy
        # budget's per-layer search (minutes: MobileNetV3-small ranked 1-22 of 54 layers in a trial's 100 s,
        # once per calibration method) runs once, for the most accurate int8 trial faster than FP32, with the
        # time left (search/budget_round.py).
        # NOTE: on a Linux-class target, "no quantization" alone is the FP32 baseline, which optimize
        # measures and selects when nothing beats it: optional only after a prune pass (pruned FP32).
        # NOTE: on a microcontroller FP32 does not deploy (the C library is integer): quantization is required.
        optional = "fp32" in precisions and (bool(spaces) or not linux_class) and not mcu
        spaces.append(PassSpace(name="quantize", optional=optional, options=options))
    return tuple(spaces)


def inert_options(name: str, config: Any) -> tuple[str, ...]:
    """Options of pass ``name`` that ``config``'s other options make irrelevant: a pipeline is
    identified (and labelled) without them, so the search does not try fp16 once per int8
    calibration method.

    >>> from edgekiln.passes.quantize import QuantizeConfig
    >>> inert_options("quantize", QuantizeConfig(scheme="fp16"))
    ('calibration', 'runtime', 'speed_rule', 'activations')
    """
    if name == "quantize" and getattr(config, "scheme", "int8") != "int8":
        return ("calibration", "runtime", "speed_rule", "activations")
    return ()


def effective_steps(steps: Sequence[Step]) -> list[Step]:
    """``steps`` with each inert option (:func:`inert_options`) set back to its default."""
    out = []
    for step in steps:
        inert = inert_options(step.name, step.config)
        if inert:
            defaults = type(step.config)().to_dict() if _has_defaults(step.config) else {}
            values = {k: v for k, v in step.config.to_dict().items() if k != "version"}
            values.update({k: defaults[k] for k in inert if k in defaults})
            step = Step(step.name, type(step.config).from_dict(values))
        out.append(step)
    return out


def pipeline_key(steps: Sequence[Step]) -> str:
    """Identity of a pipeline: its passes and their effective options (the search's "tried" set)."""
    import json

    return json.dumps([s.to_dict() for s in effective_steps(steps)], sort_keys=True, default=str)


def point_steps(point: dict[str, Any], spaces: Sequence[PassSpace]) -> list[Step]:
    """The pipeline a point of :func:`enumerate_points` stands for."""
    from optuna.trial import FixedTrial

    return sample_steps(FixedTrial(point), spaces)


def _matmul_model(artifact: ModelArtifact) -> bool:
    """Whether the model's weights sit in MatMul/Gemm layers only (no convolutions)."""
    import onnx

    model = onnx.load(str(artifact.path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node if any(i in inits for i in n.input[1:2])}
    return bool(ops & {"MatMul", "Gemm"}) and not ops & {"Conv", "ConvTranspose"}


def sample_steps(trial: Any, spaces: Sequence[PassSpace]) -> list[Step]:
    """Draw one pipeline from ``spaces`` with an Optuna trial (deterministic for a seeded sampler)."""
    steps = []
    for space in spaces:
        if space.optional and not trial.suggest_categorical(f"{space.name}.enabled", [True, False]):
            continue
        values = {}
        for key, choices in space.options.items():
            values[key] = choices[0] if len(choices) == 1 else trial.suggest_categorical(
                f"{space.name}.{key}", list(choices))
        spec = get_pass(space.name)
        steps.append(Step(spec.name, spec.config_type.from_dict(values)))
    return effective_steps(steps)


def enumerate_points(spaces: Sequence[PassSpace], limit: int = 4096) -> list[dict[str, Any]] | None:
    """Every point of the space as the parameters :func:`sample_steps` would draw for it, in a
    fixed order; ``None`` when there are more than ``limit``."""
    per_space: list[list[dict[str, Any]]] = []
    for space in spaces:
        varied = [(f"{space.name}.{k}", list(v)) for k, v in space.options.items() if len(v) > 1]
        combos = [dict(zip([name for name, _ in varied], values, strict=True))
                  for values in itertools.product(*[choices for _, choices in varied])]
        if space.optional:
            combos = [{f"{space.name}.enabled": True, **c} for c in combos] + [{f"{space.name}.enabled": False}]
        per_space.append(combos)
    if math.prod(len(combos) for combos in per_space) > limit:
        return None
    return [{k: v for part in parts for k, v in part.items()} for parts in itertools.product(*per_space)]


def describe(steps: Sequence[Step], spaces: Sequence[PassSpace] = ()) -> str:
    """A short human label such as ``prune(ratio=0.5) -> quantize(calibration=mse)``: the options
    the search varied (or, without a space, those that differ from the defaults)."""
    if not steps:
        return "baseline"
    varied = {sp.name: [k for k, v in sp.options.items() if len(v) > 1] for sp in spaces}
    parts = []
    for step in steps:
        cfg = step.config.to_dict()
        cfg.pop("version", None)
        if step.name in varied:
            inert = inert_options(step.name, step.config)
            shown = {k: cfg[k] for k in varied[step.name] if k not in inert}
        else:
            default = type(step.config)().to_dict() if _has_defaults(step.config) else {}
            shown = {k: v for k, v in cfg.items() if default.get(k, object()) != v}
        parts.append(f"{step.name}(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")")
    return " -> ".join(parts)


def _has_defaults(config: Any) -> bool:
    try:
        type(config)()
    except TypeError:
        return False
    return True
