"""Quantize pass: INT8 static (QDQ), INT8 dynamic, FP16, INT4 weight-only.

onnxruntime's quantization tools do the graph rewriting; edgekiln chooses the ranges (its own
calibration, passed to onnxruntime as per-tensor overrides), restricts dynamic quantization to
the ops where it is fast on CPUs, and enforces an accuracy budget by keeping the most sensitive
layers in float.

Scheme -> artifact kind: ``int8`` and ``int8-dynamic`` -> ``onnx-qdq``; ``fp16`` -> ``onnx-fp16``;
``int4-weight`` -> ``onnx-int4w``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import BudgetNotMet, EdgekilnError
from edgekiln.models.artifact import ONNX_FLOAT, ONNX_FP16, ONNX_INT4W, ONNX_QDQ, ModelArtifact
from edgekiln.passes.base import PassConfig, PassContext, PassSpec, option, provenance_record
from edgekiln.quant.compact import compact_qdq

SCHEMES = {"int8": ONNX_QDQ, "int8-dynamic": ONNX_QDQ, "fp16": ONNX_FP16, "int4-weight": ONNX_INT4W}
CALIBRATIONS = ("minmax", "percentile", "entropy", "mse", "auto")
SPEED_RULES = ("auto", "on", "off")
ACTIVATION_TYPES = ("auto", "int8", "uint8")
ONNX_RUNTIMES = ("onnxruntime", "openvino")   # the runtimes that run the ONNX file quantize writes
LAYER_OPS = ("Conv", "Gemm", "MatMul", "Gather", "ConvTranspose")


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig(PassConfig):
    scheme: str = option("int8", "int8 | int8-dynamic | fp16 | int4-weight")
    calibration: str = option("minmax", "Activation ranges (int8): minmax | percentile | entropy | mse | auto")
    symmetric_activations: bool | None = option(
        None, "int8 zero points. Default: asymmetric; transformers: symmetric except one-sided ranges (GELU outputs).")
    per_channel: bool = option(True, "One weight scale per output channel (else one per tensor).")
    reduce_range: bool = option(False, "7-bit weights, for pre-VNNI x86 CPUs only.")
    calib_samples: int = option(256, "Calibration samples used (from the calibration data).")
    max_drop: float | None = option(None, "Largest allowed metric drop, in its units; needs evaluation data: "
                                          "the most sensitive layers stay float until it fits.")
    keep_float: tuple[str, ...] = option((), "Node name to leave in float (repeatable).")
    block_size: int = option(32, "int4-weight: weights per scale (a power of two >= 16).")
    quantize_embeddings: bool = option(True, "Transformers: also int8 Gather tables (embeddings, one scale per row).")
    smooth_alpha: float | None = option(0.7, "Transformers: SmoothQuant strength in (0, 1); 0 (None in a config) turns smoothing off.")
    transformer_rewrites: bool = option(True, "Transformers: soft attention-mask fill; int8-dynamic: residual adds "
                                              "kept unfused; int8: only weighted MatMul inputs quantized.")
    outlier_rows: bool = option(True, "Transformers, int8: massive-activation leading rows in float.")
    equalize: bool = option(False, "Cross-layer equalization of Conv-ReLU-Conv pairs first (int8).")
    bias_correction: bool = option(False, "Correct each layer's mean output shift (int8).")
    adaround: bool = option(False, "int8: learn each weight's rounding from its layer's output error (slower).")
    speed_rule: str = option("auto", "int8 (CNNs): keep float the ops whose int8 form is slower on the runtime "
                                     "(quant/speed.py) and re-fuse HardSwish: auto (time both forms, keep the "
                                     "faster) | on | off")
    activations: str = option("auto", "int8 (CNNs): activation type: int8 | uint8 | auto (time both on the runtime; "
                                      "onnxruntime on x86 fuses QLinearConv only for uint8 activations where a "
                                      "tensor feeds several nodes)")
    float_layers: bool = option(False, "int8 (CNNs), when the kept form is still slower than FP32: try the costliest "
                                       "int8 layers float and keep float those that make it faster (measured; the C "
                                       "and TFLite exports need every layer int8).")
    runtime: str = option("auto", "The runtime the model ships to: onnxruntime | openvino | auto (every installed "
                                  "ONNX runtime; speed_rule=auto times the int8 forms on each and the fastest wins).")

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)} (got {self.scheme!r})")
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)} (got {self.calibration!r})")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError("max_drop must be >= 0")
        if self.smooth_alpha is not None and not 0.0 < self.smooth_alpha < 1.0:
            raise ValueError("smooth_alpha must be in (0, 1) or None")
        if self.speed_rule not in SPEED_RULES:
            raise ValueError(f"speed_rule must be one of {', '.join(SPEED_RULES)} (got {self.speed_rule!r})")
        if self.activations not in ACTIVATION_TYPES:
            raise ValueError(f"activations must be one of {', '.join(ACTIVATION_TYPES)} (got {self.activations!r})")
        if self.runtime not in (*ONNX_RUNTIMES, "auto"):
            raise ValueError(f"runtime must be one of {', '.join(ONNX_RUNTIMES)}, auto (got {self.runtime!r})")
        if self.calib_samples < 1 or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError("calib_samples must be >= 1 and block_size a power of two >= 16")


@dataclass
class QuantizeResult:
    path: Path
    kind: str
    kept_float: list[str] = field(default_factory=list)
    calibration: dict[str, str] = field(default_factory=dict)      # tensor -> method used
    rewrites: dict[str, Any] = field(default_factory=dict)         # int8-dynamic graph rewrites applied
    adaround: dict[str, Any] = field(default_factory=dict)         # int8 + adaround: per layer, what moved
    metric_fp32: float | None = None
    metric: float | None = None
    sensitivity: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    speed: dict[str, Any] = field(default_factory=dict)            # int8: speed rule, what stayed float and why


def layer_names(model_path: str | Path) -> list[str]:
    """Nodes whose weights a scheme quantizes (the units the accuracy budget keeps in float)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in LAYER_OPS and any(i in inits for i in n.input)]


