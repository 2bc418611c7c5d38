"""`edgekiln run --device` and placed variants: ``auto`` picks onnxruntime providers present here
(never Azure), an absent device is refused with what is present, and a bundle whose manifest
places a variant runs it as its chain of segments, while older readers still see a plain bundle."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.utils import Extractor

from edgekiln.cli.app import main
from edgekiln.errors import EdgekilnError
from edgekiln.execution.chain import ChainSession
from edgekiln.execution.runtimes import device_providers
from edgekiln.fileio import atomic_write_json, sha256_file
from edgekiln.runtime.bundle import build_bundle, health_check
from edgekiln.runtime.engine import Runtime
from edgekiln.runtime.manifest import Manifest, load_manifest
from edgekiln.testing.tiny import random_npz, tiny_conv_onnx

#: the keys a variant entry had before placements existed: older readers build Variant(**entry)
OLD_VARIANT_KEYS = {"name", "file", "sha256", "precision", "size_bytes", "metric", "metric_name", "latency_ms", "macs",
                    "provenance"}


def _place_run(path):
    """A run folder as `edgekiln place --out` writes it: the model, segments/, placement.json."""
    path.mkdir()
    model = tiny_conv_onnx(path / "model.onnx")
    random_npz(path / "eval.npz", (1, 1, 8, 8), n=4, seed=3)
    atomic_write_json(path / "report.json", {"artifact": "model.onnx", "metric": 0.9, "latency_ms": 0.1})
    ex = Extractor(onnx.shape_inference.infer_shapes(onnx.load(str(model))))
    (path / "segments").mkdir()
    segs = []
    for k, (unit, ins, outs) in enumerate((("npu", ["input"], ["r1"]), ("cpu", ["r1"], ["logits"]))):
        rel = f"segments/seg{k:02d}_{unit}.onnx"
        onnx.save(ex.extract_model(ins, outs), path / rel)
        segs.append({"index": k, "unit": unit, "runtime": "onnxruntime", "file": rel, "sha256": sha256_file(path / rel),
                     "inputs": ins, "outputs": outs, "est_ms": 0.02, "source": "simulated" if k == 0 else "estimate"})
    atomic_write_json(path / "placement.json", {"version": 1, "target": "t", "objective": "latency",
                                                "model_sha256": sha256_file(model), "outputs": ["logits"],
                                                "segments": segs})
    return path


@pytest.fixture
def placed(tmp_path):
    build_bundle([_place_run(tmp_path / "run")], tmp_path / "bundle")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32))
    return tmp_path


def test_auto_picks_present_providers_best_first_and_never_azure(placed):
    present = ort.get_available_providers()
    auto = device_providers("auto")
    assert auto[-1] == "CPUExecutionProvider" and "AzureExecutionProvider" not in auto, (present, auto)
    assert set(auto) <= set(present), (present, auto)
    assert device_providers("auto", ["AzureExecutionProvider", "CPUExecutionProvider", "CUDAExecutionProvider",
                                     "TensorrtExecutionProvider"]) == \
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    rt = Runtime(placed / "bundle", device="auto", placements=False, warmup=0)
    assert rt.session("fp32").sess.get_providers() == auto     # the session really runs on them


def test_an_absent_device_is_refused_with_what_is_present(placed, capsys):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is present on this machine")
    with pytest.raises(SystemExit) as exc:
        main(["run", str(placed / "bundle"), "--input", str(placed / "x.npy"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "device 'cuda' is not present here; present: cpu (CPUExecutionProvider)" in err, err
    assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(EdgekilnError, match="not present here"):
        device_providers("azure", ["AzureExecutionProvider", "CPUExecutionProvider"])


def test_a_placed_variant_runs_as_its_chain_and_old_readers_see_a_plain_bundle(placed, capsys):
    bundle = placed / "bundle"
    data = json.loads((bundle / "manifest.json").read_text())
    assert data["placements"] == {"fp32": "placement/fp32/placement.json"}
    assert all(set(v) == OLD_VARIANT_KEYS for v in data["variants"]), [sorted(v) for v in data["variants"]]
    assert (bundle / "models" / "fp32.onnx").is_file() and (bundle / "placement/fp32/segments/seg00_npu.onnx").is_file()

    rt = Runtime(bundle, warmup=0)
    assert isinstance(rt.session("fp32"), ChainSession)
    x = np.load(placed / "x.npy")
    whole = Runtime(bundle, warmup=0, placements=False)
    np.testing.assert_allclose(rt.infer(x), whole.infer(x), rtol=0, atol=1e-5)
    assert health_check(bundle)["ok"]

    main(["run", str(bundle), "--input", str(placed / "x.npy"), "--device", "auto", "--repeat", "2"])
    out = json.loads(capsys.readouterr().out)
    assert out["device"] == "cpu" or out["providers"][0] != "CPUExecutionProvider", out
    assert out["placement"]["file"] == "placement/fp32/placement.json", out
    assert out["placement"]["sources"] == ["simulated", "measured"] and out["variants"]["fp32"]["count"] == 2, out

    # a changed segment file is refused when the variant loads
    seg = bundle / "placement/fp32/segments/seg01_cpu.onnx"
    seg.write_bytes(seg.read_bytes() + b"\0")
    with pytest.raises(EdgekilnError, match="does not match its SHA-256"):
        Runtime(bundle, warmup=0).session("fp32")
    assert load_manifest(bundle).placements == {"fp32": "placement/fp32/placement.json"}
    for bad, message in (({"int8": "p.json"}, "placements name variant"), (["p.json"], "placements must map")):
        with pytest.raises(EdgekilnError, match=message):
            Manifest.from_dict({**data, "placements": bad})
    assert "placements" not in Manifest.from_dict({**data, "placements": {}}).to_dict()   # plain bundles: as before
