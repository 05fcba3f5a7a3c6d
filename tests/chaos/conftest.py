"""Fixtures for the chaos harness tests: a small namespace cluster, skipped (with the reason)
where this machine cannot make one (not root, no ip/nft, no cgroup v1 freezer/cpu)."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from benchmarks.chaos import netns  # noqa: E402


_SWEPT = []


def need_namespaces() -> None:
    """Skip the calling test, saying why, unless network-namespace hosts can be built here.
    The first call also removes what runs that died here left (never a live run's)."""
    try:
        netns.require_namespaces()
    except netns.NamespacesUnavailable as exc:
        pytest.skip(f"network-namespace hosts unavailable: {exc}")
    if not _SWEPT:
        _SWEPT.append(netns.cleanup_stale())


@pytest.fixture(scope="module")
def cluster3():
    """Hosts h1, h2, h3 for one test module; tests undo the faults they inject."""
    need_namespaces()
    with netns.Cluster(("h1", "h2", "h3")) as c:
        yield c
        # every packet of the module went between the hosts: the root namespace sent none there
        assert c.root_guard_packets() == 0


@pytest.fixture
def fresh_cluster():
    """A cluster of this test's own (h1, h2): for tests that power hosts off or close it."""
    need_namespaces()
    c = netns.Cluster(("h1", "h2"))
    try:
        yield c
    finally:
        c.close()
