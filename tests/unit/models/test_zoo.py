"""Zoo builders export to ONNX with only C-backend ops and match onnxruntime; the training loop
is deterministic, restores global state and accepts a custom loss."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgekiln.errors import EdgekilnError
from edgekiln.models import zoo
from edgekiln.models.support import unsupported_ops
from edgekiln.models.torch_export import export_to_onnx
from edgekiln.models.training import evaluate_accuracy, predict, random_affine, train_classifier

# name -> (kwargs, input shape, documented parameter range)
CASES = {
    "mnist_cnn": ({}, (1, 28, 28), (50_000, 220_000)),
    "digits_cnn": ({}, (1, 8, 8), (1_000, 10_000)),
    "mobilenet_v2_style": ({}, (1, 28, 28), (20_000, 200_000)),
    "ds_cnn": ({}, (1, 28, 28), (10_000, 50_000)),
    "ds_cnn_kws": ({"input_size": (49, 10)}, (1, 49, 10), (10_000, 50_000)),
}


def _export(tmp_path, name: str, kwargs: dict, seed: int = 0) -> tuple[torch.nn.Module, onnx.ModelProto, str]:
    torch.manual_seed(seed)
    model = zoo.build(name.removesuffix("_kws"), **kwargs).eval()
    path = tmp_path / f"{name}.onnx"
    export_to_onnx(model, model.input_shape, path, input_name="input", output_name="logits")
    return model, onnx.load(str(path)), str(path)


@pytest.mark.parametrize("name", list(CASES))
def test_builder_shape_params_export_and_onnxruntime_parity(tmp_path, name):
    kwargs, chw, (lo, hi) = CASES[name]
    model, proto, path = _export(tmp_path, name, kwargs)
    assert model.input_shape == (1, *chw)
    params = zoo.count_params(model)
    assert lo <= params <= hi, f"{name}: {params:,} parameters outside the documented [{lo:,}, {hi:,}]"
    # Only ops the integer C backend lowers (its table lives in edgekiln.models.support);
    # BatchNorm must be folded into the convs by the export.
    assert unsupported_ops(proto)["c"] == [], f"{name}: {unsupported_ops(proto)['c']}"
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)

    x = np.random.default_rng(0).standard_normal((3, *chw)).astype(np.float32)  # batch 3: dynamic batch works
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert ref.shape == (3, 10)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    # float32 reassociation only: allow 1e-5 of the logits' magnitude.
    bound = 1e-5 * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= bound, f"{name}: ORT vs torch max abs error {err:.3g} > {bound:.3g} (seed 0)"
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("name", ["mnist_cnn", "mobilenet_v2_style"])
def test_builders_are_deterministic_given_the_seed(name):
    def weights(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return list(zoo.build(name).state_dict().values())

    assert all(torch.equal(a, b) for a, b in zip(weights(3), weights(3), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights(3), weights(4), strict=True))


def _depthwise(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    dims = {i.name: list(i.dims) for i in proto.graph.initializer}
    found = []
    for n in proto.graph.node:
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        # Depthwise: one group per channel, so the weight is [C, 1, kh, kw] with C == group.
        if n.op_type == "Conv" and group > 1 and dims[n.input[1]][:2] == [group, 1]:
            found.append(n)
    return found


def test_mobilenet_style_exports_depthwise_convs_and_residual_adds(tmp_path):
    _, proto, _ = _export(tmp_path, "mobilenet_v2_style", {})
    assert len(_depthwise(proto)) == 6, "one depthwise 3x3 conv per inverted-residual block expected"
    assert sum(n.op_type == "Add" for n in proto.graph.node) == 3, "blocks 1, 3 and 5 keep their shape: 3 adds"
    clips = sum(n.op_type == "Clip" for n in proto.graph.node)
    assert clips == 12, f"ReLU6 -> Clip: stem 1 + first block 1 + 2 in each of the other 5 = 12, got {clips}"


def test_ds_cnn_blocks_are_depthwise_separable(tmp_path):
    _, proto, _ = _export(tmp_path, "ds_cnn", {})
    assert len(_depthwise(proto)) == 4


def test_width_mult_scales_mobilenet_channels():
    small, big = zoo.mobilenet_v2_style(width_mult=0.5), zoo.mobilenet_v2_style(width_mult=2.0)
    assert zoo.count_params(small) < zoo.count_params(zoo.mobilenet_v2_style()) < zoo.count_params(big)
    assert zoo.mobilenet_v2_style(in_channels=3, num_classes=5)(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


def test_factory_names_and_user_errors():
    assert set(zoo.BUILDERS) >= {"mnist_cnn", "digits_cnn", "mobilenet_v2_style"}
    with pytest.raises(EdgekilnError, match="unknown model 'resnet9000'; known: mnist_cnn"):
        zoo.build("resnet9000")
    with pytest.raises(EdgekilnError, match="model 'digits_cnn': .*'depth'"):
        zoo.build("digits_cnn", depth=3)


# --- training loop ---------------------------------------------------------------------------

def _toy(seed: int = 0, n: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """A separable 8x8 task: the label is the quadrant holding the brightest blob."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    for i, q in enumerate(y):
        r, c = divmod(int(q), 2)
        x[i, 0, r * 4:r * 4 + 4, c * 4:c * 4 + 4] += 1.5
    return x, y.astype(np.int64)


