"""Importance criteria, global vs per-layer ratios, MACs/latency targets, sensitivity scan and the
iterative schedule, on tiny seeded models."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgekiln.compress.sensitivity import (
    SensitivityPoint,
    prunable_groups,
    ratios_within,
    sensitivity_scan,
)
from edgekiln.compress.structured import (
    count_macs,
    iterative_prune,
    prune_channels,
    ratio_for_macs,
    ratio_for_reduction,
    rebuild,
)
from edgekiln.errors import BudgetNotMet, EdgekilnError
from edgekiln.models import zoo
from edgekiln.models.torch_export import export_to_onnx

SHAPE = (1, 1, 12, 12)


def _plain(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(32, 10)).eval()


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 1, 12, 12, generator=g), torch.randint(0, 10, (32,), generator=g)




@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "bn-scale"])
def test_every_criterion_halves_the_channels_and_keeps_the_output(importance):
    model = _plain()
    prune_channels(model, SHAPE, ratio=0.5, importance=importance, grad_batch=_batch())
    assert (model[0].out_channels, model[3].out_channels) == (8, 16)
    assert model(torch.zeros(4, *SHAPE[1:])).shape == (4, 10)


def test_criteria_choose_the_filters_they_promise():
    ref = _plain()
    with torch.no_grad():   # make filter 3 the largest by L1 and give it the smallest BN scale
        ref[0].weight[3].mul_(10)
        ref[1].weight.fill_(1.0)
        ref[1].weight[3] = 1e-3
    l1, bn = copy.deepcopy(ref), copy.deepcopy(ref)
    prune_channels(l1, SHAPE, ratio=0.5, importance="l1")
    prune_channels(bn, SHAPE, ratio=0.5, importance="bn-scale")

    def has_filter3(m: nn.Sequential) -> bool:
        return any(torch.equal(w, ref[0].weight[3]) for w in m[0].weight)

    assert has_filter3(l1), "l1 removed the filter with the largest L1 norm"
    assert not has_filter3(bn), "bn-scale kept the channel whose BatchNorm scale is ~0"


def test_taylor_needs_data_and_bn_scale_needs_batchnorm():
    with pytest.raises(ValueError, match="taylor importance needs a batch"):
        prune_channels(_plain(), SHAPE, ratio=0.5, importance="taylor")
    no_bn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 100, 10))
    with pytest.raises(EdgekilnError, match="bn-scale importance needs BatchNorm"):
        prune_channels(no_bn, SHAPE, ratio=0.5, importance="bn-scale")


def test_global_scope_prunes_unevenly_and_layer_ratios_apply_per_layer():
    model = _plain()
    with torch.no_grad():
        # NOTE: Torch-Pruning normalizes scores per group, so global pruning compares the *shape* of
        # each layer's distribution: 24 of conv 2's 32 channels are made near-useless (tiny filters
        # and BN scales); a global 40% should take them and spare conv 1.
        model[3].weight[8:].mul_(0.01)
        model[4].weight.fill_(1.0)
        model[4].weight[8:] = 0.01
    prune_channels(model, SHAPE, ratio=0.4, global_pruning=True)
    assert model[0].out_channels >= 12 and model[3].out_channels <= 16, \
        (model[0].out_channels, model[3].out_channels)
    per_layer = _plain()
    prune_channels(per_layer, SHAPE, ratio=0.0, layer_ratios={"3": 0.75})
    assert (per_layer[0].out_channels, per_layer[3].out_channels) == (16, 8)
    rounded = _plain()
    prune_channels(rounded, SHAPE, ratio=0.3, round_to=8)
    assert rounded[0].out_channels % 8 == 0 and rounded[3].out_channels % 8 == 0
    with pytest.raises(EdgekilnError, match="unknown module"):
        prune_channels(_plain(), SHAPE, ratio=0.0, layer_ratios={"nope": 0.5})


def test_macs_target_is_reached_with_the_smallest_ratio():
    model = _plain()
    base = count_macs(model, SHAPE)
    ratio = ratio_for_macs(model, SHAPE, 0.6)
    reached = 1 - count_macs(prune_channels(copy.deepcopy(model), SHAPE, ratio=ratio), SHAPE) / base
    below = 1 - count_macs(prune_channels(copy.deepcopy(model), SHAPE, ratio=ratio - 0.02), SHAPE) / base
    assert reached >= 0.6 > below, f"ratio {ratio}: removes {reached:.3f}; 2% less removes {below:.3f} (target 0.6)"
    assert count_macs(model, SHAPE) == base, "the search must not prune the model it was given"
    with pytest.raises(BudgetNotMet, match="cannot remove 99% of the cost"):
        ratio_for_reduction(model, SHAPE, 0.99, lambda m: count_macs(m, SHAPE))


def test_latency_target_on_a_device_profile():
    from edgekiln.passes.prune import latency_cost

    model = zoo.mobilenet_v2_style(width_mult=0.5)
    model.eval()
    cost = latency_cost("cortex-m4", model.input_shape)
    ratio = ratio_for_reduction(model, model.input_shape, 0.5, cost)
    before, after = cost(model), cost(prune_channels(copy.deepcopy(model), model.input_shape, ratio=ratio))
    assert after <= 0.5 * before + 1e-9, f"estimated cortex-m4 latency {before:.3f} -> {after:.3f} ms at ratio {ratio}"


def test_iterative_schedule_reaches_the_ratio_in_steps_and_finetunes_after_each():
    model = _plain()
    seen: list[tuple[int, int]] = []
    iterative_prune(model, SHAPE, ratio=0.75, steps=3, finetune=lambda m, k: seen.append((k, m[3].out_channels)))
    assert seen == [(0, 24), (1, 16), (2, 8)], seen
    layered = _plain()
    iterative_prune(layered, SHAPE, ratio=0.0, steps=2, finetune=None, layer_ratios={"0": 0.5})
    assert (layered[0].out_channels, layered[3].out_channels) == (8, 32)


def test_sensitivity_scan_groups_follow_dependencies_and_ratios_within():
    model = zoo.mobilenet_v2_style(width_mult=0.5, blocks=3)
    model.eval()
    groups = prunable_groups(model, model.input_shape)
    # the residual block (module 5: 24 -> 24 channels, stride 1) ties its projection to module 4's
    tied = [g for g in groups if {"4.block.6", "5.block.6"} <= set(g.members)]
    assert len(tied) == 1, [g.members for g in groups]
    x, y = _batch()
    x = torch.nn.functional.interpolate(x, size=(28, 28))
    before = copy.deepcopy(model.state_dict())
    calls = []
    g2, points = sensitivity_scan(model, model.input_shape, lambda m: float(m(x).argmax(1).eq(y).float().mean()),
                                  ratios=(0.5,), progress=lambda i, n: calls.append((i, n)))
    assert [g.name for g in g2] == [g.name for g in groups] and len(points) == len(groups)
    assert calls[-1] == (len(groups), len(groups))
    assert all(p.macs < count_macs(model, model.input_shape) for p in points)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the scan changed the model"
    pts = [SensitivityPoint("a", 0.25, 0.97, 1), SensitivityPoint("a", 0.5, 0.95, 1),
           SensitivityPoint("b", 0.25, 0.90, 1), SensitivityPoint("c", 0.75, 0.979, 1)]
    assert ratios_within(pts, baseline=0.98, max_drop=0.01) == {"a": 0.25, "c": 0.75}


def test_pruned_fire_and_1d_models_rebuild_and_run_in_onnxruntime(tmp_path):
    for factory, kwargs in (("edgekiln.models.zoo_light:squeezenet_style", {"width_mult": 0.5}),
                            ("edgekiln.models.zoo_light:cnn1d", {"channels": 8})):
        torch.manual_seed(0)
        model = zoo.build(factory.rpartition(":")[2], **kwargs).eval()
        shape = model.input_shape
        macs = count_macs(model, shape)
        prune_channels(model, shape, ratio=0.5)
        model.eval()
        assert count_macs(model, shape) < 0.6 * macs
        torch.save(model.state_dict(), tmp_path / "p.pt")
        again = rebuild(factory, str(tmp_path / "p.pt"), kwargs)
        again.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
        x = np.random.default_rng(0).standard_normal((2, *shape[1:])).astype(np.float32)
        export_to_onnx(again.eval(), shape, tmp_path / "p.onnx")
        got = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"input": x})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        assert got.shape == ref.shape == (2, 10 if "squeeze" in factory else 6)
        np.testing.assert_allclose(got, ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
