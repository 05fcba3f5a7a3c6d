"""Hostile input to the embedded rendezvous server over real sockets.

Each test attacks the server while a normal client keeps working through it; the attacker's
connection must be dropped (we see EOF) and the normal client must never see an error.
"""
import json
import os
import socket
import ssl
import struct
import threading

import pytest

from elastic.store import create_store
from elastic.store import _wire as wire
from elastic.store.embedded import EmbeddedServer
from elastic.store.testing import wait_until
from needs import require

TOKEN = "hostile-test-token"


class _Bystander:
    """A normal client doing puts, gets and short waits in a loop on its own thread."""

    def __init__(self, endpoint: str, **conf) -> None:
        self.store = create_store("embedded", endpoint, token=TOKEN, **conf)
        self.ops = 0
        self.errors = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                _, rev = self.store.get_prefix("/bystander/")
                self.store.put(f"/bystander/{i % 10}", str(i).encode())
                assert self.store.get(f"/bystander/{i % 10}").value == str(i).encode()
                assert self.store.wait("/bystander/", rev, 5), "wait missed a put"
                self.ops += 1
                i += 1
            except Exception as exc:  # recorded, asserted empty by the test
                self.errors.append(repr(exc))
                return

    def progress_after(self, n: int = 3) -> bool:
        target = self.ops + n
        return wait_until(lambda: self.ops >= target or bool(self.errors), timeout_s=30) and \
            not self.errors

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.store.close()


@pytest.fixture
def server():
    with EmbeddedServer("127.0.0.1", 0, token=TOKEN, auth_timeout_s=1.0) as srv:
        yield srv


@pytest.fixture
def bystander(server):
    b = _Bystander(server.endpoint)
    assert b.progress_after(), b.errors
    yield b
    b.close()
    assert b.errors == []


def _connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    return s


def _recv_frame(s: socket.socket) -> dict:
    header = _recv_exactly(s, 4)
    (n,) = struct.unpack(">I", header)
    return json.loads(_recv_exactly(s, n))


def _recv_exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _frame(obj) -> bytes:
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def _authenticated(server) -> socket.socket:
    """A raw socket that completed the handshake, for attacks after authentication."""
    s = _connect(server)
    hello = _recv_frame(s)
    nonce = wire.new_nonce()
    proof = wire.client_proof(TOKEN.encode(), wire.unb64(hello["nonce"]), nonce)
    s.sendall(_frame({"proof": proof, "nonce": wire.b64(nonce)}))
    assert _recv_frame(s)["ok"] is True
    return s


