"""Unstructured magnitude pruning and an honest size report.

Zeroing individual weights does not make a dense runtime faster (the zeros are still
multiplied); it only compresses. The report therefore gives the dense size and the size of a
compressed sparse encoding (CSR indices + values, zlib), and says so.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn


def prunable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, m.weight) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def magnitude_prune(model: nn.Module, ratio: float, *, scope: str = "global") -> dict[str, float]:
    """Zero the ``ratio`` smallest-magnitude weights, over all layers (``global``) or in each
    layer (``per-layer``); returns the sparsity reached per layer. In place."""
    params = prunable(model)
    with torch.no_grad():
        if scope == "global":
            allw = torch.cat([p.detach().abs().reshape(-1) for _, p in params])
            k = int(round(ratio * allw.numel()))
            if k:
                # NOTE: exactly k zeros even with ties at the threshold: rank, then cut
                order = torch.argsort(allw, stable=True)[:k]
                mask = torch.ones_like(allw, dtype=torch.bool)
                mask[order] = False
                start = 0
                for _, p in params:
                    n = p.numel()
                    p.mul_(mask[start:start + n].reshape(p.shape))
                    start += n
        else:
            for _, p in params:
                flat = p.detach().abs().reshape(-1)
                k = int(round(ratio * flat.numel()))
                if k:
                    order = torch.argsort(flat, stable=True)[:k]
                    p.view(-1)[order] = 0.0
    return {n: float((p == 0).float().mean()) for n, p in params}


def sparse_bytes(model: nn.Module) -> dict[str, int]:
    """Dense float32 bytes vs a CSR-like encoding (uint16 column deltas + float32 values), zlib'd."""
    dense = 0
    chunks = []
    for _, p in prunable(model):
        w = p.detach().numpy().reshape(p.shape[0], -1)
        dense += w.nbytes
        nz = np.nonzero(w)
        chunks += [np.diff(np.concatenate([[0], np.flatnonzero(w.reshape(-1))])).astype(np.uint32).tobytes(),
                   w[nz].astype(np.float32).tobytes(), np.bincount(nz[0], minlength=w.shape[0]).astype(np.uint32).tobytes()]
    return {"dense_bytes": dense, "sparse_compressed_bytes": len(zlib.compress(b"".join(chunks), 9))}