def quantize_once(src: Path, dst: Path, cfg: QuantizeConfig, feeds: list[dict[str, np.ndarray]] | None,
                  exclude: list[str], seed: int = 0, rewrites: dict[str, Any] | None = None,
                  adaround_report: dict[str, Any] | None = None,
                  speed_report: dict[str, Any] | None = None) -> dict[str, str]:
    """One quantization of ``src`` into ``dst``; returns the calibration method per tensor
    (and fills ``rewrites`` with what the int8-dynamic graph rewrites changed, ``adaround_report``
    with AdaRound's per-layer errors, ``speed_report`` with what the speed rule fused and kept float)."""
    import warnings

    logging_quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cfg.scheme == "int8":
            return _int8_static(src, dst, cfg, feeds, exclude, seed, adaround_report, rewrites, speed_report)
        if cfg.scheme == "int8-dynamic":
            report = _int8_dynamic(src, dst, cfg, feeds, exclude)
            if rewrites is not None:
                rewrites.update(report)
        elif cfg.scheme == "fp16":
            _fp16(src, dst, exclude)
        else:
            _int4(src, dst, cfg, exclude)
    return {}


def logging_quiet() -> None:
    import logging

    logging.getLogger().setLevel(logging.ERROR)


def _int8_static(src: Path, dst: Path, cfg: QuantizeConfig, feeds: list[dict[str, np.ndarray]] | None,
                 exclude: list[str], seed: int, adaround_report: dict[str, Any] | None = None,
                 rewrites: dict[str, Any] | None = None, speed_report: dict[str, Any] | None = None) -> dict[str, str]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgekiln.quant import transformer as tr
    from edgekiln.quant.calibration import calibration_reader, choose_ranges
    from edgekiln.quant.ort_quantizer import float_statistics, prepare_for_quantizer, preprocess

    if not feeds:
        raise EdgekilnError("int8 static quantization needs calibration data (--calib CALIB.npz)")
    with tempfile.TemporaryDirectory(prefix="edgekiln-q-", dir=dst.parent) as tmp:   # scratch beside the output
        if cfg.equalize:
            from edgekiln.quant.correction import equalize_cross_layer

            eq, _ = equalize_cross_layer(onnx.load(str(src)))
            src = Path(tmp) / "equalized.onnx"
            onnx.save(eq, str(src))
        model = onnx.load(str(src))
        layers, tensors, statistics = None, None, []
        if cfg.transformer_rewrites and tr.is_attention_model(model):
            # NOTE: quantizing every tensor of MiniLM (LayerNorm, Softmax, the mask arithmetic) left
            # cosine 0.03; see quant/transformer.py for what this keeps float and why.
            report, layers = tr.prepare_static(model, feeds, alpha=cfg.smooth_alpha, embeddings=cfg.quantize_embeddings,
                                               outlier_rows=cfg.outlier_rows, skip=set(exclude))
            if rewrites is not None:
                rewrites.update(report.to_dict())
            pre = Path(tmp) / "rewritten.onnx"
            prepare_for_quantizer(model)
            onnx.save(model, str(pre))
            quantized = set(layers)
            tensors = sorted({n.input[0] for n in model.graph.node if n.name in quantized})
        else:
            pre = preprocess(src, Path(tmp))
            model = onnx.load(str(pre))
            fixes = prepare_for_quantizer(model)
            statistics = float_statistics(model)   # NOTE: a divisor in int8 is noise, or 1/0
            if speed_report is not None:
                speed_report["cnn"] = True
            fused, speed = _speed_rule(model, cfg, [*exclude, *statistics], speed_report)
            statistics += speed
            if any(fixes.values()) or statistics or fused:
                pre = Path(tmp) / "prepared.onnx"
                onnx.save(model, str(pre))
        symmetric = cfg.symmetric_activations
        if symmetric is None and layers is None:
            symmetric = False  # NOTE: the integer-only MCU kernels are tuned on asymmetric activations
        ranges = choose_ranges(model, feeds, cfg.calibration, tensors=tensors, symmetric=symmetric, seed=seed)
        overrides = {t: [{"rmin": np.float32(r.lo), "rmax": np.float32(r.hi), "symmetric": r.symmetric}]
                     for t, r in ranges.items()}
        extra: dict[str, Any] = {"TensorQuantOverrides": overrides, "ActivationSymmetric": bool(symmetric),
                                 "WeightSymmetric": True}
        if layers is not None:
            # NOTE: onnxruntime also quantizes a MatMul's output by default: on MiniLM that int8
            # rounding before the bias add cost cosine 0.989 -> 0.867 on both runtimes (smoothed,
            # symmetric, no float rows).
            extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
        quantize_static(str(pre), str(dst), calibration_reader(feeds), quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
                        reduce_range=cfg.reduce_range, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8 if cfg.activations == "uint8" and layers is None
                        and not symmetric else QuantType.QInt8,
                        nodes_to_exclude=[*exclude, *statistics], calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_quantize=layers, op_types_to_quantize=["MatMul", "Gemm"] if layers else None,
                        extra_options=extra)
        if cfg.bias_correction:
            from edgekiln.quant.correction import correct_bias

            fixed, _ = correct_bias(onnx.load(str(pre)), onnx.load(str(dst)), feeds[:64])
            onnx.save(fixed, str(dst))
        if cfg.adaround:
            from edgekiln.compress.adaround import AdaRoundSettings, adaround

            rounded, report = adaround(onnx.load(str(pre)), onnx.load(str(dst)), feeds, AdaRoundSettings(seed=seed))
            onnx.save(rounded, str(dst))
            if adaround_report is not None:
                adaround_report.update(report)
    compact_qdq(dst)
    return {t: r.method for t, r in ranges.items()}


