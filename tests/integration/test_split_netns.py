"""Split planning measured over a real shaped link: two network namespaces, a veth pair in a
private /30, tc shaping, the FastAPI tail server in one namespace and the device in the other.

Skips with the reason when namespaces or tc are not usable (not root, no iproute2, a kernel
without the qdiscs). The full sweep (1/10/100 Mbit/s, two models) is the ``split`` bench case.
"""

from __future__ import annotations

import subprocess

import pytest

from benchmarks.netns import ShapedLink, unusable_reason

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module", autouse=True)
def _netns_usable():
    reason = unusable_reason()
    if reason:
        pytest.skip(f"split over a shaped link: {reason}")


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20).stdout


def test_namespaces_are_removed_even_when_the_body_fails():
    link = ShapedLink(tag="fail")
    with pytest.raises(RuntimeError, match="boom"), link:
        link.shape(rate_mbit=10.0, delay_ms=1.0)
        assert link.device_ns in _namespaces()
        raise RuntimeError("boom")
    listed = _namespaces()
    assert link.device_ns not in listed and link.server_ns not in listed, listed


@pytest.mark.timed
def test_planner_choice_is_the_best_measured_cut_at_10_mbit(tmp_path):
    from benchmarks.cases_split import chain_cnn, measure_all_cuts

    model = chain_cnn(tmp_path / "chain.onnx")
    with ShapedLink(tag="test") as link:
        run = measure_all_cuts(model, link, tmp_path / "run", bandwidths_mbit=(10.0,), repeats=5, port=18791)
    r = run["results"][0]
    print({k: v for k, v in r.items() if k != "median_ms"})
    # The link is really shaped: sending the 48 KiB input alone takes 39 ms at 10 Mbit/s.
    assert r["all_server_ms"] >= 3 * 64 * 64 * 4 * 8 / 10e6 * 1000, r
    assert r["chosen_ms"] <= 1.05 * r["best_ms"], (
        f"planner chose {r['chosen']} ({r['chosen_ms']:.1f} ms) but {r['best']} measured {r['best_ms']:.1f} ms "
        f"(tolerance 5%; {r['valid_cuts']} cuts measured)")
    assert r["chosen_ms"] <= min(r["all_device_ms"], r["all_server_ms"]) * 1.01, r
    assert r["table_agrees"], "the breakpoint table disagrees with re-planning at this bandwidth"
