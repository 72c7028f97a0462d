"""Shared fixtures: repo paths, the real MNIST files beside the repo, temp copies of the repo,
a temp MLflow store per module, and a local HTTP server of mirrors.

The helpers behind them, and those that several test modules share, live in ``tests/helpers``
(imported as ``helpers.*``: tests never import from each other's test files).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The helpers' asserts report as a test's own do (registered before they are imported).
pytest.register_assert_rewrite("helpers")

from helpers.http import Mirrors  # noqa: E402
from helpers.repo import ROOT, SHARED, make_repo, write_committed_params  # noqa: E402
from helpers.schedule import slow_first  # noqa: E402

from mnistlab.stageserver import ENV as STAGE_SERVER  # noqa: E402
from mnistlab.stageserver import Server  # noqa: E402

# Tests are CPU-only and small; two threads match the CI machine, shared among pytest-xdist's
# workers (`pytest -n 2`: one each; most of a test's time is single-threaded Python, so two
# workers finish the suite sooner than one worker with two threads). MNISTLAB_TEST_THREADS
# sets the count outright (.ci/run: 1, while the CI gate runs on the other core). In the
# environment too (overwritten: an xdist worker inherits its controller's), so that
# train.threads: auto (mnistlab.threads, where OMP_NUM_THREADS wins) keeps that count when a
# test runs the train stage, in this process or in one it starts.
_explicit = os.environ.get("MNISTLAB_TEST_THREADS", "")
THREADS = int(_explicit) if _explicit.isdigit() and int(_explicit) > 0 else max(
    1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(THREADS)
os.environ["OMP_NUM_THREADS"] = str(THREADS)
# Without OMP_NUM_THREADS, auto counts every training run of this user on the machine; tests
# must not depend on what else runs there: this session's runs count only each other.
os.environ.setdefault("MNISTLAB_THREAD_SLOTS", tempfile.mkdtemp(prefix="mnistlab-test-threads-"))
atexit.register(shutil.rmtree, os.environ["MNISTLAB_THREAD_SLOTS"], ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def stage_server() -> Iterator[str | None]:
    """One stage server per test process, for the stages its tests run through stages/run.sh (DVC,
    mnistlab.repro, the CI copies start their own): they fork from it, with torch and MLflow
    imported once (src/mnistlab/stageserver.py). Started after the variables above are set, so
    that its environment is the stages'; a test that changes another variable (HOME, say) gets
    fresh interpreters, and tests/test_stageserver.py checks both ways."""
    server, before = Server(), os.environ.get(STAGE_SERVER)
    socket = server.start().get(STAGE_SERVER)  # unchanged if serving is off ("off" set)
    if socket is not None:
        os.environ[STAGE_SERVER] = socket
    try:
        yield socket
    finally:
        server.stop()
        if before is None:
            os.environ.pop(STAGE_SERVER, None)
        else:
            os.environ[STAGE_SERVER] = before


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def params_file(tmp_path_factory) -> Path:
    """The committed params.yaml, as a file outside the repo (never the working tree's, which
    ``dvc exp run -S`` rewrites): for tests that pass ``--params`` or a params path."""
    return write_committed_params(tmp_path_factory.mktemp("committed") / "params.yaml")


@pytest.fixture(scope="session")
def mnist_t10k() -> Path:
    path = SHARED / "mnist-t10k"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="session")
def mnist_mini() -> Path:
    path = SHARED / "mnist-mini"
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture
def tmp_repo(tmp_path: Path) -> Path:
    """A git+DVC copy of the project (code and the committed params.yaml) in a temp dir.

    ``../shared`` is linked beside it so the ``mnist_mini`` source resolves.
    """
    return make_repo(tmp_path / "repo")


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Iterator[str]:
    """One sqlite MLflow store per test module (creating one costs a few seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture
def mirrors() -> Iterator[Mirrors]:
    m = Mirrors()
    assert m.server.server_address[0] == "127.0.0.1"
    m.thread.start()
    try:
        yield m
    finally:
        m.server.shutdown()
        m.server.server_close()
        m.thread.join(timeout=10)


# pytest's own fixture-scope grouping runs first (trylast), so the order given here is final.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Each pytest-xdist worker starts on its share of the slow tests (helpers/schedule.py).

    Every worker collects and must reach the same order, which depends only on the
    collection and the worker count. A slow test moves only if none of its fixtures is
    module- or class-scoped (``_fixtureinfo``: the fixtures pytest resolved for the item).
    """
    def movable(item) -> bool:
        if item.get_closest_marker("slow") is None:
            return False
        defs = getattr(item, "_fixtureinfo", None)
        return defs is not None and all(
            fds[-1].scope not in ("module", "class", "package")
            for fds in defs.name2fixturedefs.values() if fds)

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    items[:] = slow_first(items, movable, workers)
