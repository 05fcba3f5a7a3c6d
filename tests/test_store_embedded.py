"""The embedded rendezvous backend: contract suite over real sockets, auth, TLS, the CLI."""
import os
import re
import signal
import socket
import sys
import threading

import pytest

from elastic.store import (LeaseNotFoundError, StoreAuthError, StoreError, StoreUnavailableError,
                           create_store)
from elastic.store.embedded import EmbeddedServer, EmbeddedStore, parse_endpoint
from elastic.errors import ConfigError, UserError
from elastic.store.testing import StoreContract, prefix, wait_until  # noqa: F401
from needs import require

TOKEN = "contract-token"


@pytest.fixture(scope="module")
def server():
    with EmbeddedServer("127.0.0.1", 0, token=TOKEN) as srv:
        yield srv


class TestEmbeddedStore(StoreContract):
    @pytest.fixture
    def store(self, server):
        store = create_store("embedded", server.endpoint, token=TOKEN)
        yield store
        store.close()


class TestEmbeddedStoreOverTheCli(StoreContract):
    """The same contract against the real ``elastic-rendezvous serve`` process."""

    @pytest.fixture(scope="class")
    def cli_server(self, tmp_path_factory):
        from harness import Procs

        token_file = tmp_path_factory.mktemp("cli") / "token"
        token_file.write_text("cli-secret\n")
        env = dict(os.environ, PYTHONPATH=os.getcwd())
        with Procs(env=env) as procs:
            procs.start("rdzv", _cli("serve", "--host", "127.0.0.1", "--port", "0",
                                     "--token-file", str(token_file)))
            procs.wait_for_output("rdzv", "listening on", timeout_s=60)
            port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", procs.output("rdzv")).group(1))
            yield procs, f"127.0.0.1:{port}", str(token_file)
            procs.signal("rdzv", signal.SIGTERM)
            result = procs.wait(30, ["rdzv"])["rdzv"]
            assert result.returncode == 0

    @pytest.fixture
    def store(self, cli_server):
        _, endpoint, token_file = cli_server
        store = create_store("embedded", endpoint, token_file=token_file)
        yield store
        store.close()

    def test_wrong_token_is_refused_by_the_process(self, cli_server):
        procs, endpoint, _ = cli_server
        with pytest.raises(StoreAuthError, match="wrong rendezvous token"):
            create_store("embedded", endpoint, token="not-the-secret")
        procs.wait_for_output("rdzv", "wrong token", timeout_s=30)  # logged after the refusal


def _cli(*args):
    # the console script setup.py declares, not a fallback that would hide a broken install
    return [os.path.join(os.path.dirname(sys.executable), "elastic-rendezvous"), *args]


# -- authentication --------------------------------------------------------------------------
def test_wrong_token_raises_auth_error(server):
    before = server.auth_failures
    with pytest.raises(StoreAuthError, match="wrong rendezvous token") as info:
        create_store("embedded", server.endpoint, token="wrong")
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    assert server.auth_failures == before + 1


def test_missing_token_raises_auth_error(server, monkeypatch):
    monkeypatch.delenv("ELASTIC_RDZV_TOKEN", raising=False)
    monkeypatch.delenv("ELASTIC_RDZV_TOKEN_FILE", raising=False)
    with pytest.raises(StoreAuthError, match="requires a token"):
        create_store("embedded", server.endpoint)


def test_token_from_env_and_from_file(server, monkeypatch, tmp_path):
    monkeypatch.setenv("ELASTIC_RDZV_TOKEN", TOKEN)
    with create_store("embedded", server.endpoint) as store:
        assert store.ping() >= 0
    monkeypatch.delenv("ELASTIC_RDZV_TOKEN")
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    with create_store("embedded", server.endpoint, token_file=str(path)) as store:
        assert store.ping() >= 0
    monkeypatch.setenv("ELASTIC_RDZV_TOKEN_FILE", str(path))
    with create_store("embedded", server.endpoint) as store:
        assert store.ping() >= 0
    with pytest.raises(ConfigError, match="token file"):
        create_store("embedded", server.endpoint, token_file=str(tmp_path / "missing"))


def test_client_with_token_refuses_a_server_without_one():
    with EmbeddedServer("127.0.0.1", 0) as open_server:
        with pytest.raises(StoreAuthError, match="no token"):
            create_store("embedded", open_server.endpoint, token="mine")


def test_server_without_token_serves_loopback_clients(monkeypatch):
    monkeypatch.delenv("ELASTIC_RDZV_TOKEN", raising=False)
    with EmbeddedServer("127.0.0.1", 0) as open_server:
        with create_store("embedded", open_server.endpoint) as store:
            store.put("/k", b"v")
            assert store.get("/k").value == b"v"


def _non_loopback_address():
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent; picks the outgoing interface
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def test_server_without_token_refuses_other_hosts(monkeypatch):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    monkeypatch.delenv("ELASTIC_RDZV_TOKEN", raising=False)
    with EmbeddedServer("0.0.0.0", 0) as open_server:
        with pytest.raises(StoreAuthError, match="only loopback"):
            create_store("embedded", f"{address}:{open_server.port}")
        with create_store("embedded", f"127.0.0.1:{open_server.port}") as store:
            assert store.ping() >= 0


