"""The staged early-exit runner (numpy + onnxruntime only): stops at the first confident exit."""

from __future__ import annotations

import numpy as np
import pytest

from edgekiln.runtime.early_exit import StagedRunner


def _stage(path, *, last: bool, with_confidence: bool = True):
    """Stage: features = input * 2; exit logits = input; confidence in the graph (or not)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4])  # noqa: E731
    if last:
        nodes, outs = [helper.make_node("Neg", ["input"], ["logits"])], [vi("logits")]
    else:
        nodes = [helper.make_node("Mul", ["input", "two"], ["features"]),
                 helper.make_node("Identity", ["input"], ["exit_logits"])]
        outs = [vi("features"), vi("exit_logits")]
        if with_confidence:
            nodes += [helper.make_node("Softmax", ["input"], ["p"], axis=1),
                      helper.make_node("ReduceMax", ["p"], ["exit_confidence"], keepdims=0, axes=[1])]
            outs.append(helper.make_tensor_value_info("exit_confidence", TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(nodes, "stage", [vi("input")], outs, [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


@pytest.fixture(params=[True, False], ids=["confidence-in-graph", "confidence-in-numpy"])
def stages(tmp_path, request):
    return [_stage(tmp_path / "s0.onnx", last=False, with_confidence=request.param),
            _stage(tmp_path / "s1.onnx", last=False, with_confidence=request.param),
            _stage(tmp_path / "s2.onnx", last=True)]


def test_stops_at_the_first_exit_whose_confidence_clears_its_threshold(stages):
    confident = np.array([[8.0, 0.0, 0.0, 0.0]], np.float32)        # top-1 prob ~0.999
    unsure = np.array([[0.1, 0.0, 0.0, 0.0]], np.float32)           # 0.269 at exit 0, 0.289 at exit 1 (x2)
    runner = StagedRunner(stages, [0.9, 0.28])
    logits, k = runner(confident)
    assert k == 0 and np.array_equal(logits, confident)
    logits, k = runner(unsure)
    assert k == 1 and np.allclose(logits, unsure * 2)               # exit 1 sees the doubled features
    never = StagedRunner(stages, [1.01, 1.01])
    logits, k = never(confident)
    assert k == 2 and np.allclose(logits, -confident * 4)           # every stage ran
    assert runner.exits_taken == [1, 1, 0] and never.exits_taken == [0, 0, 1]


def test_all_exits_returns_every_exit_on_a_batch(stages):
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    outs = StagedRunner(stages, [0.5, 0.5]).all_exits(x, batch_size=2)
    assert [o.shape for o in outs] == [(5, 4)] * 3
    assert np.allclose(outs[0], x) and np.allclose(outs[1], 2 * x) and np.allclose(outs[2], -4 * x)


def test_threshold_count_must_match_the_stages(stages):
    with pytest.raises(ValueError, match="3 stages need 2 thresholds, got 1"):
        StagedRunner(stages, [0.9])


def test_returned_logits_are_not_overwritten_by_the_next_call(stages):
    # The batch-1 path reuses bound buffers between calls; what it returns must be a copy.
    runner = StagedRunner(stages, [0.9, 0.28])
    first, _ = runner(np.array([[8.0, 0.0, 0.0, 0.0]], np.float32))
    runner(np.array([[0.1, 0.0, 0.0, 0.0]], np.float32))
    runner(np.array([[0.0, 0.0, 0.0, 9.0]], np.float32))
    assert np.array_equal(first, [[8.0, 0.0, 0.0, 0.0]]), first


def test_batch_one_and_larger_batches_give_the_same_logits(stages):
    x = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    runner = StagedRunner(stages, [1.01, 1.01])
    one_by_one = np.concatenate([runner(x[i:i + 1])[0] for i in range(len(x))])
    assert np.allclose(one_by_one, runner.all_exits(x)[-1]) and np.allclose(one_by_one, -4 * x)
