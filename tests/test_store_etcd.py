"""The etcd v3 backend against a real etcd: the contract suite, failover, errors, auth, TLS."""
import time

import pytest

from needs import needs, require

pytestmark = needs("pyetcd", tools=["etcd"], why="the etcd extra; etcd-server from make setup")

from elastic.errors import ConfigError, UserError  # noqa: E402
from elastic.store import (StoreAuthError, StoreCompactedError, StoreUnavailableError,  # noqa: E402
                           create_store)
from elastic.store.etcd import parse_endpoints  # noqa: E402
from services import EtcdServer, free_port  # noqa: E402
from elastic.store.testing import StoreContract, prefix  # noqa: E402,F401


class TestEtcdStore(StoreContract):
    @pytest.fixture
    def store(self, etcd_server):
        store = create_store("etcd", etcd_server.endpoint)
        yield store
        store.close()


def _refused_endpoint() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


def test_several_endpoints_fail_over_to_a_live_one(etcd_server, prefix):
    endpoint = f"{_refused_endpoint()},{etcd_server.endpoint}"
    with create_store("etcd", endpoint, timeout_s=5) as store:
        assert store.put(prefix + "k", b"v") > 0
        assert store.get(prefix + "k").value == b"v"


def test_unreachable_etcd_is_one_clear_line():
    endpoint = f"{_refused_endpoint()},{_refused_endpoint()}"
    with pytest.raises(StoreUnavailableError) as info:
        create_store("etcd", endpoint, timeout_s=3)
    message = str(info.value)
    assert endpoint in message and "unavailable" in message and "\n" not in message
    assert isinstance(info.value, UserError)


def test_etcd_going_down_is_a_clear_error(etcd_server_fn, prefix):
    store = create_store("etcd", etcd_server_fn.endpoint, timeout_s=3)
    try:
        store.put(prefix + "k", b"v")
        lease = store.grant_lease(5)
        etcd_server_fn.stop()  # SIGKILL
        for call in (lambda: store.get(prefix + "k"), lambda: store.put(prefix + "k", b"w"),
                     lambda: store.keep_alive(lease),
                     lambda: store.wait(prefix, 0, timeout_s=1)):
            with pytest.raises(StoreUnavailableError) as info:
                call()
            assert "\n" not in str(info.value)
    finally:
        store.close()


def test_wait_on_compacted_history_raises(etcd_server, prefix):
    with create_store("etcd", etcd_server.endpoint) as store:
        first = store.put(prefix + "k", b"0")
        for i in range(5):
            last = store.put(prefix + "k", str(i).encode())
        raw = etcd_server.client()
        try:
            raw.compact(last)
        finally:
            raw.close()
        with pytest.raises(StoreCompactedError):
            store.wait(prefix, first, timeout_s=10)
        # Waiting from the current revision works again.
        assert store.wait(prefix, last, timeout_s=0.2) == []


def test_lease_ttl_is_rounded_up_to_whole_seconds(etcd_server, prefix):
    with create_store("etcd", etcd_server.endpoint) as store:
        lease = store.grant_lease(0.2)  # etcd needs an int >= 1
        store.put(prefix + "k", b"v", lease=lease)
        assert store.get(prefix + "k").lease == lease
        store.revoke_lease(lease)
        assert store.get(prefix + "k") is None


def test_parse_endpoints():
    assert parse_endpoints("") == [("127.0.0.1", 2379)]
    assert parse_endpoints("a:1, http://b:2,https://c") == [("a", 1), ("b", 2), ("c", 2379)]
    assert parse_endpoints("[::1]:5") == [("::1", 5)]
    for bad in ["a:x", "a:0", ":5"]:
        with pytest.raises(ConfigError):
            parse_endpoints(bad)
    with pytest.raises(ConfigError, match="user and password"):
        create_store("etcd", "127.0.0.1:1", user="root")