def _fresh() -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.digits_cnn(num_classes=4)


def _train(seed: int, **kw) -> tuple[torch.nn.Module, list[dict]]:
    x, y = _toy()
    model = _fresh()
    hist = train_classifier(model, x, y, epochs=3, batch_size=32, seed=seed, quiet=True, **kw)
    return model, hist


def test_training_is_deterministic_learns_and_restores_global_state():
    x, y = _toy()
    m1 = _fresh()
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    h1 = train_classifier(m1, x, y, epochs=3, batch_size=32, seed=5, quiet=True, augment=True)
    assert torch.get_num_threads() == threads, "train_classifier must restore torch's thread count"
    assert torch.equal(torch.random.get_rng_state(), rng), "train_classifier must not consume the global RNG"
    m2, h2 = _train(seed=5, augment=True)
    m3, _ = _train(seed=6, augment=True)
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1), "same seed must give identical weights"
    assert not all(torch.equal(sd1[k], sd3[k]) for k in sd1), "seeds 5 and 6 gave identical weights"
    assert [(e["loss"], e["accuracy"]) for e in h1] == [(e["loss"], e["accuracy"]) for e in h2]
    assert [e["epoch"] for e in h1] == [1, 2, 3] and h1[-1]["loss"] < h1[0]["loss"]
    x, y = _toy(seed=1)
    acc = evaluate_accuracy(m1, x, y)
    assert acc >= 0.9, f"toy quadrant task accuracy {acc:.3f} < 0.9 (seed 5)"
    assert not m1.training, "the model is left in eval mode"


def test_custom_loss_hook_eval_history_and_thread_count(monkeypatch):
    calls, threads = [], []

    def scalar_loss(model, xb, yb):  # a distillation-style hook returning only the loss
        calls.append(len(xb))
        threads.append(torch.get_num_threads())
        return torch.nn.functional.cross_entropy(model(xb), yb)

    x, y = _toy()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _, hist = _train(seed=0, loss_fn=scalar_loss, eval_data=(x[:50], y[:50]))
        assert set(threads) == {1}, f"training must use OMP_NUM_THREADS=1 threads, used {set(threads)}"
        assert torch.get_num_threads() == 2, "the caller's thread count must be restored"
    finally:
        torch.set_num_threads(before)
    assert sum(calls) == 3 * len(x), "loss_fn must see every training sample once per epoch"
    assert all(e["accuracy"] is None for e in hist), "no logits returned -> no training accuracy"
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 for e in hist)

    def tuple_loss(model, xb, yb):
        logits = model(xb)
        return torch.nn.functional.cross_entropy(logits, yb), logits

    _, hist = _train(seed=0, loss_fn=tuple_loss)
    assert all(0.0 <= e["accuracy"] <= 1.0 for e in hist)


def test_augment_rejects_non_images_and_zero_affine_is_identity():
    with pytest.raises(ValueError, match="augment needs NCHW images"):
        train_classifier(torch.nn.Linear(4, 2), np.zeros((8, 4), np.float32), np.zeros(8, np.int64), epochs=1,
                         quiet=True, augment=True)
    xb = torch.from_numpy(_toy(n=4)[0])
    same = random_affine(xb, torch.Generator().manual_seed(0), degrees=0, scale=0, shift_pixels=0)
    err = float((same - xb).abs().max())
    assert err < 1e-5, f"identity affine changed pixels by {err:.3g}"


def test_predict_batches_and_accuracy():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x = np.random.default_rng(0).standard_normal((300, 1, 8, 8)).astype(np.float32)
    logits = predict(model, x, batch_size=128)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-6)
    y = ref.argmax(1)
    y[:30] = (y[:30] + 1) % 3
    assert evaluate_accuracy(model, x, y) == pytest.approx(0.9)
