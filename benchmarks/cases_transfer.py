"""Benchmark case `transfer`: polling vs MQTT vs WebSocket notices (idle cost, rollout latency), and
delta vs full bundle bytes.

Setup: ``edgekiln``'s server app under uvicorn in a subprocess (TLS, ``ws="websockets-sansio"``),
a Mosquitto broker over mqtts, and N simulated agents in this process
(:mod:`edgekiln.fleet.transfer_load`: asyncio httpx requests identical to a real agent's, real
push channel classes). The server and the broker each sit behind a :class:`CountingRelay`.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.suite import CaseResult
from edgekiln.report import md_table

AGENTS, WINDOW_S, SCALE = 200, 120.0, 30.0
POLL_S, KEEPALIVE_S, SAFETY_POLL_S, PUSH_JITTER_S = 60.0, 60.0, 900.0, 0.5
DELTA_PARAMS = 2_400_000


def _admin(url: str, token: str, ca: Path) -> Any:
    import httpx

    from edgekiln.runtime.transport_security import client_ssl_context

    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                        verify=client_ssl_context(ca))


def _publish(admin: Any, tar: Path, model: str, version: int) -> dict[str, Any]:
    r = admin.post(f"/v1/models/{model}/versions/{version}", params={"channel": "stable"},
                   content=tar.read_bytes(), headers={"Content-Type": "application/octet-stream"})
    r.raise_for_status()
    return dict(r.json())


def _rollout(admin: Any, model: str, version: int, group: str) -> float:
    r = admin.post("/v1/rollouts", json={"model": model, "version": version, "group": group, "waves": [100]})
    r.raise_for_status()
    return time.monotonic()


def _raise_fd_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192 and (hard == resource.RLIM_INFINITY or hard > soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (8192 if hard == resource.RLIM_INFINITY else min(8192, hard), hard))


def _reset(*relays: Any) -> None:
    for relay in relays:
        if relay is not None:
            relay.reset()


def _bundle(work: Path, version: int, **kw: Any) -> Path:
    from edgekiln.fleet.bundle_tar import write_reproducible
    from edgekiln.fleet.sample import sample_mlp_bundle

    tag = f"v{version}-" + "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
    folder = work / "bundles" / tag
    if folder.exists():
        shutil.rmtree(folder)
    return write_reproducible(sample_mlp_bundle(folder, version=version, **kw), work / "bundles" / f"{tag}.tar")


def transfer(work: Path, quick: bool) -> CaseResult:
    """Idle bytes and requests per device per hour, rollout time and update bytes, per transport; delta vs full."""
    from edgekiln.fleet import transfer_load as tl
    from edgekiln.fleet.load import free_port
    from edgekiln.fleet.mosquitto import MosquittoBroker, find_mosquitto, mqtt_credentials, password_line
    from edgekiln.fleet.tls_testing import make_test_ca

    agents_n, window, poll_real = (50, 30.0, 10.0) if quick else (AGENTS, WINDOW_S, POLL_S)
    _raise_fd_limit()   # NOTE: 200 agents x (HTTPS + push) x 2 relay ends pass the common 1024 default
    if work.exists():
        shutil.rmtree(work)
    (work / "bundles").mkdir(parents=True)
    ca, cert, key = make_test_ca(work / "tls")
    admin_token = secrets.token_urlsafe(24)
    broker = MosquittoBroker(work / "broker", tls=(cert, key)) if find_mosquitto() else None
    port = free_port()
    config = {"folder": str(work / "server"), "admin_token": admin_token}
    if broker is not None:
        broker.start()
        config.update(mqtt_url=broker.url, mqtt_ca=str(ca), mqtt_password=broker.server_password)
    raw: dict[str, Any] = {"agents": agents_n, "window_s": window, "scale": SCALE, "rows": [], "delta": []}
    try:
        with tl.serve_subprocess(config, port=port, cert=str(cert), key=str(key), ws_ping_s=None,
                                 ca=ca) as proc:
            url = f"https://127.0.0.1:{port}"
            relay = tl.CountingRelay("127.0.0.1", port).start()
            ws_relay = tl.CountingRelay("127.0.0.1", port).start()   # the WebSocket channels only
            mqtt_relay = tl.CountingRelay("127.0.0.1", broker.port).start() if broker is not None else None
            try:
                with _admin(url, admin_token, ca) as admin:
                    tokens = [admin.post("/v1/devices", json={"name": f"sim-{i:04d}", "group": "bench"}).json()["token"]
                              for i in range(agents_n)]
                    if broker is not None:
                        for t in tokens:
                            user, pw = mqtt_credentials(t)
                            broker.lines[user] = password_line(user, pw)
                        broker.add_user(*mqtt_credentials(tokens[0]))   # writes the files and reloads once
                    rows = asyncio.run(_modes(tl, admin, work, tokens, url=f"https://127.0.0.1:{relay.port}",
                                              ws_url=f"https://127.0.0.1:{ws_relay.port}",
                                              mqtt_url=(f"mqtts://127.0.0.1:{mqtt_relay.port}" if mqtt_relay else None),
                                              relays={"http": relay, "websocket": ws_relay, "mqtt": mqtt_relay},
                                              ca=ca, window=window, poll_real=poll_real))
                    raw["rows"] = rows
                    raw["delta"] = _deltas(tl, admin, work, relay, url=f"https://127.0.0.1:{relay.port}",
                                           token=tokens[0], ca=ca, quick=quick)
            finally:
                relay.stop()
                ws_relay.stop()
                if mqtt_relay is not None:
                    mqtt_relay.stop()
            raw["server_alive"] = proc.poll() is None
    finally:
        if broker is not None:
            broker.stop()
    return CaseResult("transfer", "Efficient transfer: polling vs MQTT vs WebSocket, delta vs full",
                      _markdown(raw, quick, broker is not None), raw)


async def _modes(tl: Any, admin: Any, work: Path, tokens: list[str], *, url: str, ws_url: str,
                 mqtt_url: str | None, relays: dict[str, Any], ca: Path, window: float,
                 poll_real: float) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    agents = [tl.SimAgent(t) for t in tokens]
    tl.async_clients(url, agents, ca=ca)
    hours = window * SCALE / 3600.0
    http = relays["http"]
    v1 = _bundle(work, 1, params=5000)
    _publish(admin, v1, "bench", 1)
    _rollout(admin, "bench", 1, "bench")
    await asyncio.gather(*(a.cycle() for a in agents))          # everyone runs v1
    rows: list[dict[str, Any]] = []
    version = 1
    modes = ["polling", "websocket"] + (["mqtt"] if mqtt_url else [])

    def used(mode: str) -> int:
        channel = relays.get(mode)
        return int(http.counts()["bytes"] + (channel.counts()["bytes"] if channel is not None else 0))

    try:
        for mode in modes:
            version += 1
            _publish(admin, _bundle(work, version, params=5000, change=0.1), "bench", version)
            row: dict[str, Any] = {"mode": mode}
            fleet = None
            if mode == "polling":
                _reset(*relays.values())
                before = sum(a.requests for a in agents)
                await tl.poll_loop(agents, duration_s=window, interval_s=POLL_S / SCALE, seed=0)
                row.update(idle_bytes_h_kept=used(mode) / len(agents) / hours,
                           idle_requests_h_kept=(sum(a.requests for a in agents) - before) / len(agents) / hours)
            else:
                _reset(*relays.values())
                fleet = tl.PushFleet(mode, agents, loop, server_url=ws_url, mqtt_url=mqtt_url, ca=str(ca),
                                     keepalive_s=KEEPALIVE_S / SCALE, jitter_s=PUSH_JITTER_S).start()
                deadline = time.monotonic() + 60
                while fleet.connected < len(agents) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                row.update(connected=fleet.connected, connect_bytes=round(relays[mode].counts()["bytes"] / len(agents)))
                await asyncio.sleep(1.0)                               # the retained notice's cycle
            _reset(*relays.values())
            before = sum(a.requests for a in agents)
            interval = POLL_S / SCALE if mode == "polling" else SAFETY_POLL_S / SCALE
            errors = await tl.poll_loop(agents, duration_s=window, interval_s=interval, seed=version,
                                        fresh_connections=True)
            channel = relays.get(mode)
            row.update(idle_bytes_h=used(mode) / len(agents) / hours,
                       idle_channel_bytes_h=(channel.counts()["bytes"] / len(agents) / hours) if channel else None,
                       idle_requests_h=(sum(a.requests for a in agents) - before) / len(agents) / hours,
                       idle_connections_h=http.counts()["connections"] / len(agents) / hours, idle_errors=errors)
            if fleet is not None:
                # NOTE: the rollout runs on real timers: fresh channels with the real keepalive/ping.
                # The scaled idle phase's 2 s keepalive in one loaded process drops a few MQTT clients
                # (mosquitto disconnects after 1.5 keepalives of silence), which is the simulation's
                # time scaling, not the protocol; the drops are counted in `idle_dropped`.
                row["idle_dropped"] = len(agents) - fleet.connected
                fleet.close()
                fleet = tl.PushFleet(mode, agents, loop, server_url=ws_url, mqtt_url=mqtt_url, ca=str(ca),
                                     keepalive_s=KEEPALIVE_S, jitter_s=PUSH_JITTER_S, seed=version).start()
                deadline = time.monotonic() + 60
                while fleet.connected < len(agents) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.0)                               # the retained notice (same rev: no cycle)
                row["connected_at_rollout"] = fleet.connected
                down = [ch for ch in fleet.channels if not ch.connected]
                row["down_at_rollout"] = {"errors": dict(Counter(str(ch.error) for ch in down).most_common(3)),
                                          "sessions_before": dict(Counter(ch.connects for ch in down))}
            _reset(*relays.values())
            installs_before = [len(a.installs) for a in agents]
            t0 = _rollout(admin, "bench", version, "bench")

            def done(installs_before: list[int] = installs_before) -> bool:
                return all(len(a.installs) > n for a, n in zip(agents, installs_before, strict=True))

            if mode == "polling":
                await tl.poll_loop(agents, duration_s=poll_real * 3, interval_s=poll_real, seed=version, until=done,
                                   fresh_connections=poll_real > 5)
            else:
                # NOTE: as the real daemon loop does, an agent whose channel is down polls every interval
                fallback = asyncio.ensure_future(fleet.fallback_poll(interval_s=poll_real, until=done,
                                                                  seed=version))
                deadline = time.monotonic() + 2 * poll_real + 60
                while not done() and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                fallback.cancel()
                row["fallback_cycles"] = fleet.fallback_cycles
            ends = [a.installs[-1] - t0 for a, n in zip(agents, installs_before, strict=True) if len(a.installs) > n]
            starts = sorted(a.started[-1] - t0 for a in agents if a.started and a.started[-1] >= t0)
            row.update(installed=len(ends), rollout_s=max(ends) if ends else None,
                       start_p50_s=starts[len(starts) // 2] if starts else None,
                       update_bytes=used(mode) / len(agents), push_errors=fleet.errors if fleet else 0)
            if fleet is not None:
                fleet.close()
            rows.append(row)
    finally:
        await tl.close_clients(agents)
    return rows


def _deltas(tl: Any, admin: Any, work: Path, relay: Any, *, url: str, token: str, ca: Path,
            quick: bool) -> list[dict[str, Any]]:
    import bsdiff4
    import httpx

    from edgekiln.runtime.transport_security import client_ssl_context

    params = DELTA_PARAMS // 8 if quick else DELTA_PARAMS
    cases = [("fine-tune: last 10% of the weights", {"change": 0.1, "how": "tail"}, {}),
             ("int8: 10% of the weights re-quantized", {"change": 0.1, "how": "scattered", "int8": True},
              {"int8": True}),
             ("full FedAvg round: every weight moves", {"change": 1.0, "how": "all"}, {})]
    out = []
    device = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120,
                          verify=client_ssl_context(ca))
    with device:
        for i, (label, new_kw, base_kw) in enumerate(cases):
            model = f"delta{i}"
            base = _bundle(work, 1, params=params, **base_kw)
            new = _bundle(work, 2, params=params, **new_kw)
            _publish(admin, base, model, 1)
            started = time.perf_counter()
            pub = _publish(admin, new, model, 2)
            publish_s = time.perf_counter() - started
            row: dict[str, Any] = {"case": label, "full_bytes": pub["length"], "publish_s": round(publish_s, 2)}
            relay.reset()
            full = device.get(f"/tuf/targets/{model}/2/bundle.tar")
            full.raise_for_status()
            row["full_wire"] = relay.counts()["bytes"]
            if pub["deltas"]:
                d = pub["deltas"][0]
                relay.reset()
                patch = device.get(f"/tuf/targets/{tl.delta_path(model, 2, 1)}")
                patch.raise_for_status()
                row.update(delta_bytes=d["length"], delta_wire=relay.counts()["bytes"], diff_s=d["diff_s"])
                started = time.perf_counter()
                result = bsdiff4.patch(base.read_bytes(), patch.content)
                row["patch_s"] = round(time.perf_counter() - started, 3)
                assert result == full.content, f"{label}: the patched bundle is not the published one"
            row["ratio"] = round(row.get("delta_wire", row["full_wire"]) / row["full_wire"], 3)
            out.append(row)
    return out


def _fmt(value: Any, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _markdown(raw: dict[str, Any], quick: bool, broker: bool) -> str:
    rows, n, window = raw["rows"], raw["agents"], raw["window_s"]
    polling = next((r for r in rows if r["mode"] == "polling"), None)
    idle = md_table(
        ["transport", "idle bytes / device / hour", "of which push channel", "vs polling",
         "HTTP requests / device / hour",
         "new HTTPS connections / device / hour", "one connect (B)",
         "push connected at rollout", "installed", "rollout: last install (s)", "install start p50 (s)",
         "update bytes / device", "errors"],
        [[r["mode"], _fmt(r["idle_bytes_h"]), _fmt(r.get("idle_channel_bytes_h")),
          f"{polling['idle_bytes_h'] / r['idle_bytes_h']:.1f}x less" if polling and r["idle_bytes_h"] and r is not polling
          else "-", _fmt(r["idle_requests_h"], ".1f"), _fmt(r["idle_connections_h"], ".1f"), _fmt(r.get("connect_bytes")),
          "-" if r.get("connected_at_rollout") is None else f"{r['connected_at_rollout']} of {n}",
          f"{r['installed']} of {n}", _fmt(r["rollout_s"], ".1f"),
          _fmt(r["start_p50_s"], ".2f"), _fmt(r["update_bytes"]), r["idle_errors"] + r["push_errors"]]
         for r in rows])
    delta = md_table(["change", "full bundle (B)", "on the wire: full", "on the wire: delta", "delta / full",
                      "server diff (s)", "device patch (s)"],
                     [[d["case"], _fmt(d["full_bytes"]), _fmt(d["full_wire"]), _fmt(d.get("delta_wire")),
                       f"{d['ratio']:.3f}x" + ("" if "delta_wire" in d else " (no delta made: full bundle)"),
                       _fmt(d.get("diff_s"), ".2f"), _fmt(d.get("patch_s"), ".2f")] for d in raw["delta"]])
    if polling is not None:
        idle += (f"\n\nPolling with the connection kept open between polls (a server keep-alive longer than the "
                 f"poll interval): {polling['idle_bytes_h_kept']:,.0f} bytes and "
                 f"{polling['idle_requests_h_kept']:.1f} requests per device per hour.")
    for r in rows:
        down = r.get("down_at_rollout") or {}
        if down.get("errors"):
            idle += (f"\n\n{r['mode']}: {n - r['connected_at_rollout']} channel(s) down when the rollout started "
                     f"(last errors: {'; '.join(f'{k} x{v}' for k, v in down['errors'].items())}); those agents "
                     f"installed through their fallback polls ({r.get('fallback_cycles', 0)} cycles).")
    missing = "" if broker else " MQTT rows are missing: mosquitto was not found on this machine."
    return (f"{n} simulated agents in one process (asyncio httpx for the HTTP requests a real agent makes, the real "
            "`fleet/push.py` channel classes for MQTT and WebSocket) against `edgekiln`'s server under uvicorn in "
            "a subprocess over TLS, and Mosquitto 2 over mqtts; every agent runs v1 first. Bytes are TCP payload "
            "counted by a relay in front of the server and one in front of the broker: TLS records included, "
            "TCP/IP headers excluded. uvicorn closes an idle keep-alive connection after 5 s, so each real poll "
            "(60 s) and each safety poll (900 s) opens a new TLS connection; the scaled simulation does the same. "
            "**Idle:** all timers are divided by "
            f"{SCALE:g} (poll {POLL_S:g} s, MQTT keepalive and the device's WebSocket ping {KEEPALIVE_S:g} s (the server "
            "sends none, `serve --ws-ping 0`, the default), the push safety "
            f"poll {SAFETY_POLL_S:g} s), and the {window:g} s window is {window * SCALE / 3600:g} simulated hour(s); "
            "figures are per device per simulated hour; 'one connect' is the push channel's TLS handshake plus "
            "CONNECT/SUBSCRIBE (or the WebSocket upgrade) plus the retained notice. **Rollout:** real timers (poll "
            f"{60 if not quick else 10} s, 0-{PUSH_JITTER_S:g} s push jitter), one wave at 100%, from the "
            "rollout-start response to the last `installed` report; the update is a delta of a 30 KB bundle; push "
            "channels are opened again with the real keepalive/ping before it, and an agent whose channel is down "
            "polls every interval as the daemon does (the scaled idle phase's 2 s MQTT keepalive dropped "
            + ", ".join(f"{r['idle_dropped']} {r['mode']}" for r in rows if "idle_dropped" in r)
            + " of the channels in this one loaded process: time scaling, counted, not carried into the rollout). "
            f"**Delta vs full:** MLP bundles of {DELTA_PARAMS // 8 if quick else DELTA_PARAMS:,} float32 "
            "parameters; the server makes the delta at publish (bsdiff4, skipped when over half of the bytes "
            "changed); 'device patch' is bsdiff4 on this machine."
            f"{' Quick run.' if quick else ''}{missing}\n\n" + idle + "\n\n" + delta)
