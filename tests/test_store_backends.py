"""Store backends as plug-ins: each factory declares its settings and traits (BackendSpec);
create_store and the launcher pass it only those and pick it through the registry, by traits."""
import uuid

import pytest

from elastic.errors import ConfigError
from elastic.store import BackendSpec, MemoryStore, backend_spec, backends, create_store
from launchers.config import LaunchConfig, store_conf
from launchers.launch import _open_store


def test_settings_map_aliases_and_refuse_unknown_keys_in_one_line():
    spec = BackendSpec(keys=frozenset({"cacert", "timeout_s"}), aliases=(("ca_cert", "cacert"),))
    assert spec.settings("x", {"ca_cert": "a.pem", "timeout_s": "3"}) == {"cacert": "a.pem", "timeout_s": "3"}
    assert spec.settings("x", {"ca_cert": "alias.pem", "cacert": "key.pem"}) == {"cacert": "key.pem"}
    with pytest.raises(ConfigError) as info:
        spec.settings("x", {"cacert": "a", "bogus": "1", "also": "2"}, known_elsewhere=["join_timeout"])
    assert str(info.value) == ("settings: unknown key(s) for backend 'x': also, bogus "
                               "(known: ca_cert, cacert, join_timeout, timeout_s)")
    assert BackendSpec(ignores_unknown=True).settings("m", {"bogus": "1"}) == {}


def test_our_backends_declare_what_they_take():
    assert backend_spec("memory").in_process and backend_spec("memory").ignores_unknown
    assert backend_spec("embedded").serve is not None and "token_file" in backend_spec("embedded").keys
    assert backend_spec("etcd").settings("etcd", {"ssl_cert": "c", "timeout": "2"}) == {
        "cert": "c", "timeout_s": "2"}
    assert isinstance(create_store("memory", "", anything="ignored"), MemoryStore)


def test_create_store_refuses_an_unknown_setting_before_connecting():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) for backend 'embedded': bogus \(known: .*token_file"):
        create_store("embedded", "127.0.0.1:1", bogus="1")


def test_a_factory_that_declares_nothing_takes_no_settings():
    name = f"bare-{uuid.uuid4().hex[:6]}"
    backends.register(name, lambda endpoint="", **conf: MemoryStore())
    assert backend_spec(name) == BackendSpec()
    with pytest.raises(ConfigError, match=f"backend '{name}': token"):
        create_store(name, "", token="x")


class _FakeServer:
    def __init__(self, host, port, conf):
        self.host, self.port, self.conf, self.stopped = host, port or 4242, conf, False
        self.store = MemoryStore()

    def stop(self):
        self.stopped = True


def _plugin(calls):
    def factory(endpoint="", **conf):
        calls.append(("connect", endpoint, conf))
        return MemoryStore()

    def serve(host, port, **conf):
        server = _FakeServer(host, port, conf)
        calls.append(("serve", host, port, conf))
        return server

    factory.spec = BackendSpec(keys=frozenset({"secret", "timeout_s"}), aliases=(("pw", "secret"),),
                               serve=serve)
    name = f"plugin-{uuid.uuid4().hex[:6]}"
    backends.register(name, factory)
    return name


def test_the_launcher_picks_a_third_party_backend_by_its_traits(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    calls = []
    name = _plugin(calls)
    conf = {"pw": "s3", "read_timeout": "7", "join_timeout": "60", "is_host": "true"}
    assert store_conf(conf, name) == {"secret": "s3", "timeout_s": "7"}
    config = LaunchConfig(entrypoint=(str(script),), rdzv_backend=name, rdzv_endpoint="127.0.0.1:0",
                          rdzv_conf=conf)
    store, server, local, env = _open_store(config)
    assert calls == [("serve", "127.0.0.1", 0, {"secret": "s3", "timeout_s": "7"}),
                     ("connect", "127.0.0.1:4242", {"secret": "s3", "timeout_s": "7"})]
    assert isinstance(server, _FakeServer) and local == "127.0.0.1"
    assert env["ELASTIC_RDZV_BACKEND"] == name and env["ELASTIC_RDZV_ENDPOINT"] == "127.0.0.1:4242"
    with pytest.raises(ConfigError, match=rf"--rdzv-conf: unknown key\(s\) for backend '{name}': token "
                                          r"\(known: .*join_timeout.*pw.*secret"):
        LaunchConfig(entrypoint=(str(script),), rdzv_backend=name, rdzv_conf={"token": "x"})


def test_a_node_that_does_not_host_only_connects(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    calls = []
    name = _plugin(calls)
    config = LaunchConfig(entrypoint=(str(script),), rdzv_backend=name, rdzv_endpoint="10.9.8.7:5",
                          rdzv_conf={"is_host": "false"})
    _, server, local, _ = _open_store(config)
    assert calls == [("connect", "10.9.8.7:5", {})] and server is None and local is None


def test_the_memory_backend_stays_in_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    config = LaunchConfig(entrypoint=(str(script),), rdzv_backend="memory", rdzv_conf={"anything": "1"})
    store, server, local, env = _open_store(config)
    assert isinstance(store, MemoryStore) and server is None and local == "127.0.0.1" and env == {}


def test_a_hosted_server_is_stopped_when_connecting_to_it_fails(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    served = []

    def factory(endpoint="", **conf):
        raise ConfigError("cannot connect")

    def serve(host, port, **conf):
        served.append(_FakeServer(host, port, conf))
        return served[-1]

    factory.spec = BackendSpec(serve=serve)
    name = f"broken-{uuid.uuid4().hex[:6]}"
    backends.register(name, factory)
    config = LaunchConfig(entrypoint=(str(script),), rdzv_backend=name, rdzv_endpoint="127.0.0.1:0")
    with pytest.raises(ConfigError, match="cannot connect"):
        _open_store(config)
    assert [s.stopped for s in served] == [True]