# -- connection errors -----------------------------------------------------------------------
def test_unreachable_endpoint_is_one_clear_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(StoreUnavailableError) as info:
            create_store("embedded", f"127.0.0.1:{port}", token=TOKEN, timeout_s=2)
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message and "\n" not in message
    assert isinstance(info.value, UserError)


def test_unresolvable_host():
    with pytest.raises(StoreUnavailableError, match="cannot resolve"):
        create_store("embedded", "no-such-host.invalid:29400", token=TOKEN, timeout_s=2)


def test_something_that_is_not_a_rendezvous_server():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer_http():
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                try:
                    conn.recv(100)
                except OSError:
                    pass

        t = threading.Thread(target=answer_http, daemon=True)
        t.start()
        with pytest.raises(StoreUnavailableError, match="not an elastic-rendezvous server"):
            create_store("embedded", f"127.0.0.1:{port}", token=TOKEN, timeout_s=5)
        t.join(10)


def test_bad_endpoints_and_settings():
    assert parse_endpoint("") == ("127.0.0.1", 29400)
    assert parse_endpoint("node1") == ("node1", 29400)
    assert parse_endpoint("node1:123") == ("node1", 123)
    assert parse_endpoint("[::1]:5") == ("::1", 5)
    for bad in ["h:notaport", "h:0", "h:70000", "a:1,b:2", ":5"]:
        with pytest.raises(ConfigError):
            parse_endpoint(bad)
    with pytest.raises(ConfigError, match="timeout_s"):
        EmbeddedStore("127.0.0.1:1", timeout_s="soon")


def test_port_in_use_is_a_clear_error(server):
    with pytest.raises(StoreError, match="cannot listen"):
        EmbeddedServer("127.0.0.1", server.port, token=TOKEN).start()


# -- behaviour under concurrency and failures ------------------------------------------------
def test_blocking_wait_does_not_block_other_threads(server, prefix):
    with create_store("embedded", server.endpoint, token=TOKEN) as store:
        _, rev = store.get_prefix(prefix)
        got = []
        waiter = threading.Thread(target=lambda: got.extend(store.wait(prefix + "go", rev, 60)))
        waiter.start()
        for i in range(50):  # all of these finish while the wait is still blocked
            store.put(prefix + f"other/{i}", b"x")
            assert store.get(prefix + f"other/{i}").value == b"x"
        assert waiter.is_alive() and got == []
        store.put(prefix + "go", b"now")
        waiter.join(30)
        assert [e.key for e in got] == [prefix + "go"]


def test_a_write_wakes_only_matching_waiters(server, prefix):
    with create_store("embedded", server.endpoint, token=TOKEN) as store:
        _, rev = store.get_prefix(prefix)
        results = {}

        def wait(name):
            results[name] = store.wait(prefix + name + "/", rev, 60)

        threads = {name: threading.Thread(target=wait, args=(name,)) for name in "abcd"}
        for t in threads.values():
            t.start()
        assert wait_until(lambda: sum(len(g) for p, g in list(server._waiters.items())
                                      if p.startswith(prefix)) == 4)
        store.put(prefix + "c/key", b"1")
        threads["c"].join(30)
        assert [e.key for e in results["c"]] == [prefix + "c/key"]
        assert all(threads[n].is_alive() for n in "abd")
        for name in "abd":
            store.put(prefix + name + "/key", b"2")
        for t in threads.values():
            t.join(30)
        assert sorted(results) == list("abcd")


def test_leases_expire_without_any_request(server, prefix):
    seen = threading.Event()

    def listener(event):
        if event.kind == "delete" and event.key == prefix + "node":
            seen.set()

    server.store.add_listener(listener)
    try:
        with create_store("embedded", server.endpoint, token=TOKEN) as store:
            lease = store.grant_lease(0.3)
            store.put(prefix + "node", b"x", lease=lease)
        # No client is connected now; only the server's timer can expire the lease.
        assert seen.wait(15), "lease did not expire on its own"
    finally:
        server.store.remove_listener(listener)


def test_reconnects_after_a_dropped_connection(server, prefix):
    with create_store("embedded", server.endpoint, token=TOKEN) as store:
        store.put(prefix + "k", b"1")
        for conn in list(store._idle):  # break every pooled connection under the client
            conn.sock.shutdown(socket.SHUT_RDWR)
        assert store.get(prefix + "k").value == b"1"
        ok, _ = store.compare_and_set(prefix + "k", store.get(prefix + "k").mod_revision, b"2")
        assert ok


