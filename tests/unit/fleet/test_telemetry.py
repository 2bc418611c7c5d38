"""Telemetry batches: each refusal reason, the per-device token bucket, the capped history."""

from __future__ import annotations

import json

import pytest

from edgekiln.fleet.db import open_database
from edgekiln.fleet.telemetry import MAX_BATCH_BYTES, TelemetryRefused, TelemetryStore, check_batch

GOOD = {"t": 1_800_000_000, "model": "digits", "ver": 2, "variant": "int8", "p50": 1.5, "p95": 4.0,
        "health": "ok", "disk_free": 10**9, "pending": None}


def _raw(*items, **extra) -> bytes:
    return json.dumps({"batch": list(items), **extra}).encode()


@pytest.mark.parametrize(("raw", "reason"), [
    (b"x" * (MAX_BATCH_BYTES + 1), "too_large"),
    (b"{not json", "not_json"),
    (b"\xff\xfe", "not_json"),
    (b'{"batch": [{"t": 1, "p50": [[[[1]]]]}]}', "depth"),
    (_raw({**GOOD, "cpu": 3}), "unknown_key"),
    (_raw(GOOD, extra=1), "unknown_key"),
    (_raw({**GOOD, "health": "great"}), "bad_type"),
    (_raw({**GOOD, "ver": True}), "bad_type"),
    (_raw({**GOOD, "p95": -1}), "bad_type"),
    (_raw({"health": "ok"}), "bad_type"),          # no "t"
    (b'{"batch": {"t": 1}}', "bad_type"),
    (b'{"batch": [{"t": 1, "p50": NaN}]}', "non_finite"),
    (b'{"batch": [{"t": 1, "p50": 1e999}]}', "non_finite"),
    (_raw(*[{"t": i} for i in range(17)]), "too_many"),
])
def test_each_refusal_has_its_reason(raw, reason) -> None:
    with pytest.raises(TelemetryRefused) as refused:
        check_batch(raw)
    assert refused.value.reason == reason, (refused.value, reason)


def test_good_batches_pass_unchanged() -> None:
    assert check_batch(_raw(GOOD, {"t": 1.5})) == [GOOD, {"t": 1.5}]
    assert check_batch(json.dumps({"type": "telemetry", "batch": [GOOD]})) == [GOOD]
    assert check_batch(b"[]") == []
    assert len(_raw(*[GOOD] * 16)) <= MAX_BATCH_BYTES, "16 full items must fit the size limit"
    assert len(check_batch(_raw(*[GOOD] * 16))) == 16


class _Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _store(**kw):
    db, clock = open_database("sqlite:///:memory:"), _Clock()
    for name in ("cam-1", "cam-2"):
        db.execute("INSERT INTO devices (name, group_name, token_hash, created) VALUES (?, 'lab', ?, 0)",
                   (name, name * 8))
    return TelemetryStore(db, clock, **kw), clock


def test_token_bucket_drops_floods_per_device_and_refills() -> None:
    store, clock = _store(min_interval_s=5, burst=3)
    assert [store.add("cam-1", [{"t": i}]) for i in range(5)] == [1, 1, 1, 0, 0]
    assert store.add("cam-2", [{"t": 0}]) == 1, "one device's flood must not stop another"
    clock.now += 4.9
    assert store.add("cam-1", [{"t": 9}]) == 0
    clock.now += 0.2
    assert store.add("cam-1", [{"t": 10}]) == 1
    assert store.receive("cam-1", b"{oops") == 0
    c = store.counters()
    assert c["received"] == 5 and c["dropped"]["rate_limited"] == 3 and c["dropped"]["not_json"] == 1, c


def test_history_is_capped_and_latest_is_the_newest() -> None:
    store, clock = _store(history=100, min_interval_s=0.001, burst=1000)
    for i in range(0, 130, 10):
        clock.now += 1
        assert store.add("cam-1", [{"t": i + k, "health": "ok"} for k in range(10)]) == 10
    rows = store.db.query("SELECT COUNT(*) AS n FROM telemetry_history WHERE device = 'cam-1'")
    assert rows[0]["n"] == 100, rows
    history = store.history("cam-1", limit=100)
    assert [h["t"] for h in history] == list(range(129, 29, -1))
    assert store.latest()["cam-1"]["t"] == 129
    assert store.add("gone", [{"t": 1}]) == 0   # a device removed meanwhile stores nothing
    store.forget("cam-1")
    assert store.history("cam-1") == [] and "cam-1" not in store.latest()
