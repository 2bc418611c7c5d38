"""Running the suite in parallel (``make test`` runs ``pytest -n 2 --dist loadfile``, pytest-xdist).

A test file is one unit of work for one worker, so its module fixtures are built once, not by both
workers; the run-folder matrix, the longest file, is cut into one unit per producer (``work_unit``).

Tests that compare measured times (int8 faster than FP32, ...) are marked ``timed``: under xdist such a
test runs while no test runs on another worker. Every test holds a shared ``flock`` on one lock file of
this run for its setup, call and teardown (so a module fixture built by the first test of a module counts
too); a ``timed`` test holds it exclusively. A turnstile lock taken before either keeps a waiting ``timed``
test from being overtaken by the next shared holder. Without xdist this does nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

LOCKS = "EDGEKILN_TEST_LOCKS"   # the folder of this run's lock files, made by the controller for its workers


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "timed: compares measured times; under xdist it runs while no other test runs")
    if config.getoption("numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        # NOTE: set before the workers start, so they inherit it.
        os.environ[LOCKS] = tempfile.mkdtemp(prefix="edgekiln-pytest-")


def pytest_unconfigure(config: pytest.Config) -> None:
    if os.environ.get(LOCKS) and not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(os.environ.pop(LOCKS), ignore_errors=True)


# Files whose tests are spread over the workers by their first parameter (run-folder matrix: the producer);
# each of those groups builds only the module fixtures it uses.
SPLIT_BY_FIRST_PARAM = ("tests/integration/test_run_folder_matrix.py",)


def work_unit(nodeid: str) -> str:
    """The unit of work one xdist worker runs, with its module fixtures built once: the test file, or
    for a file of SPLIT_BY_FIRST_PARAM the file and the test's first parameter id.

    >>> work_unit("tests/integration/test_run_folder_matrix.py::test_command_on_run_folder[export-fits]")
    'tests/integration/test_run_folder_matrix.py[export]'
    >>> work_unit("tests/unit/test_api.py::test_quantize[int8]")
    'tests/unit/test_api.py'
    """
    path, _, rest = nodeid.partition("::")
    if path in SPLIT_BY_FIRST_PARAM and rest.endswith("]") and "[" in rest:
        return f"{path}[{rest[rest.index('[') + 1:-1].split('-')[0]}]"
    return path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):  # noqa: ANN001, ANN201 - xdist's types
    """``--dist loadfile``, with the files of SPLIT_BY_FIRST_PARAM cut into smaller units.

    NOTE: not ``--dist loadgroup``: with pytest 9.2, pytest-xdist 3.8 sets the ``@group`` suffix on an
    attribute pytest no longer reads (``Item._nodeid``), so ``xdist_group`` marks are silently ignored.
    """
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FileScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return FileScheduling(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    folder = os.environ.get(LOCKS)
    if not (folder and os.environ.get("PYTEST_XDIST_WORKER")):
        return (yield)
    exclusive = item.get_closest_marker("timed") is not None
    with open(Path(folder) / "turnstile", "a") as turnstile, open(Path(folder) / "tests", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