def test_server_restart_is_reported_not_hidden(prefix):
    first = EmbeddedServer("127.0.0.1", 0, token=TOKEN).start()
    port = first.port
    store = create_store("embedded", first.endpoint, token=TOKEN)
    store.put(prefix + "k", b"1")
    first.stop()
    with pytest.raises(StoreUnavailableError):
        store.get(prefix + "k")  # nobody listening
    second = EmbeddedServer("127.0.0.1", port, token=TOKEN).start()
    try:
        with pytest.raises(StoreUnavailableError, match="restarted"):
            store.get(prefix + "k")
    finally:
        store.close()
        second.stop()


def test_lease_errors_cross_the_wire(server, prefix):
    with create_store("embedded", server.endpoint, token=TOKEN) as store:
        with pytest.raises(LeaseNotFoundError):
            store.keep_alive(12345)
        with pytest.raises(ValueError):
            store.grant_lease(0)


def test_large_binary_value_round_trips(server, prefix):
    value = os.urandom(3 << 20)
    with create_store("embedded", server.endpoint, token=TOKEN) as store:
        store.put(prefix + "big", value)
        assert store.get(prefix + "big").value == value


# -- TLS -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    require("cryptography", "TLS test certificates")
    from tls_certs import make_tls_files

    return make_tls_files(str(tmp_path_factory.mktemp("tls")))


def test_tls_round_trip(tls, prefix):
    server = EmbeddedServer.from_conf("127.0.0.1", 0, token=TOKEN, tls_cert=tls.cert,
                                      tls_key=tls.key).start()
    try:
        with create_store("embedded", server.endpoint, token=TOKEN, tls_ca=tls.ca) as store:
            store.put(prefix + "secret", b"\x00over tls")
            assert store.get(prefix + "secret").value == b"\x00over tls"
            _, rev = store.get_prefix(prefix)
            store.delete(prefix + "secret")
            assert [e.kind for e in store.wait(prefix, rev, 5)] == ["delete"]
        # A plain client cannot talk to a TLS server, and says so in one line.
        with pytest.raises(StoreUnavailableError, match="TLS"):
            create_store("embedded", server.endpoint, token=TOKEN, timeout_s=3)
    finally:
        server.stop()


def test_tls_with_an_untrusted_certificate_is_refused(tls, tmp_path):
    from tls_certs import make_tls_files

    other = make_tls_files(str(tmp_path), name="other")
    server = EmbeddedServer.from_conf("127.0.0.1", 0, token=TOKEN, tls_cert=tls.cert,
                                      tls_key=tls.key).start()
    try:
        with pytest.raises(StoreAuthError, match="certificate"):
            create_store("embedded", server.endpoint, token=TOKEN, tls_ca=other.ca)
    finally:
        server.stop()


def test_tls_client_certificates(tls, prefix):
    server = EmbeddedServer.from_conf("127.0.0.1", 0, token=TOKEN, tls_cert=tls.cert,
                                      tls_key=tls.key, tls_ca=tls.ca).start()
    try:
        with create_store("embedded", server.endpoint, token=TOKEN, tls_ca=tls.ca,
                          tls_cert=tls.cert, tls_key=tls.key) as store:
            assert store.put(prefix + "k", b"v") > 0
        with pytest.raises(StoreUnavailableError):
            create_store("embedded", server.endpoint, token=TOKEN, tls_ca=tls.ca, timeout_s=3)
    finally:
        server.stop()


def test_tls_settings_errors(tls):
    with pytest.raises(ConfigError, match="tls_key"):
        EmbeddedServer.from_conf("127.0.0.1", 0, tls_cert=tls.cert)
    with pytest.raises(ConfigError, match="does not exist"):
        EmbeddedServer.from_conf("127.0.0.1", 0, tls_cert="/nonexistent.pem", tls_key=tls.key)


# -- the CLI's bad input ---------------------------------------------------------------------
def _run_cli(*args, timeout=60):
    import subprocess

    return subprocess.run(_cli(*args), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))


def test_cli_bad_tls_files_is_one_line():
    res = _run_cli("serve", "--port", "0", "--tls-cert", "/nonexistent.pem", "--tls-key", "/x.pem")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("elastic-rendezvous: error:")


def test_cli_port_in_use_is_one_line(server):
    res = _run_cli("serve", "--host", "127.0.0.1", "--port", str(server.port), "--token", "t")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "cannot listen" in res.stderr


def test_address_in_use_error_keeps_the_errno(server):
    import errno

    with pytest.raises(StoreError) as info:
        EmbeddedServer("127.0.0.1", server.port, token=TOKEN).start()
    assert info.value.__cause__.errno == errno.EADDRINUSE


def test_a_forked_child_uses_its_own_connections(server, prefix):
    with create_store("embedded", server.endpoint, token=TOKEN) as store:
        store.put(prefix + "k", b"parent")
        pid = os.fork()
        if pid == 0:  # child: must not reuse the parent's pooled socket
            code = 1
            try:
                store.put(prefix + "child", b"1")
                code = 0 if store.get(prefix + "k").value == b"parent" else 1
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert store.get(prefix + "child").value == b"1"  # the parent's pool still works
        assert store.get(prefix + "k").value == b"parent"
