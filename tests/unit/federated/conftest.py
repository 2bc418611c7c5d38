"""Fixtures shared by the federated tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def _task_identity():
    """Flower's runtimes set the identity of the running task before messages are built."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