def _speed_rule(model: Any, cfg: QuantizeConfig, skip: list[str], report: dict[str, Any] | None
                ) -> tuple[list[str], list[str]]:
    """Apply the speed rule to the pre-processed ``model`` in place (quant/speed.py): the names of
    the re-fused HardSwish nodes and of the nodes to keep float for speed (both recorded in ``report``)."""
    from edgekiln.quant.speed import float_for_speed, fuse_hardswish

    if cfg.speed_rule == "off":
        return [], []
    fused = fuse_hardswish(model)
    floats = float_for_speed(model, cfg.runtime, skip)
    if report is not None:
        report.update({"fused_hardswish": fused, "float_for_speed": floats})
    return fused, list(floats)


def _int8_dynamic(src: Path, dst: Path, cfg: QuantizeConfig, feeds: list[dict[str, np.ndarray]] | None,
                  exclude: list[str]) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgekiln.quant import transformer as tr

    model = onnx.load(str(src))
    report = tr.RewriteReport()
    if cfg.transformer_rewrites:
        report.mask_fills = tr.soften_mask_fills_if_harmless(model, feeds or [])
    if cfg.smooth_alpha is not None and feeds:
        report.smoothed = tr.smooth_activations(model, feeds[:32], alpha=cfg.smooth_alpha, skip=set(exclude))
    if cfg.quantize_embeddings:
        # NOTE: edgekiln's own per-row tables, not onnxruntime's Gather quantization (one scale
        # for the whole table: it cost MiniLM 0.0006 mean cosine for nothing).
        report.embedding_tables = tr.embedding_tables_per_row(model, skip=set(exclude))
    with tempfile.TemporaryDirectory(prefix="edgekiln-dq-", dir=dst.parent) as tmp:
        pre = Path(tmp) / "rewritten.onnx"
        onnx.save(model, str(pre))
        # NOTE: Conv -> ConvInteger is 4-6x slower than float on this CPU class: only MatMul/Gemm.
        quantize_dynamic(str(pre), str(dst), op_types_to_quantize=["MatMul", "Gemm"], per_channel=cfg.per_channel,
                         reduce_range=cfg.reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    if cfg.transformer_rewrites:
        q = onnx.load(str(dst))
        hidden = _layernorm_width(q)
        if hidden and tr.skip_layernorm_is_slower(hidden):
            report.residual_sums = tr.residual_adds_as_sum(q)
            onnx.save(q, str(dst))
    compact_qdq(dst)
    return report.to_dict()


def _layernorm_width(model: Any) -> int | None:
    """The normalized width of the model's LayerNormalization nodes (their scale's length)."""
    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "LayerNormalization" and len(n.input) > 1 and n.input[1] in inits:
            return int(np.prod(inits[n.input[1]].dims))
    return None


#: kept float32 in an fp16 model when onnxruntime cannot even open the fp16 file (see :func:`_fp16`)
FP16_FALLBACK_OPS = ("Transpose", "Reshape")


def _fp16(src: Path, dst: Path, exclude: list[str]) -> None:
    """fp16 weights and activations, inputs and outputs float32. onnxruntime 1.31 died (SIGSEGV, no
    error) creating a session on the CRNN's fp16 model (a Transpose after a Reshape before its LSTM):
    the file is opened in a child process first and, if that crashes, converted again with data
    movement kept float32; if it still crashes, one error line instead of a dead process."""
    from edgekiln.execution.ort import ort_open_crashes

    for extra in ((), FP16_FALLBACK_OPS):
        _fp16_convert(src, dst, exclude, extra)
        crash = ort_open_crashes(dst)
        if crash is None:
            return
    raise EdgekilnError(f"fp16: onnxruntime crashes opening the fp16 model ({crash}); keep the model in float32 or "
                        "keep the ops named in the crash float with --keep-float")


def _fp16_convert(src: Path, dst: Path, exclude: list[str], extra_block: tuple[str, ...]) -> None:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from edgekiln.quant.ort_quantizer import sort_nodes

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, node_block_list=list(exclude) or None,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, *extra_block])
    _drop_repeated_casts(model)
    sort_nodes(model)
    onnx.save(model, str(dst))



