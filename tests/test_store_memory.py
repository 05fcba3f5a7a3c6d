import pytest

from elastic.store import MemoryStore, StoreCompactedError, create_store
from elastic.store.testing import StoreContract, prefix  # noqa: F401


class TestMemoryStore(StoreContract):
    @pytest.fixture
    def store(self):
        return create_store("memory")


def test_wait_on_compacted_history_raises():
    store = MemoryStore(history=4)
    for i in range(10):
        store.put(f"/k{i}", b"x")
    with pytest.raises(StoreCompactedError):
        store.wait("/", 1, timeout_s=0)
    assert [e.key for e in store.wait("/", 7, timeout_s=0)] == ["/k7", "/k8", "/k9"]
