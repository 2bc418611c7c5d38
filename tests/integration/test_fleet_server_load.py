"""A short version of the `fleet` benchmark case: 50 agents poll a real uvicorn server for 5 s."""

from __future__ import annotations

from edgekiln.fleet.load import run_load


def test_fifty_agents_poll_a_real_server_with_zero_errors(tmp_path):
    agents = 50
    out = run_load(tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}", agents=agents, duration_s=5.0, interval_s=1.0)
    print(out)
    assert out["errors"] == 0, f"{out['errors']} errors, e.g. {out['error_samples']}"
    # every agent polled (two requests) at least once; on an idle machine each polls about 5 times
    assert out["requests"] >= 2 * agents, f"only {out['requests']} requests from {agents} agents in 5 s"
    assert out["root_probe_p50_ms"] > 0 and out["timestamp_p99_ms"] >= out["timestamp_p50_ms"]