def _drop_repeated_casts(model: Any) -> None:
    """Remove (in place) a node that repeats an earlier one exactly (same op, inputs, outputs,
    attributes): the fp16 converter writes one Cast back to float32 per *use* of a tensor, so a
    blocked node reading it twice (the LSTM's initial h and c) got two Casts with one output name."""
    seen, keep = set(), []
    for n in model.graph.node:
        key = n.SerializeToString(deterministic=True)
        if n.op_type == "Cast" and key in seen:
            continue
        seen.add(key)
        keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def _int4(src: Path, dst: Path, cfg: QuantizeConfig, exclude: list[str]) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=cfg.block_size, is_symmetric=True,
                             nodes_to_exclude=list(exclude))
    q.process()
    q.model.save_model_to_file(str(dst), use_external_data_format=False)


def quantize_model(src: str | Path, cfg: QuantizeConfig, work: str | Path, *, calib: str | Path | None = None,
                   eval_npz: str | Path | None = None, metric: str = "accuracy", seed: int = 0,
                   progress: Any = None, input_shapes: Any = None) -> QuantizeResult:
    """Quantize ``src`` into ``work/model.onnx``, meeting ``cfg.max_drop`` when eval data is given.

    Raises :class:`BudgetNotMet` naming the shortfall and the closest result when even keeping
    every layer but one in float cannot meet the budget.
    """
    from edgekiln.execution.feeds import calibration_feeds
    from edgekiln.execution.ort import readable_file
    from edgekiln.models.metrics import evaluate
    from edgekiln.quant.ort_quantizer import check_quantized

    src, work = Path(src), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    # NOTE: onnxruntime's quantization tools open files themselves: give them IR/opset they read
    src = readable_file(src, work / "scratch")
    uses_calib = cfg.scheme == "int8" or (cfg.scheme == "int8-dynamic" and cfg.smooth_alpha is not None)
    feeds = calibration_feeds(src, calib, cfg.calib_samples) if calib and uses_calib else None
    dst = work / "model.onnx"
    exclude = list(cfg.keep_float)
    rewrites: dict[str, Any] = {}
    rounding: dict[str, Any] = {}
    speed: dict[str, Any] = {}
    methods = quantize_once(src, dst, cfg, feeds, exclude, seed, rewrites, rounding, speed)
    if speed.get("cnn"):
        from edgekiln.passes.quantize_forms import decide_form

        cfg, methods = decide_form(src, dst, cfg, feeds, exclude, seed, speed, methods, rewrites, rounding)
    # NOTE: fp16/int4 take no calibration, but their output is checked on a real sample when there is one
    check_quantized(src, dst, feeds or (calibration_feeds(src, calib, 1) if calib else None), input_shapes)
    result = QuantizeResult(dst, SCHEMES[cfg.scheme], list(exclude), methods, rewrites, rounding, speed=speed)
    if eval_npz is None:
        return result
    ref = src if metric in ("cosine", "sqnr") else None
    result.metric_fp32, result.metric = metric_pair(src, dst, eval_npz, metric)
    result.attempts.append({"kept_float": list(exclude), "metric": result.metric, "adaround": cfg.adaround})
    if cfg.max_drop is None or _drop(result) <= cfg.max_drop + 1e-9:
        return result
    # Sensitivity: quantize one layer at a time (everything else float) and measure the damage.
    # NOTE: this sees tensor-level problems too: an outlier-dominated activation between two
    # layers hurts whichever of them is quantized, so both rank high and both are kept float.
    layers = [n for n in layer_names(src) if n not in exclude]
    trial = work / "scratch" / "trial.onnx"     # NOTE: never beside the output (or the user's) model
    trial.parent.mkdir(exist_ok=True)
    # NOTE: the search rounds to nearest: AdaRound refits every quantized layer (minutes on a
    # MobileNetV2) and would do so for each attempt; it is applied once to the layer set found.
    search = replace(cfg, adaround=False)
    for i, name in enumerate(layers):
        quantize_once(src, trial, search, feeds, [*exclude, *[x for x in layers if x != name]], seed)
        m = evaluate(trial, eval_npz, metric, reference_path=ref)
        result.sensitivity.append({"layer": name, "metric_if_only_this_quantized": m,
                                   "damage": result.metric_fp32 - m, "bytes_float": _layer_bytes(src, name)})
        if progress:
            progress(i + 1, len(layers))
    result.sensitivity.sort(key=lambda r: (-r["damage"], r["layer"]))
    best = (result.metric, list(exclude))
    for k, row in enumerate(result.sensitivity[:-1]):   # keeping every layer float is not quantization
        if progress:   # NOTE: optimize stops a trial at its time limit through this callback
            progress(k + 1, len(result.sensitivity) - 1)
        exclude.append(row["layer"])
        quantize_once(src, trial, search, feeds, exclude, seed)
        m = evaluate(trial, eval_npz, metric, reference_path=ref)
        result.attempts.append({"kept_float": list(exclude), "metric": m, "adaround": False})
        if m > best[0]:
            best = (m, list(exclude))
        if result.metric_fp32 - m <= cfg.max_drop + 1e-9:
            shutil.copyfile(trial, dst)
            result.metric, result.kept_float = m, list(exclude)
            rounding.clear()
            if cfg.adaround:
                _adaround_last(src, trial, dst, cfg, feeds, exclude, seed, result, eval_npz, metric, ref)
            return result
    drop = result.metric_fp32 - best[0]
    raise BudgetNotMet(f"the accuracy budget cannot be met: best drop {drop:.4f} > max-drop {cfg.max_drop:.4f} "
                       f"(misses by {drop - cfg.max_drop:.4f}); closest keeps {len(best[1])} layer(s) float: "
                       f"{', '.join(best[1][:6])}{' ...' if len(best[1]) > 6 else ''}")


