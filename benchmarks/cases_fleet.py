"""Benchmark case: the update server under a fleet of simulated agents (SQLite and PostgreSQL)."""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.suite import CaseResult
from edgekiln.report import md_table

AGENTS, DURATION_S, INTERVAL_S = 500, 60.0, 5.0


def fleet_load(work: Path, quick: bool) -> CaseResult:
    """500 agents (asyncio + httpx, one process) poll a uvicorn server on loopback for 60 s."""
    from edgekiln.fleet.load import run_load
    from edgekiln.fleet.pg_local import LocalPostgres, postgres_bin

    agents, duration = (100, 10.0) if quick else (AGENTS, DURATION_S)
    if work.exists():
        shutil.rmtree(work)
    rows = []
    rows.append({"database": "SQLite (embedded)",
                 **run_load(work / "sqlite", f"sqlite:///{work / 'sqlite' / 'fleet.db'}", agents=agents,
                            duration_s=duration, interval_s=INTERVAL_S)})
    if postgres_bin() is not None:
        pg = LocalPostgres()
        with pg:
            rows.append({"database": "PostgreSQL 15 (loopback)",
                         **run_load(work / "pg", pg.fresh_database("load"), agents=agents, duration_s=duration,
                                    interval_s=INTERVAL_S)})
    offered = 2 * agents / INTERVAL_S
    table = md_table(["database", "agents", "requests", "errors", "req/s", "check p50 ms", "check p99 ms",
                      "director root probe p50 / p99 ms", "timestamp p50 / p99 ms", "server CPU ms/req"],
                     [[r["database"], r["agents"], f"{r['requests']:,}", r["errors"], f"{r['requests_per_s']:.0f}",
                       f"{r['all_p50_ms']:.1f}", f"{r['all_p99_ms']:.1f}",
                       f"{r['root_probe_p50_ms']:.1f} / {r['root_probe_p99_ms']:.1f}",
                       f"{r['timestamp_p50_ms']:.1f} / {r['timestamp_p99_ms']:.1f}",
                       f"{r['server_cpu_ms_per_request']:.2f}"] for r in rows])
    md = (f"{agents} simulated agents in one asyncio process (httpx, one keep-alive connection each) poll "
          f"`GET /director/metadata/2.root.json` (404) and `GET /director/metadata/timestamp.json` every {INTERVAL_S:g} s (+-10% "
          f"jitter; {offered:.0f} requests/s offered) for {duration:g} s against `edgekiln serve` (uvicorn, one "
          "process) on loopback, on the same 2 cores; a rollout to the group is running. 'check' is either "
          "request; an error is any answer but 200 (404 for the root probe: no newer root) or a transport failure. Server CPU per request is the server "
          "process's user+system time over the run divided by the requests (less sensitive to other load on "
          "the machine than latency).\n\n" + table)
    return CaseResult("fleet", "Update server under 500 polling agents", md, {"rows": rows})
