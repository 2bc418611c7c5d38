"""TEST-ONLY crash hook of the device agent: ``kill -9`` itself at the N-th checkpoint.

The agent calls ``checkpoint(name)`` between its durable steps (after every downloaded chunk,
after each file is written and fsynced, around the symlink switch, after the health check,
after state.json and after the report). The fault tests run the agent as a subprocess with

- ``EDGEKILN_TEST_CRASH_AT=N``: SIGKILL this process when it reaches its N-th checkpoint
  (1-based), which is what a power cut or ``kill -9`` does at that instant;
- ``EDGEKILN_TEST_CHECKPOINT_LOG=FILE``: append every checkpoint name reached to FILE (one a
  line, fsynced), so a test can list the points a full update passes through.

Neither variable is set in normal operation, and then ``checkpoint`` does nothing. This is a
test hook, not a feature: never set these on a device.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

CRASH_AT_ENV = "EDGEKILN_TEST_CRASH_AT"
LOG_ENV = "EDGEKILN_TEST_CHECKPOINT_LOG"


def checkpoint_from_env() -> Callable[[str], None] | None:
    """The hook the environment asks for, or None when neither variable is set."""
    crash_at = os.environ.get(CRASH_AT_ENV)
    log = os.environ.get(LOG_ENV)
    if not crash_at and not log:
        return None
    target = int(crash_at) if crash_at else None
    count = 0

    def checkpoint(name: str) -> None:
        nonlocal count
        count += 1
        if log:
            with open(log, "a") as fh:
                fh.write(f"{count}\t{name}\n")
                fh.flush()
                os.fsync(fh.fileno())
        if target is not None and count == target:
            os.kill(os.getpid(), signal.SIGKILL)

    return checkpoint
