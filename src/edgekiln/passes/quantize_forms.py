"""Which int8 form of a CNN the quantize pass keeps: with or without the speed rule, int8 or uint8
activations, and which costly layers stay float, each decided by timing the candidates on the
runtime(s) the model ships to (:mod:`edgekiln.quant.speed`), FP32 timed in the same loop."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgekiln.passes.quantize import QuantizeConfig


def decide_form(src: Path, dst: Path, cfg: QuantizeConfig, feeds: Any, exclude: list[str], seed: int,
                 speed: dict[str, Any], methods: dict[str, str], rewrites: dict[str, Any],
                 rounding: dict[str, Any]) -> tuple[QuantizeConfig, dict[str, str]]:
    """``dst`` was quantized with the speed rule and int8 activations. With ``speed_rule="auto"``
    also quantize without the rule, with ``activations="auto"`` (CNNs) also with uint8
    activations, and keep the form :func:`~edgekiln.quant.speed.choose_form` measures fastest on
    ``cfg.runtime``. Returns the config the rest of the pass uses (the form decided) and the
    calibration methods of the model kept; fills ``speed``."""
    from edgekiln.passes.quantize import quantize_once
    from edgekiln.quant.speed import choose_form

    speed.pop("cnn", None)
    speed.update({"rule": cfg.speed_rule, "runtime": cfg.runtime, "applied": cfg.speed_rule != "off",
                  "activations": "int8"})
    changed = bool(speed.get("fused_hardswish") or speed.get("float_for_speed"))
    chosen = {"on": replace(cfg, speed_rule="on", activations="int8")}
    if cfg.speed_rule == "auto" and changed:
        chosen["off"] = replace(cfg, speed_rule="off", activations="int8")
    if cfg.activations == "auto" and cfg.symmetric_activations is not True:
        chosen["uint8"] = replace(cfg, speed_rule="on" if cfg.speed_rule != "off" else "off", activations="uint8")
    elif cfg.activations == "uint8":
        chosen = {"uint8": replace(cfg, speed_rule="on" if cfg.speed_rule != "off" else "off")}
    if len(chosen) == 1 or not feeds:
        form, final = next(iter(chosen.items()))
        if form == "uint8" and cfg.activations == "uint8":
            speed["activations"] = "uint8"
        return final, methods
    scratch = dst.parent / "scratch"
    scratch.mkdir(exist_ok=True)
    paths, form_methods = {"on": dst}, {"on": methods}
    for form, fcfg in chosen.items():
        if form != "on":
            # NOTE: the comparison does not need learned rounding; the form chosen gets it below
            paths[form] = scratch / f"form_{form}.onnx"
            form_methods[form] = quantize_once(src, paths[form], replace(fcfg, adaround=False, bias_correction=False),
                                               feeds, list(exclude), seed)
    for form, (base, _) in FLOAT_PAIR_FORMS.items():   # NOTE: rewrites of a form's file (same quantization)
        path = _float_pair_form(paths[base], scratch / f"form_{form}.onnx", form) if base in paths else None
        if path is not None:
            paths[form], form_methods[form], chosen[form] = path, form_methods[base], chosen[base]
    speed.update(choose_form(src, paths, cfg.runtime, feeds))
    keep = speed["kept_form"]
    final = chosen[keep]
    speed.update({"applied": final.speed_rule == "on" and changed, "activations": final.activations})
    if not speed["applied"]:
        speed.update({"float_for_speed": {}, "fused_hardswish": []})
    quantized_as = FLOAT_PAIR_FORMS[keep][0] if keep in FLOAT_PAIR_FORMS else keep
    if quantized_as != "on":
        rewrites.clear()
        rounding.clear()
        # NOTE: the scratch form was quantized without AdaRound/bias correction; redo it with them
        if cfg.adaround or cfg.bias_correction:
            methods = quantize_once(src, dst, final, feeds, exclude, seed, rewrites, rounding)
        else:
            shutil.copyfile(paths[quantized_as], dst)
            methods = form_methods[quantized_as]
    if keep in FLOAT_PAIR_FORMS:   # NOTE: derived again from the file kept (it may have learned rounding)
        _float_pair_form(dst, dst, keep)
        speed["float_pairs"] = len(_float_pairs(dst))
        return final, methods
    fp32 = speed.get("fp32_p50_ms")
    if cfg.float_layers and fp32 and fp32 >= MIN_MODEL_MS and speed["p50_ms"][keep] >= fp32:
        methods = _float_costly_layers(src, dst, final, feeds, exclude, seed, speed, methods, rewrites, rounding)
    return final, methods


COSTLY_LAYERS_TRIED = 3      # the costliest int8 layers tried float, one at a time
MIN_GAIN = 0.03              # a layer stays float only if that saves at least 3% of the int8 model's time
# NOTE: below this FP32 time a model is call-overhead bound (field notes: int8 makes tiny models
# smaller, not faster); trading its int8 layers for microseconds would only make it bigger.
MIN_MODEL_MS = 0.5


def _float_costly_layers(src: Path, dst: Path, cfg: QuantizeConfig, feeds: Any, exclude: list[str], seed: int,
                         speed: dict[str, Any], methods: dict[str, str], rewrites: dict[str, Any],
                         rounding: dict[str, Any]) -> dict[str, str]:
    """The kept form is still not faster than FP32: try the costliest int8 layers (the runtime's
    profiler) float, one at a time, then together, timed against the kept form and FP32 in one loop;
    the ones that make the model faster stay float (added to ``exclude``, recorded in
    ``speed["float_for_latency"]``) and ``dst`` is quantized again with them."""
    from edgekiln.passes.quantize import layer_names, quantize_once
    from edgekiln.quant.speed import SQNR_SLACK_DB, choose_form, costly_layers

    rt = speed.get("fastest_runtime")
    if not rt:
        return methods
    names = [n for n in layer_names(src) if n not in exclude]
    # NOTE: at most a third of the layers float: an int8 model with its layers float is the FP32 model
    # (a 2-layer model, call-overhead bound, came out with both float and nothing quantized)
    most = min(COSTLY_LAYERS_TRIED, len(names) // 3)
    if most < 1:
        return methods
    top = costly_layers(dst, rt, feeds[0], names, k=most)
    if not top:
        return methods
    light = replace(cfg, adaround=False, bias_correction=False)
    scratch = dst.parent / "scratch"
    trials = {}
    for i, (layer, _) in enumerate(top):
        trials[layer] = scratch / f"float_layer_{i}.onnx"
        quantize_once(src, trials[layer], light, feeds, [*exclude, layer], seed)
    res = choose_form(src, {"kept": dst, **trials}, rt, feeds)
    p50, sqnr = res.get("p50_ms") or {}, res.get("sqnr_db") or {}
    if "kept" not in p50:
        return methods
    base = p50["kept"]
    helpful = [layer for layer, _ in top if p50[layer] < base * (1 - MIN_GAIN)
               and sqnr[layer] >= sqnr["kept"] - SQNR_SLACK_DB]
    speed["layers_tried_float"] = {layer: {"profile_ms": ms, "p50_ms": p50[layer]} for layer, ms in top}
    speed["layers_tried_float_base_ms"] = base
    if not helpful:
        return methods
    best_single = min(helpful, key=lambda layer: p50[layer])
    chosen, chosen_ms = [best_single], p50[best_single]
    if len(helpful) > 1:
        together = scratch / "float_layers.onnx"
        quantize_once(src, together, light, feeds, [*exclude, *helpful], seed)
        res2 = choose_form(src, {"single": trials[best_single], "together": together}, rt, feeds)
        if res2.get("p50_ms") and res2["p50_ms"]["together"] < res2["p50_ms"]["single"] * (1 - MIN_GAIN):
            chosen, chosen_ms = list(helpful), res2["p50_ms"]["together"]
    exclude.extend(chosen)
    rewrites.clear()
    rounding.clear()
    speed["float_for_latency"] = {layer: f"int8 {base:.3f} ms -> {chosen_ms:.3f} ms on {rt} with it float"
                                  for layer in chosen}
    return quantize_once(src, dst, cfg, feeds, exclude, seed, rewrites, rounding)


#: forms derived from another form's file by leaving Q/DQ pairs out (:mod:`edgekiln.quant.float_pairs`):
#: ``{form: (the form it is derived from, how)}``. From the uint8 form too: OpenVINO computed
#: MobileViT-XXS with int8 activations at 0.8 dB SQNR; uint8, Q/DQ only at weighted inputs: 20.7 dB,
#: 10.85 ms (FP32 12.0, NNCF 12.4 in the same loop).
FLOAT_PAIR_FORMS = {"fused": ("on", "activations"), "inputs": ("on", "weighted inputs"),
                    "inputs_uint8": ("uint8", "weighted inputs")}


def _float_pair_form(base: Path, out: Path, form: str) -> Path | None:
    """``base`` with some activation Q/DQ pairs removed, written to ``out`` (may be ``base``): "fused"
    between a Conv and its float activation, "inputs*" wherever no Conv/MatMul/Gemm reads the pair;
    None when the form removes nothing."""
    import onnx

    from edgekiln.quant.float_pairs import drop_activation_pairs, keep_weighted_inputs

    model = onnx.load(str(base))
    drop = drop_activation_pairs if FLOAT_PAIR_FORMS[form][1] == "activations" else keep_weighted_inputs
    if not drop(model):
        return None
    onnx.save(model, str(out))
    return out


def _float_pairs(path: Path) -> dict[str, object]:
    import onnx

    from edgekiln.models.qdq_pairs import recorded_pairs

    return recorded_pairs(onnx.load(str(path), load_external_data=False))