# -- user/password ---------------------------------------------------------------------------
def _enable_auth(server: EtcdServer, password: str) -> None:
    from pyetcd import etcdrpc

    raw = server.client()
    try:
        auth = raw.authstub
        auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name="root"), 10)
        auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password=password), 10)
        auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"), 10)
        auth.AuthEnable(etcdrpc.AuthEnableRequest(), 10)
    finally:
        raw.close()


def test_user_and_password(etcd_server_fn, prefix):
    _enable_auth(etcd_server_fn, "pa55word")
    with create_store("etcd", etcd_server_fn.endpoint, user="root", password="pa55word") as store:
        store.put(prefix + "k", b"v")
        assert store.get(prefix + "k").value == b"v"
        _, rev = store.get_prefix(prefix)
        store.put(prefix + "k", b"w")
        assert [e.value for e in store.wait(prefix, rev, 10)] == [b"w"]
    with pytest.raises(StoreAuthError) as info:
        create_store("etcd", etcd_server_fn.endpoint, user="root", password="wrong")
    assert "\n" not in str(info.value)
    with pytest.raises(StoreAuthError):
        with create_store("etcd", etcd_server_fn.endpoint) as anonymous:
            anonymous.get(prefix + "k")


# -- TLS -------------------------------------------------------------------------------------
def _tls_etcd(tls, client_cert_auth=False):
    """etcd serving its client port over TLS with a test CA's certificate (tests/services.py)."""
    return EtcdServer(tls=tls, client_cert_auth=client_cert_auth)


def test_tls_round_trip(tmp_path, prefix):
    require("cryptography", "TLS test certificates")
    from tls_certs import make_tls_files

    tls = make_tls_files(str(tmp_path))
    with _tls_etcd(tls) as server:
        store = None
        deadline = time.monotonic() + 30
        while store is None:  # etcd may accept TCP before it serves gRPC
            try:
                store = create_store("etcd", server.endpoint, cacert=tls.ca, timeout_s=5)
            except StoreUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with store:
            store.put(prefix + "k", b"\x00tls")
            assert store.get(prefix + "k").value == b"\x00tls"
        with pytest.raises(StoreUnavailableError):  # plaintext to a TLS etcd
            create_store("etcd", server.endpoint, timeout_s=3)
    with pytest.raises(ConfigError, match="cannot read"):
        create_store("etcd", "127.0.0.1:1", cacert=str(tmp_path / "missing.pem"))


def test_tls_client_certificates(tmp_path, prefix):
    """etcd with --client-cert-auth: a client with a certificate the CA signed gets in; one
    without a certificate, or with one another CA signed, is refused."""
    require("cryptography", "TLS test certificates")
    from tls_certs import make_tls_files

    tls = make_tls_files(str(tmp_path))
    stranger = make_tls_files(str(tmp_path), name="stranger")  # signed by another CA
    with _tls_etcd(tls, client_cert_auth=True) as server:  # ready: /health answered over mTLS
        with create_store("etcd", server.endpoint, cacert=tls.ca, cert=tls.cert, key=tls.key,
                          timeout_s=5) as store:
            store.put(prefix + "k", b"mtls")
            assert store.get(prefix + "k").value == b"mtls"
        for conf in ({"cacert": tls.ca}, {"cacert": tls.ca, "cert": stranger.cert, "key": stranger.key}):
            with pytest.raises(StoreUnavailableError) as info:
                with create_store("etcd", server.endpoint, timeout_s=3, **conf) as store:
                    store.get(prefix + "k")
            assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="needs both cert and key"):
        create_store("etcd", "127.0.0.1:1", cacert=tls.ca, cert=tls.cert)


def test_a_closed_client_says_so(etcd_server, prefix):
    """Not grpc's ValueError ("Channel closed!"): a heartbeat thread outliving its store
    catches StoreError, as every error of a store is one."""
    from elastic.store import StoreError

    store = create_store("etcd", etcd_server.endpoint)
    store.put(prefix + "k", b"v")
    store.close()
    for call in (lambda: store.get(prefix + "k"), lambda: store.keep_alive(1)):
        with pytest.raises(StoreError, match="closed"):
            call()
