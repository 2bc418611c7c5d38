"""The agent's daemon loop with push (fleet/agent_loop.py), its channel helpers (fleet/push.py) and
telemetry (fleet/device_telemetry.py, runtime/status_file.py): fake clock, no network."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace
from typing import Any

import pytest

from edgekiln.errors import EdgekilnError, ServerUnreachable
from edgekiln.fleet import agent_loop
from edgekiln.fleet.device_telemetry import MAX_ITEMS, Telemetry, collect
from edgekiln.fleet.push import Wakeup, check_mqtt_url, parse_notice, reconnect_delay
from edgekiln.runtime.status_file import read_status, write_status


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FakeWake(Wakeup):
    """``wait`` advances the fake clock; ``script`` says what happens during each wait:
    ("notice", after_s, rev), ("drop", after_s) (the channel goes down and pokes), or nothing."""

    def __init__(self, clock: Clock, channel: Any = None, script: list[tuple[Any, ...]] | None = None) -> None:
        super().__init__()
        self.clock, self.channel, self.script = clock, channel, list(script or [])
        self.timeouts: list[float] = []

    def wait(self, timeout: float) -> bool:
        self.timeouts.append(timeout)
        if self.script:
            step = self.script.pop(0)
            self.clock.t += step[1]
            if step[0] == "notice":
                self.notice(step[2])
            elif step[0] == "drop":
                self.channel.connected = False
                self.poke()
            return super().wait(0)
        self.clock.t += timeout
        return False


class FakeAgent:
    def __init__(self, clock: Clock, outcomes: list[Any] | None = None) -> None:
        self.clock, self.outcomes = clock, list(outcomes or [])
        self.runs: list[float] = []
        self.lines: list[str] = []
        self.log = self.lines.append
        self.api = SimpleNamespace(telemetry=lambda batch: None)

    def run_once(self) -> dict[str, Any]:
        self.runs.append(self.clock.t)
        outcome = self.outcomes.pop(0) if self.outcomes else "up-to-date"
        if isinstance(outcome, Exception):
            raise outcome
        return {"outcome": outcome, "model": "m", "version": 1}


def channel(connected: bool = True) -> Any:
    return SimpleNamespace(connected=connected, attempted=True, kind="mqtt", error="refused", sent=[],
                           send_telemetry=lambda batch: True)


def test_a_new_notice_runs_a_cycle_at_once_and_an_old_rev_does_not():
    clock = Clock()
    ch = channel()
    wake = FakeWake(clock, ch, [("notice", 3.0, "aa11")])
    agent = FakeAgent(clock)
    pauses: list[float] = []
    agent_loop.run_daemon(agent, interval_s=60, push_poll_s=900, channel=ch, wake=wake, cycles=2,
                          push_jitter_s=0.5, rng=random.Random(1), clock=clock, pause=pauses.append)
    assert agent.runs == [0.0, 3.0], agent.runs   # woken 3 s in, not after the 900 s safety wait
    assert len(pauses) == 1 and 0.0 <= pauses[0] <= 0.5, pauses
    # the same rev again (a retained notice on reconnect) is not a reason for a cycle
    wake2 = FakeWake(clock, ch, [("notice", 1.0, "aa11")])
    wake2.notice("aa11")
    wake2.take()
    agent2 = FakeAgent(clock)
    start = clock.t
    agent_loop.run_daemon(agent2, interval_s=60, push_poll_s=900, channel=ch, wake=wake2, cycles=2,
                          push_jitter_s=0, rng=random.Random(2), clock=clock)
    waited = agent2.runs[1] - start
    assert 900 * 0.9 <= waited <= 900 * 1.1, f"waited {waited} s, expected the push_poll_s safety wait"


def test_the_wait_is_push_poll_s_when_connected_and_interval_s_when_not():
    clock = Clock()
    for connected, low, high in ((True, 810, 990), (False, 54, 66)):
        wake = FakeWake(clock)
        agent = FakeAgent(clock)
        agent_loop.run_daemon(agent, interval_s=60, push_poll_s=900, channel=channel(connected), wake=wake,
                              cycles=4, rng=random.Random(3), clock=clock)
        gaps = [b - a for a, b in zip(agent.runs, agent.runs[1:], strict=False)]
        assert all(low <= g <= high for g in gaps), (connected, gaps, low, high)
    assert any("push unavailable (refused); polling every 60 s" in line for line in agent.lines), agent.lines
    # a channel that drops during a 900 s wait: the loop polls after interval_s, not 900 s
    ch = channel(True)
    wake = FakeWake(clock, ch, [("drop", 10.0)])
    agent = FakeAgent(clock)
    agent_loop.run_daemon(agent, interval_s=60, push_poll_s=900, channel=ch, wake=wake, cycles=2,
                          rng=random.Random(4), clock=clock)
    gap = agent.runs[1] - agent.runs[0]
    assert 54 <= gap <= 66, f"after the drop the next check came {gap} s later, expected about 60"


def test_backoff_and_jitter_stay_within_bounds():
    rng = random.Random(5)
    for attempt in range(12):
        cap = min(300.0, 2.0 ** attempt)
        delay = reconnect_delay(attempt, rng=rng)
        assert 0.5 * cap <= delay <= 1.5 * cap, (attempt, delay, cap)
    clock = Clock()
    down = ServerUnreachable("update server unreachable")
    agent = FakeAgent(clock, [down] * 5)
    # push connected does not stretch the backoff: an unreachable server is retried at 2, 4, 8, 10, 10 s
    agent_loop.run_daemon(agent, interval_s=2.0, push_poll_s=900, max_backoff_s=10.0, channel=channel(True),
                          wake=FakeWake(clock), cycles=6, rng=random.Random(6), clock=clock)
    gaps = [b - a for a, b in zip(agent.runs, agent.runs[1:], strict=False)]
    assert all(abs(g - e) <= 0.1 * e + 1e-9 for g, e in zip(gaps, [2, 4, 8, 10, 10], strict=True)), gaps
    assert sum("keeping the active model" in line for line in agent.lines) == 5, agent.lines


def test_notice_parsing_and_mqtt_url_rules():
    assert parse_notice(b'{"v":1,"rev":"0123456789abcdef","seq":7}') == "0123456789abcdef"
    assert parse_notice(b'{"v":1,"rev":"-","seq":1}') == "-"
    for junk in (b"", b"not json", b'{"v":2,"rev":"ab"}', b'{"v":1,"rev":"../x"}', b"[1]", b"x" * 600):
        assert parse_notice(junk) is None, junk
    assert check_mqtt_url("mqtt://127.0.0.1:1884", insecure_http=False) == ("127.0.0.1", 1884, False)
    with pytest.raises(EdgekilnError, match="refusing plain mqtt:// to fleet"):
        check_mqtt_url("mqtt://fleet:1883", insecure_http=False)
    with pytest.raises(EdgekilnError, match="is not mqtt"):
        check_mqtt_url("http://fleet", insecure_http=False)


def test_an_advertised_broker_on_another_host_is_ignored():
    lines: list[str] = []
    agent = SimpleNamespace(config=SimpleNamespace(server="https://fleet.example:8443", token="t", ca=None,
                                                   insecure_http=False), log=lines.append)
    with pytest.raises(EdgekilnError, match="advertises no MQTT broker"):
        agent_loop.open_channel(agent, mode="mqtt", wake=Wakeup(), settings={"mqtt": "mqtts://evil.example:8883"})
    assert any("ignoring the advertised MQTT broker mqtts://evil.example:8883" in line for line in lines), lines
    with pytest.raises(EdgekilnError, match="advertises no MQTT broker"):
        agent_loop.open_channel(agent, mode="mqtt", wake=Wakeup(), settings={"mqtt": "mqtt://fleet.example:1883"})
    assert "ignoring the advertised MQTT broker: refusing plain mqtt:// to fleet.example" in lines[-1], lines
    assert agent_loop.open_channel(agent, mode="off", wake=Wakeup()) is None
    with pytest.raises(EdgekilnError, match="--push must be one of"):
        agent_loop.open_channel(agent, mode="carrier-pigeon", wake=Wakeup())


class FakeRuntime:
    def stats(self) -> dict[str, Any]:
        return {"bundle": "digits", "version": 3, "current": "int8", "requests": 10, "order": ["fp32", "int8"],
                "variants": {"int8": {"count": 10, "errors": 1, "p50_ms": 1.5, "p95_ms": 4.25}}}


def fake_telemetry_agent(tmp_path: Any, state: dict[str, Any]) -> Any:
    store = SimpleNamespace(root=tmp_path, active=lambda: SimpleNamespace(model="digits", version=3),
                            read_state=lambda: state)
    return SimpleNamespace(store=store)


def test_telemetry_from_the_runtime_status_file_or_the_last_health_check(tmp_path):
    state = {"history": [{"model": "digits", "version": 3, "status": "installed",
                          "latency_ms": {"p50": 2.0, "p95": 3.0}}], "pending": {"version": 4}}
    agent = fake_telemetry_agent(tmp_path, state)
    item = collect(agent, now=1000.0)
    assert item is not None and (item["variant"], item["p50"], item["p95"], item["health"], item["pending"]) == \
        (None, 2.0, 3.0, "ok", 4), item
    assert write_status(tmp_path / "runtime-status.json", FakeRuntime(), now=1000.0)
    assert not write_status(tmp_path / "runtime-status.json", FakeRuntime(), now=1005.0)   # every 10 s at most
    item = collect(agent, now=1010.0)
    assert item is not None and (item["variant"], item["p50"], item["p95"], item["health"]) == \
        ("int8", 1.5, 4.25, "degraded"), item
    assert set(item) == {"t", "model", "ver", "variant", "p50", "p95", "health", "disk_free", "pending", "adapt"}
    assert len(json.dumps({"batch": [item] * MAX_ITEMS})) <= 4096
    assert read_status(tmp_path / "runtime-status.json", now=1000.0 + 601) is None   # stale: history again
    assert collect(agent, now=1000.0 + 601)["variant"] is None


def test_telemetry_samples_on_change_or_when_due_and_keeps_at_most_16():
    clock = Clock()
    items = iter([{"model": "m", "ver": v, "variant": None, "health": "ok"} for v in (1, 1, 2)] +
                 [{"model": "m", "ver": 2, "variant": None, "health": "ok"}] * 40)
    meter = Telemetry(None, every_s=300, clock=clock, collect_fn=lambda agent: next(items))
    assert meter.sample() and not meter.sample() and meter.sample()   # first, unchanged, version changed
    clock.t += 300
    assert meter.sample(), "a periodic sample is due after every_s"
    for _ in range(30):
        meter.sample(force=True)
    assert len(meter.queue) == MAX_ITEMS
    posted: list[Any] = []
    down = SimpleNamespace(connected=False, send_telemetry=lambda b: pytest.fail("sent on a dead channel"))
    assert meter.flush(down, SimpleNamespace(telemetry=posted.append)) and len(posted[0]) == MAX_ITEMS
    assert not meter.queue and meter.sent == MAX_ITEMS


def test_a_changed_variant_is_sent_through_the_channel_while_push_keeps_the_loop_asleep():
    clock = Clock()
    variants = {"now": "fp32"}
    sent: list[list[dict[str, Any]]] = []
    ch = SimpleNamespace(connected=True, attempted=True, kind="websocket", error=None,
                         send_telemetry=lambda batch: sent.append(batch) or True)

    def collect_fn(agent):
        if clock.t >= 25:
            variants["now"] = "int8"   # the application's runtime switched variant 25 s in
        return {"t": clock.t, "model": "m", "ver": 1, "variant": variants["now"], "health": "ok"}

    meter = Telemetry(None, every_s=300, check_every_s=10, clock=clock, collect_fn=collect_fn)
    wake = FakeWake(clock)
    agent = FakeAgent(clock)
    agent.api = SimpleNamespace(telemetry=lambda batch: pytest.fail("HTTP used while the channel is up"))
    agent_loop.run_daemon(agent, interval_s=60, push_poll_s=900, channel=ch, wake=wake, cycles=2,
                          telemetry=meter, rng=random.Random(7), clock=clock)
    variants_sent = [(round(item["t"]), item["variant"]) for batch in sent for item in batch]
    assert variants_sent[:2] == [(0, "fp32"), (30, "int8")], variants_sent   # seen at the next 10 s look
    times = [t for t, _ in variants_sent[1:]]
    assert {b - a for a, b in zip(times, times[1:], strict=False)} == {300}, variants_sent   # then every every_s
    assert max(wake.timeouts) <= 10, wake.timeouts
