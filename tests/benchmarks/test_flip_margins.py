"""The quantization bench says how close a call each flipped image was for the FP32 model."""

from __future__ import annotations

import numpy as np

from benchmarks.cases_quant import margin_ranks


def test_margin_rank_one_is_the_closest_call():
    logits = np.array([[0.0, 5.0, 1.0],    # margin 4
                       [0.0, 1.0, 0.9],    # margin 0.1: the closest call
                       [3.0, 0.0, -1.0]])  # margin 3
    ranks = margin_ranks(logits)
    assert ranks.tolist() == [3, 1, 2], ranks.tolist()