def metric_pair(src: str | Path, dst: str | Path, eval_npz: str | Path, metric: str) -> tuple[float, float]:
    """``(metric of the float model, metric of the quantized one)`` on ``eval_npz``; ``cosine`` and
    ``sqnr`` compare against the float model's outputs (its own sqnr is infinite)."""
    from edgekiln.models.metrics import evaluate

    ref = src if metric in ("cosine", "sqnr") else None
    fp32 = evaluate(src, eval_npz, metric, reference_path=ref) if metric != "sqnr" else float("inf")
    return fp32, evaluate(dst, eval_npz, metric, reference_path=ref)


def _adaround_last(src: Path, trial: Path, dst: Path, cfg: QuantizeConfig, feeds: Any, exclude: list[str], seed: int,
                   result: QuantizeResult, eval_npz: Any, metric: str, ref: Any) -> None:
    """Re-round the layers the budget search left quantized with AdaRound; keep it only if the
    metric is no worse than with nearest rounding."""
    from edgekiln.models.metrics import evaluate

    rounding: dict[str, Any] = {}
    quantize_once(src, trial, cfg, feeds, exclude, seed, adaround_report=rounding)
    m = evaluate(trial, eval_npz, metric, reference_path=ref)
    result.attempts.append({"kept_float": list(exclude), "metric": m, "adaround": True})
    if m >= (result.metric or 0.0):
        shutil.copyfile(trial, dst)
        result.metric = m
        result.adaround.update(rounding)


