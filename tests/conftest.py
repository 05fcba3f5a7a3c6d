"""Shared fixtures: a real etcd server, a real S3 endpoint, the multi-process harness."""
from __future__ import annotations

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import Procs  # noqa: E402
from needs import check
from services import EtcdServer, S3Server  # noqa: E402

from paths import REPO  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "needs(*modules, tools=(), why=''): modules/tools the test needs; skipped when "
        "missing, failed under CI=true (see tests/needs.py)")


def pytest_runtest_setup(item):
    """``@needs(...)`` / ``pytestmark = needs(...)``: skip locally, fail under CI (tests/needs.py)."""
    for mark in item.iter_markers("needs"):
        check(mark.kwargs.get("modules", ()), mark.kwargs.get("tools", ()), mark.kwargs.get("why", ""))


@pytest.fixture(scope="session")
def etcd_server():
    """One etcd per xdist worker; tests keep to their own key prefix (see ``etcd_prefix``)."""
    check(tools=["etcd"], why="etcd-server, installed by make setup")
    with EtcdServer() as server:
        yield server


@pytest.fixture
def etcd_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def etcd_server_fn():
    """An etcd server of this test's own, for tests that stop or kill it."""
    check(tools=["etcd"], why="etcd-server, installed by make setup")
    with EtcdServer() as server:
        yield server


RDZV_BACKENDS = ("memory", "embedded", "etcd")
EMBEDDED_TOKEN = "conftest-token"


@pytest.fixture(scope="module")
def embedded_server():
    """One embedded rendezvous server per test module; tests keep to their own keys."""
    from elastic.store.embedded import EmbeddedServer

    with EmbeddedServer("127.0.0.1", 0, token=EMBEDDED_TOKEN) as server:
        yield server


@pytest.fixture(params=RDZV_BACKENDS)
def any_store(request):
    """A fresh client of each store backend in turn (memory, embedded, etcd). The servers are
    shared, so a test keeps to its own keys (a ``run_id`` of its own). etcd is skipped
    locally and fails under CI when it is not installed (tests/needs.py)."""
    from elastic.store import MemoryStore, create_store

    if request.param == "memory":
        store = MemoryStore()
    elif request.param == "embedded":
        store = create_store("embedded", request.getfixturevalue("embedded_server").endpoint,
                             token=EMBEDDED_TOKEN)
    else:
        check(["pyetcd"], why="the etcd extra")
        store = create_store("etcd", request.getfixturevalue("etcd_server").endpoint)
    yield store
    store.close()


@pytest.fixture
def run_id() -> str:
    """A job id of this test's own, so tests can share one store server."""
    return f"job-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def s3_server():
    check(["boto3"], tools=["moto_server"], why="moto[server], the test extra")
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the S3 endpoint; yields ``(bucket_name, storage_options)``."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.new_bucket(name)
    return name, s3_server.storage_options


@pytest.fixture
def procs(tmp_path):
    """The multi-process harness; every process it started is killed when the test ends."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    with Procs(env=env, cwd=str(tmp_path)) as p:
        yield p


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The parameters a fault-free run of tests/workers/inproc_train.py ends with."""
    from inproc_checks import fault_free_params

    return fault_free_params(tmp_path_factory.mktemp("ref") / "params.json")
