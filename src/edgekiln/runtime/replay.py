"""A bounded replay buffer of old features, so a head trained on new samples keeps the old classes.

Reservoir sampling (algorithm R): every row ever offered has the same chance to be held, and the
buffer never holds more than ``capacity_bytes``. Rows are stored as float16, or as int8 with the
int8 model's activation scale and zero point at the cut, which is exact for an int8 variant's
features (they are DequantizeLinear outputs) and holds about twice as many rows per byte.

>>> buf = ReplayBuffer(1024, dim=4)
>>> buf.capacity                       # 1024 // (4 * 2 + 2): float16 rows and int16 labels
102
>>> buf.add(np.ones((3, 4), np.float32), np.array([0, 1, 2]))
>>> len(buf), buf.nbytes
(3, 30)
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from edgekiln.errors import EdgekilnError

STORAGES = {"float16": 2, "int8": 1}
LABEL_BYTES = 2   # int16 labels


class ReplayBuffer:
    """Holds at most ``capacity_bytes // (dim * itemsize + 2)`` rows of ``dim`` features and their
    labels. ``storage="int8"`` needs ``qparams=(scale, zero_point)`` of the features."""

    def __init__(self, capacity_bytes: int, dim: int, *, storage: str = "float16",
                 qparams: tuple[float, int] | None = None, seed: int = 0) -> None:
        if storage not in STORAGES:
            raise EdgekilnError(f"replay storage must be one of {', '.join(STORAGES)}, not {storage!r}")
        if storage == "int8" and qparams is None:
            raise EdgekilnError("int8 replay storage needs the features' (scale, zero_point)")
        if int(capacity_bytes) < 0 or int(dim) <= 0:
            raise EdgekilnError(f"replay buffer needs capacity_bytes >= 0 and dim > 0, not {capacity_bytes}, {dim}")
        self.capacity_bytes, self.dim, self.storage, self.seed = int(capacity_bytes), int(dim), storage, int(seed)
        self.qparams = None if qparams is None else (float(qparams[0]), int(qparams[1]))
        self.row_bytes = self.dim * STORAGES[storage] + LABEL_BYTES
        self.capacity = self.capacity_bytes // self.row_bytes
        self._x = np.zeros((self.capacity, self.dim), np.int8 if storage == "int8" else np.float16)
        self._y = np.zeros(self.capacity, np.int16)
        self.count = 0
        self.seen = 0
        self._rng = np.random.default_rng(self.seed)

    def __len__(self) -> int:
        return self.count

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (features + labels)."""
        return self.count * self.row_bytes

    def add(self, feats: np.ndarray, labels: np.ndarray) -> None:
        """Offer rows; each is kept with probability ``capacity / seen`` (algorithm R)."""
        feats = np.asarray(feats, np.float32).reshape(len(labels), -1)
        labels = np.asarray(labels).reshape(-1)
        if feats.shape[1] != self.dim:
            raise EdgekilnError(f"replay rows have {feats.shape[1]} features, the buffer holds {self.dim}")
        if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int16).max):
            raise EdgekilnError("replay labels must be class indices in 0..32767")
        stored = self._encode(feats)
        for row, label in zip(stored, labels, strict=True):
            if self.count < self.capacity:
                slot = self.count
                self.count += 1
            else:
                slot = int(self._rng.integers(0, self.seen + 1))
            if slot < self.capacity:
                self._x[slot] = row
                self._y[slot] = label
            self.seen += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All rows held: float32 features and int64 labels."""
        return self._decode(self._x[:self.count]), self._y[:self.count].astype(np.int64)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``min(n, len(self))`` rows drawn without replacement."""
        idx = rng.choice(self.count, size=min(int(n), self.count), replace=False) if self.count else np.zeros(0, int)
        return self._decode(self._x[idx]), self._y[idx].astype(np.int64)

    def classes(self) -> list[int]:
        return sorted({int(c) for c in self._y[:self.count]})

    def state(self) -> dict[str, Any]:
        return {"capacity_bytes": self.capacity_bytes, "nbytes": self.nbytes, "rows": self.count,
                "capacity": self.capacity, "seen": self.seen, "storage": self.storage}

    def _encode(self, feats: np.ndarray) -> np.ndarray:
        if self.storage == "float16":
            return feats.astype(np.float16)
        scale, zp = self.qparams   # type: ignore[misc]
        return np.clip(np.round(feats / np.float32(scale)) + zp, -128, 127).astype(np.int8)

    def _decode(self, stored: np.ndarray) -> np.ndarray:
        if self.storage == "float16":
            return stored.astype(np.float32)
        scale, zp = self.qparams   # type: ignore[misc]
        # NOTE: the same float32 arithmetic as DequantizeLinear, so int8 rows come back bit-exact.
        return ((stored.astype(np.int32) - zp).astype(np.float32) * np.float32(scale)).astype(np.float32)

    def to_bytes(self) -> bytes:
        meta = np.array([self.capacity_bytes, self.dim, self.seen, self.seed], np.int64)
        q = np.array(self.qparams if self.qparams else (0.0, 0.0), np.float64)
        buf = io.BytesIO()
        np.savez(buf, x=self._x[:self.count], y=self._y[:self.count], meta=meta, q=q,
                 storage=np.array(self.storage))
        return buf.getvalue()

    def save(self, path: str | Path) -> Path:
        """Write the buffer as an npz, atomically."""
        from edgekiln.fileio import atomic_write_bytes

        return atomic_write_bytes(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> ReplayBuffer:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta, q, storage = z["meta"], z["q"], str(z["storage"])
                x, y = z["x"], z["y"]
        except (OSError, KeyError, ValueError) as exc:
            raise EdgekilnError(f"{path}: not a replay buffer ({exc})") from None
        buf = cls(int(meta[0]), int(meta[1]), storage=storage,
                  qparams=(float(q[0]), int(q[1])) if storage == "int8" else None, seed=int(meta[3]))
        if len(x) > buf.capacity or x.shape[1:] != (buf.dim,) or len(y) != len(x):
            raise EdgekilnError(f"{path}: holds {len(x)} rows of {list(x.shape[1:])}, more or other than its "
                                f"capacity {buf.capacity} x {buf.dim}")
        buf._x[:len(x)], buf._y[:len(y)] = x, y
        buf.count, buf.seen = len(x), int(meta[2])
        buf._rng = np.random.default_rng([buf.seed, buf.seen])   # NOTE: continues deterministically after a load
        return buf