def _drop(r: QuantizeResult) -> float:
    return (r.metric_fp32 or 0.0) - (r.metric or 0.0)


def _layer_bytes(src: Path, name: str) -> int:
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == name)
    return int(sum(np.prod(inits[i].dims) * 4 for i in node.input if i in inits))


def run(artifact: ModelArtifact, config: QuantizeConfig, ctx: PassContext) -> ModelArtifact:
    res = quantize_model(artifact.path, config, ctx.work_dir, calib=ctx.calib_path,
                         eval_npz=ctx.eval_path if config.max_drop is not None else None, metric=ctx.metric,
                         seed=ctx.seed, progress=ctx.progress, input_shapes=artifact.input_shapes)
    # NOTE: the record holds what `edgekiln quantize` reports (sensitivity, attempts, calibration
    # per tensor, rewrites): the CLI runs this pass through the pipeline and reads them back here.
    record = provenance_record("quantize", config, artifact, kept_float=res.kept_float, metric=res.metric,
                               metric_fp32=res.metric_fp32, calibration=res.calibration, rewrites=res.rewrites,
                               adaround=res.adaround, sensitivity=res.sensitivity, attempts=res.attempts,
                               speed=res.speed)
    return artifact.with_pass(kind=res.kind, path=res.path, record=record)


def result_of(artifact: ModelArtifact) -> QuantizeResult:
    """The :class:`QuantizeResult` the quantize pass that made ``artifact`` recorded in its provenance."""
    rec = next((r for r in reversed(artifact.provenance) if r.get("pass") == "quantize"), None)
    if rec is None:
        raise EdgekilnError(f"{artifact.path}: no quantize step in its provenance")
    return QuantizeResult(artifact.path, artifact.kind, list(rec.get("kept_float") or []),
                          dict(rec.get("calibration") or {}), dict(rec.get("rewrites") or {}),
                          dict(rec.get("adaround") or {}), rec.get("metric_fp32"), rec.get("metric"),
                          list(rec.get("sensitivity") or []), list(rec.get("attempts") or []),
                          dict(rec.get("speed") or {}))


# NOTE: only float models: quantizing an int8 QDQ model again measured 1.14x the size of the float
# model it came from (onnxruntime wraps the existing Q/DQ pairs in new ones) and gains nothing.
SPEC = PassSpec(name="quantize", config_type=QuantizeConfig, run=run, consumes=frozenset({ONNX_FLOAT}),
                produces=ONNX_QDQ, summary="INT8 static/dynamic, FP16 or INT4 weight-only, with an accuracy budget",
                produces_for=lambda cfg: SCHEMES[cfg.scheme])