def _dropped(s: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset); reads what is left."""
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def _expect_drop(server, s, before):
    with s:
        assert _dropped(s), "the server kept a hostile connection open"
    assert wait_until(lambda: server.dropped_connections > before)


def test_garbage_bytes_before_the_handshake(server, bystander):
    before = server.dropped_connections
    s = _connect(server)
    s.sendall(os.urandom(8192))
    _expect_drop(server, s, before)
    assert bystander.progress_after()


def test_huge_length_prefix_is_dropped_without_waiting_for_the_body(server, bystander):
    before = server.dropped_connections
    s = _connect(server)
    _recv_frame(s)  # hello
    s.sendall(b"\xff\xff\xff\xff")  # 4 GiB announced; nothing follows
    _expect_drop(server, s, before)
    before = server.dropped_connections
    s = _authenticated(server)
    s.sendall(struct.pack(">I", wire.MAX_MESSAGE_BYTES + 1))
    _expect_drop(server, s, before)
    assert bystander.progress_after()


def test_half_open_and_slow_handshakes_hit_the_auth_deadline(server, bystander):
    before = server.dropped_connections
    silent = _connect(server)  # connects, never speaks
    slow = _connect(server)
    _recv_frame(slow)
    slow.sendall(b"\x00\x00")  # half a length prefix, then nothing
    _expect_drop(server, silent, before)
    _expect_drop(server, slow, before + 1)
    assert bystander.progress_after()


@pytest.mark.parametrize("payload", [
    b"{not json",
    b"\xff\xfe\xfd",  # not UTF-8
    b"[1, 2, 3]",  # JSON, not an object
    b"[" * 100000 + b"]" * 100000,  # nesting deep enough to exhaust the parser's recursion
    json.dumps({"id": 1, "op": "format_disk"}).encode(),  # unknown op
    json.dumps({"op": "get", "key": "/x"}).encode(),  # no id
    json.dumps({"id": 1, "op": "put", "key": 5, "value": "AA=="}).encode(),  # wrong type
    json.dumps({"id": 1, "op": "put", "key": "/x", "value": {"b64": "***"}}).encode(),  # bad base64
    json.dumps({"id": 1, "op": "put", "key": "/x", "value": 5}).encode(),  # neither text nor b64
    b'{"id": 1, "op": "put", "key": "/x", "value": "\\ud800"}',  # a lone surrogate
    json.dumps({"id": 1, "op": "grant", "ttl_s": "forever"}).encode(),
    json.dumps({"id": 1, "op": "wait", "prefix": "/", "after": -1, "timeout_s": 1}).encode(),
])
def test_malformed_requests_after_auth_drop_only_that_client(server, bystander, payload):
    before = server.dropped_connections
    s = _authenticated(server)
    s.sendall(_frame(payload))
    _expect_drop(server, s, before)
    assert bystander.progress_after()


def test_malformed_handshake_answers(server, bystander):
    for answer in [{"proof": "00" * 32}, {"nonce": "short"}, {"proof": 5, "nonce": wire.b64(b"x" * 32)},
                   b"x" * (wire.MAX_HANDSHAKE_BYTES + 1)]:
        before = server.dropped_connections
        s = _connect(server)
        _recv_frame(s)
        s.sendall(_frame(answer))
        with s:
            # A wrong proof is answered with a refusal before the close; either way: EOF.
            assert _dropped(s)
        assert wait_until(lambda before=before: server.dropped_connections > before)
    assert bystander.progress_after()


def test_many_idle_connections_do_not_starve_clients(server, bystander):
    idle = [_connect(server) for _ in range(300)]
    try:
        assert bystander.progress_after()
        with create_store("embedded", server.endpoint, token=TOKEN) as store:
            store.put("/late", b"still served")
            assert store.get("/late").value == b"still served"
    finally:
        for s in idle:
            s.close()


def test_flood_of_requests_without_reading_replies(server, bystander):
    s = _authenticated(server)
    request = _frame({"id": 1, "op": "get_prefix", "prefix": "/bystander/"})
    s.settimeout(5)
    try:
        for _ in range(20000):  # the server stops reading us once its buffers fill up
            s.sendall(request)
    except (socket.timeout, OSError):
        pass
    assert bystander.progress_after()
    s.close()
    assert bystander.progress_after()


def test_garbage_to_a_tls_server(tmp_path):
    require("cryptography", "TLS test certificates")
    from tls_certs import make_tls_files

    tls = make_tls_files(str(tmp_path))
    server = EmbeddedServer.from_conf("127.0.0.1", 0, token=TOKEN, tls_cert=tls.cert,
                                      tls_key=tls.key, auth_timeout_s=1.0).start()
    bystander = _Bystander(server.endpoint, tls_ca=tls.ca)
    try:
        assert bystander.progress_after(), bystander.errors
        for attack in (os.urandom(4096), b""):  # garbage; a silent half-open connection
            s = _connect(server)
            if attack:
                s.sendall(attack)
            with s:
                assert _dropped(s)
        # A TLS peer that authenticates the transport but sends garbage inside it.
        ctx = ssl.create_default_context(cafile=tls.ca)
        with ctx.wrap_socket(_connect(server), server_hostname="127.0.0.1") as s:
            _recv_frame(s)
            s.sendall(b"\x00\x00\x00\x05hello")
            assert _dropped(s)
        assert bystander.progress_after()
    finally:
        bystander.close()
        server.stop()
    assert bystander.errors == []
