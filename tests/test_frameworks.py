"""Framework adapters: detection, the environment each framework gets, Horovod's rendezvous
server, and TensorFlow's checkpoint helper (in real worker processes)."""
import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest

from needs import needs, require
from services import free_port

from paths import ELASTIC_RUN, REPO  # noqa: E402


def make_round(nprocs, node_rank=0, generation=3, host="127.0.0.1"):
    from elastic.rendezvous import NodeInfo, Round

    nodes = tuple(NodeInfo(f"host{i}-{1000 + i}-abc", host, n, master_port=free_port(), aux_port=free_port())
                  for i, n in enumerate(nprocs))
    return Round(generation=generation, nodes=nodes, node_rank=node_rank, max_nodes=len(nodes))


# -- detection ---------------------------------------------------------------------------------
@pytest.mark.parametrize("source, expected", [
    ("import torch\nimport torch.distributed as dist\n", "torch"),
    ("import numpy as np\n", "torch"),
    ("import horovod.torch as hvd\nimport torch\n", "horovod"),
    ("import tensorflow as tf\nimport horovod.tensorflow.keras as hvd\n", "horovod"),
    ("from horovod import torch as hvd\n", "horovod"),
    ("import tensorflow as tf\n", "tensorflow"),
    ("import keras\n", "tensorflow"),
    ("import os, keras\n", "tensorflow"),
    ("import launchers.tensorflow as ltf\n", "tensorflow"),
    ("from launchers import horovod\n", "horovod"),
    ("from launchers.horovod import init\nimport torch\n", "horovod"),
    ("import torch\n# import horovod.torch as hvd\n", "torch"),  # a comment is not an import
    ("def f():\n    import tensorflow as tf\n", "tensorflow"),  # an indented import counts
])
def test_detect_framework_from_imports(tmp_path, source, expected):
    from launchers.frameworks import detect_framework

    script = tmp_path / "train.py"
    script.write_text(source)
    assert detect_framework(str(script)) == expected


def test_detection_defaults_to_torch_for_what_it_cannot_read():
    from launchers.frameworks import detect_framework, resolve_framework

    assert detect_framework(None) == "torch"
    assert detect_framework("/no/such/script.py") == "torch"
    assert resolve_framework("auto", None) == "torch"
    assert resolve_framework("tf", None) == "tensorflow"
    assert resolve_framework("Horovod", None) == "horovod"


def test_standby_preload_follows_the_imports(tmp_path):
    from launchers.frameworks import standby_preload

    script = tmp_path / "train.py"
    script.write_text("import horovod.tensorflow.keras as hvd\nimport keras\nimport numpy\n")
    assert standby_preload(str(script)) == ("horovod.tensorflow", "tensorflow")
    script.write_text("import launchers.tensorflow as ltf\n")
    assert standby_preload(str(script)) == ("tensorflow",)


def test_unknown_framework_is_one_line_error(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    res = subprocess.run([ELASTIC_RUN, "--framework", "mxnet", str(script)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "elastic-run: error: --framework 'mxnet': expected auto, horovod, tensorflow, torch"]


def test_adapter_registry_takes_third_party_adapters():
    from elastic.agent import FrameworkAdapter
    from elastic.errors import ConfigError
    from launchers.frameworks import ADAPTERS, create_adapter, register_adapter, resolve_framework

    class Jax(FrameworkAdapter):
        name = "jax"

        def worker_env(self, rnd, local_rank, rank):
            return {"JAX_PROCESS_ID": str(rank)}

    register_adapter("jax-test", Jax)
    try:
        assert resolve_framework("jax-test", None) == "jax-test"
        assert create_adapter("jax-test").worker_env(None, 0, 5) == {"JAX_PROCESS_ID": "5"}
        with pytest.raises(ConfigError, match="already registered"):
            register_adapter("jax-test", Jax)
    finally:
        ADAPTERS._entries.pop("jax-test")


# -- TensorFlow: TF_CONFIG -------------------------------------------------------------------------
def test_tf_config_lists_every_rank_on_its_nodes_aux_ports():
    from launchers.tensorflow import TensorFlowAdapter

    rnd = make_round([2, 1, 3], node_rank=2)
    adapter = TensorFlowAdapter()
    adapter.on_round(rnd)
    expected = [f"127.0.0.1:{n.aux_port + j}" for n in rnd.nodes for j in range(n.nproc)]
    for local_rank in range(3):
        rank = rnd.rank_offset + local_rank
        cfg = json.loads(adapter.worker_env(rnd, local_rank, rank)["TF_CONFIG"])
        assert cfg == {"cluster": {"worker": expected}, "task": {"type": "worker", "index": rank}}
    assert rnd.rank_offset == 3


# -- Horovod: the environment horovodrun gives, and its rendezvous server ----------------------------
pytest_horovod = needs("horovod.runner.gloo_run", tools=["horovodrun"], why="Horovod built by make setup")


@pytest_horovod
def test_horovod_env_is_what_horovodrun_sets():
    from horovod.runner.common.util.hosts import HostInfo, get_host_assignments
    from horovod.runner.gloo_run import create_run_env_vars, create_slot_env_vars

    from launchers.horovod import HorovodAdapter, round_hostname, slot_hostname

    rnd = make_round([2, 1, 2], node_rank=1)
    adapter = HorovodAdapter()
    adapter.on_round(rnd)  # not node rank 0: serves nothing
    try:
        plan = get_host_assignments([HostInfo(round_hostname(n, rnd.generation), n.nproc) for n in rnd.nodes],
                                    rnd.world_size)
        env = dict(adapter.worker_env(rnd, 0, rnd.rank_offset))
        expected = {k: str(v) for k, v in create_slot_env_vars(plan[2]).items()}
        expected.update({k: str(v) for k, v in create_run_env_vars(
            "127.0.0.1", ["lo"], rnd.nodes[0].aux_port).items()})
        expected["HOROVOD_ELASTIC"] = "1"  # as horovodrun --elastic: hvd.init() after a reset asks the server
        assert {k: env[k] for k in expected} == expected
        assert (env["HOROVOD_RANK"], env["HOROVOD_SIZE"], env["HOROVOD_LOCAL_RANK"], env["HOROVOD_LOCAL_SIZE"],
                env["HOROVOD_CROSS_RANK"], env["HOROVOD_CROSS_SIZE"]) == ("2", "5", "0", "1", "1", "3")
        assert env["HOROVOD_CONTROLLER"] == env["HOROVOD_CPU_OPERATIONS"] == "gloo"
        assert env["HOROVOD_GLOO_IFACE"] == "lo"
        # one Horovod "host" per agent, so two agents on one machine have separate local ranks
        assert len({slot_hostname(n) for n in rnd.nodes}) == 3
        assert all(re.fullmatch(r"[\w.-]+", slot_hostname(n)) for n in rnd.nodes)
    finally:
        adapter.close()


def http(method, url, data=None):
    req = urllib.request.Request(url, data=data, method=method)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, resp.read()


@pytest_horovod
def test_node_rank_zero_serves_horovods_rendezvous_per_round():
    from horovod.runner.http.http_client import put_data_into_kvstore, read_data_from_kvstore

    from launchers.horovod import HorovodAdapter, round_hostname

    adapter = HorovodAdapter()
    rnd = make_round([2, 1], node_rank=0)
    adapter.on_round(rnd)
    try:
        port = rnd.nodes[0].aux_port
        # Horovod's own client against our server: its key-value scopes work
        put_data_into_kvstore("127.0.0.1", port, "global", "k", b"v1")
        assert read_data_from_kvstore("127.0.0.1", port, "global", "k") == b"v1"
        # and Horovod's elastic re-init query answers the slot of host:local_rank
        host1 = round_hostname(rnd.nodes[1], rnd.generation)
        assert http("GET", f"http://127.0.0.1:{port}/rank_and_size/{host1}:0") == (200, b"2,3,0,1,1,2")
        assert http("GET", f"http://127.0.0.1:{port}/rank_and_size/nobody:0")[1] == b"-1,-1,-1,-1,-1,-1"
        # a worker already told of a newer round is told to ask again (404), not given its old place
        newer = round_hostname(rnd.nodes[1], rnd.generation + 1)
        with pytest.raises(urllib.error.HTTPError) as err:
            http("GET", f"http://127.0.0.1:{port}/rank_and_size/{newer}:0")
        assert err.value.code == 404
        # the next round stops this server and serves a fresh one on the new round's port
        nxt = make_round([2], node_rank=0, generation=4)
        adapter.on_round(nxt)
        with pytest.raises(urllib.error.URLError) as gone:  # nothing listens there any more
            http("GET", f"http://127.0.0.1:{port}/global/k")
        assert isinstance(gone.value.reason, ConnectionRefusedError), gone.value
        new_port = nxt.nodes[0].aux_port
        assert http("GET", f"http://127.0.0.1:{new_port}/rank_and_size/{round_hostname(nxt.nodes[0], 4)}:1") == \
            (200, b"1,2,1,2,0,1")
    finally:
        adapter.close()
    with pytest.raises(urllib.error.URLError) as gone:
        http("GET", f"http://127.0.0.1:{new_port}/global/k")
    assert isinstance(gone.value.reason, ConnectionRefusedError), gone.value


@pytest_horovod
def test_a_fresh_local_rank_zero_swaps_horovod_ranks_with_the_lowest_survivor():
    """Horovod's state.sync() broadcasts from rank 0: after an in-place re-formation rank 0 must
    be a survivor, so a fresh local rank 0 on node 0 trades ranks with the lowest survivor."""
    from launchers.horovod import HorovodAdapter, host_plan

    rnd = make_round([3, 2], node_rank=0)
    plan = host_plan(rnd, fresh_local_ranks=[0])
    assert [s.rank for s in plan] == list(range(5))
    by_local = {(s.hostname, s.local_rank): s.rank for s in plan}
    node0 = plan[0].hostname
    assert (by_local[(node0, 0)], by_local[(node0, 1)], by_local[(node0, 2)]) == (1, 0, 2)
    assert [s.rank for s in plan if s.hostname != node0] == [3, 4]  # other nodes keep theirs
    assert [s.rank for s in host_plan(rnd, fresh_local_ranks=[1])] == list(range(5))  # rank 0 survives
    assert [(s.local_rank, s.rank) for s in host_plan(rnd, fresh_local_ranks=[0, 1, 2])][:3] == \
        [(0, 0), (1, 1), (2, 2)]  # nobody to swap with
    adapter = HorovodAdapter()
    try:
        adapter.on_round(rnd, fresh_local_ranks=[0])
        env = adapter.worker_env(rnd, 0, 0)
        assert (env["HOROVOD_RANK"], env["RANK"], env["HOROVOD_LOCAL_RANK"]) == ("1", "1", "0")
    finally:
        adapter.close()


@pytest.mark.parametrize("env, refused", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, True),  # elastic-run without the Horovod adapter
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, True),
    ({"RANK": "0", "WORLD_SIZE": "1"}, False),  # alone anyway
    ({"RANK": "1", "WORLD_SIZE": "2", "HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"}, False),  # the adapter's
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2"}, False),  # horovodrun
    ({"RANK": "0"}, False),  # no world size: a world of one
    ({}, False),  # a plain python script.py
])
def test_horovod_init_reads_the_world_to_tell_a_worker_launched_without_horovod(env, refused):
    from elastic.errors import ConfigError
    from launchers.horovod import _launched_without_horovod

    assert _launched_without_horovod(env) is refused
    with pytest.raises(ConfigError, match="WORLD_SIZE must be an integer"):
        _launched_without_horovod({"RANK": "1", "WORLD_SIZE": "two"})  # World's one reading of it


@pytest_horovod
def test_horovod_init_refuses_a_worker_without_horovods_environment(tmp_path):
    code = textwrap.dedent("""
        import os
        from launchers.errors import LauncherError
        import launchers.horovod as lh
        os.environ.update(RANK="1", WORLD_SIZE="2")
        try:
            lh.init("torch")
        except LauncherError as exc:
            print("REFUSED", exc)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "REFUSED this worker was launched without Horovod's environment" in res.stdout, res.stderr


# -- TensorFlow: TrainingCheckpoint in real worker processes ------------------------------------------
TRAIN = textwrap.dedent("""
    import os, sys, signal, threading, time
    import numpy as np
    import keras
    from launchers.tensorflow import TrainingCheckpoint

    mode, url = sys.argv[1], sys.argv[2]
    keras.utils.set_random_seed(int(os.environ.get("SEED", "0")))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(model.trainable_variables)
    x = np.random.RandomState(1).rand(8, 4).astype("float32")
    y = np.random.RandomState(2).rand(8, 3).astype("float32")

    def train_step():
        import tensorflow as tf
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    def digest():
        return round(float(sum(np.abs(v.numpy()).sum() for v in model.variables + opt.variables)), 5)

    ck = TrainingCheckpoint(url, every_steps=3, sigterm_grace_s=1.0, model=model, optimizer=opt)
    step = ck.restore()
    print("RESTORED", step, ck.extra.get("samples"), digest(), flush=True)
    if mode == "until-sigterm":
        while True:
            train_step(); step += 1
            print("STEP", step, digest(), flush=True)
            ck.step_end(step, {"samples": 8 * step})
            time.sleep(0.02)
    elif mode == "stuck":
        print("STUCK", flush=True)
        threading.Event().wait()  # like a collective whose peer is gone: no step ever ends
""")


def run_worker(tmp_path, mode, url, env):
    script = tmp_path / "ck_worker.py"
    script.write_text(TRAIN)
    full = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    proc = subprocess.Popen([sys.executable, str(script), mode, url], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    proc.lines = queue.Queue()
    proc.seen = []
    threading.Thread(target=lambda: [proc.lines.put(line) for line in proc.stdout] + [proc.lines.put(None)],
                     daemon=True).start()
    return proc


def read_until(proc, prefix, timeout_s=120):
    """The fields of the first line starting with ``prefix`` (lines before it are kept in .seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            line = proc.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            raise AssertionError(f"no {prefix!r} line; stderr:\n{proc.stderr.read()[-3000:]}")
        proc.seen.append(line)
        if line.startswith(prefix):
            return line.split()


def rest_of_output(proc):
    proc.wait(timeout=60)
    lines = list(proc.seen)
    while True:
        line = proc.lines.get(timeout=10)
        if line is None:
            return lines
        lines.append(line)


def test_training_checkpoint_saves_on_sigterm_and_restores_at_another_world_size(tmp_path):
    url = str(tmp_path / "ckpt")
    env = {"RANK": "0", "WORLD_SIZE": "2", "ELASTIC_GENERATION": "1", "TORCHELASTIC_RUN_ID": f"t{free_port()}"}
    stuck = run_worker(tmp_path, "stuck", str(tmp_path / "other"), env)  # meanwhile: the watchdog case
    chief = run_worker(tmp_path, "until-sigterm", url, env)
    try:
        assert read_until(chief, "RESTORED")[1:3] == ["0", "None"]  # nothing saved yet
        # the chief, told to stop between steps, saves the step it reached, then ends by SIGTERM
        read_until(chief, "STEP 10 ")
        chief.send_signal(signal.SIGTERM)
        chief.wait(timeout=60)
        assert chief.returncode == -signal.SIGTERM, chief.stderr.read()[-3000:]
        lines = rest_of_output(chief)
        printed = {int(f[1]): f[2] for f in (line.split() for line in lines) if f and f[0] == "STEP"}
        last = max(printed)
        from checkpoint import Checkpointer

        ck = Checkpointer(url, rank=0, world_size=1, memory=False)
        steps = ck.steps()
        # the newest is the step it stopped at; before it, the every-3-steps saves (keep=2)
        assert steps[-1] == last and len(steps) == 2 and steps[0] % 3 == 0 and steps[0] >= 9, (steps, last)
        assert ck.list()[-1].world_size == 1  # the chief alone wrote the replicated state

        # a non-chief rank of a larger world (2 -> 3) restores exactly that state
        other = run_worker(tmp_path, "until-sigterm", url,
                           {**env, "RANK": "2", "WORLD_SIZE": "3", "ELASTIC_GENERATION": "2"})
        fields = read_until(other, "RESTORED")
        other.kill()
        other.wait()
        assert fields[1:] == [str(last), str(8 * last), printed[last]]

        # a worker stuck in a collective cannot reach a step end: the watchdog ends it after the grace
        read_until(stuck, "STUCK")
        stuck.send_signal(signal.SIGTERM)
        stuck.wait(timeout=30)
        assert stuck.returncode == 128 + signal.SIGTERM
        assert "no step ended within 1.0s" in stuck.stderr.read()
    finally:
        for p in (stuck, chief):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_closed_round_fence_reads_the_jobs_store():
    from elastic import closed_round_fence as _closed_round_fence
    from elastic.store import create_store
    from elastic.store.embedded_server import EmbeddedServer

    server = EmbeddedServer("127.0.0.1", 0, token="tok").start()
    store = create_store("embedded", f"127.0.0.1:{server.port}", token="tok")
    saved = dict(os.environ)
    try:
        os.environ.update(ELASTIC_RDZV_BACKEND="embedded", ELASTIC_RDZV_ENDPOINT=f"127.0.0.1:{server.port}",
                          ELASTIC_RDZV_CONF=json.dumps({"token": "tok"}), ELASTIC_RUN_PREFIX="/elastic/job/")
        fence = _closed_round_fence(4)
        assert fence() == 4  # no round yet: nothing newer
        store.put("/elastic/job/round", json.dumps({"generation": 5, "state": "open"}).encode())
        assert fence() == 4  # a round that is still open does not fence the final save
        store.put("/elastic/job/round", json.dumps({"generation": 5, "state": "closed"}).encode())
        assert fence() == 5  # a newer round closed: generation 4 may no longer publish
        os.environ.pop("ELASTIC_RDZV_ENDPOINT")
        assert _closed_round_fence(4) is None  # outside elastic-run
    finally:
        os.environ.clear()
        os.environ.update(saved)
        store.close()
        server.stop()


# -- where the checkpoint helpers live: checkpoint.keras, and launchers.tensorflow as before -------
IMPORT_PATHS = textwrap.dedent("""
    import sys
    class NoKeras:  # as in an install without the tf extra
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('tensorflow', 'keras'):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name.split('.')[0])
    sys.meta_path.insert(0, NoKeras())
    import checkpoint.keras, launchers.tensorflow
    from elastic.errors import MissingExtraError
    from launchers.tensorflow import TrainingCheckpoint
    assert TrainingCheckpoint is checkpoint.keras.TrainingCheckpoint
    assert TrainingCheckpoint.__module__ == "checkpoint.keras"
    for mod in (checkpoint.keras, launchers.tensorflow):
        assert "ElasticCheckpoint" in dir(mod) and "ElasticCheckpoint" in mod.__all__
        try:
            mod.ElasticCheckpoint
        except MissingExtraError as exc:
            print("NEEDS", exc.__class__.__name__, "keras" in str(exc))
    try:
        launchers.tensorflow.NoSuchThing
    except AttributeError as exc:
        print("NONE", exc)
    print("HEAVY", sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))
""")


def test_checkpoint_helpers_import_from_checkpoint_keras_and_the_old_path_without_keras():
    res = subprocess.run([sys.executable, "-c", IMPORT_PATHS], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "NEEDS MissingExtraError True", "NEEDS MissingExtraError True",
        "NONE module 'launchers.tensorflow' has no attribute 'NoSuchThing'", "HEAVY []"]


def test_elastic_checkpoint_is_one_keras_callback_class_on_both_paths():
    keras = require("keras")
    import checkpoint.keras as ck
    import launchers.tensorflow as ltf
    from launchers.tensorflow import ElasticCheckpoint

    assert ElasticCheckpoint is ck.ElasticCheckpoint is ltf.ElasticCheckpoint
    assert issubclass(ElasticCheckpoint, keras.callbacks.Callback)
    assert (ElasticCheckpoint.__module__, ElasticCheckpoint.__name__) == ("checkpoint.keras", "ElasticCheckpoint")
    assert "BackupAndRestore" in ElasticCheckpoint.__doc__
    cb = ElasticCheckpoint("/nowhere", every_steps=5)
    assert (cb.every_epochs, cb._opts["every_steps"], cb.step, cb.ck) == (None, 5, 0, None)
    assert ElasticCheckpoint("/nowhere").every_epochs == 1  # the default: every epoch
    from elastic.errors import ConfigError

    with pytest.raises(ConfigError, match="every_epochs must be >= 1"):
        ElasticCheckpoint("/nowhere", every_epochs=0)


# -- ElasticCheckpoint(every_s=, every_epochs=): which steps a real Keras fit() saves ----------
KERAS_FIT = textwrap.dedent("""
    import json, os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    from checkpoint import Checkpointer
    from checkpoint.keras import ElasticCheckpoint

    for i, opts in enumerate(json.loads(sys.argv[2])):  # one TensorFlow start, a fit per config
        url = os.path.join(sys.argv[1], str(i))
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(2)])
        model.compile(optimizer="sgd", loss="mse")
        ck = ElasticCheckpoint(url, verbose=False, **opts)
        saved = {"batches": [], "epochs": []}  # ck's last saved step after each batch / epoch

        class Probe(tf.keras.callbacks.Callback):  # runs after ck (it comes later in the list)
            def on_train_batch_end(self, batch, logs=None):
                saved["batches"].append(ck.ck.last_saved_step)

            def on_epoch_end(self, epoch, logs=None):
                saved["epochs"].append(ck.ck.last_saved_step)

        x, y = np.ones((32, 4), "float32"), np.zeros((32, 2), "float32")
        model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False, callbacks=[ck, Probe()])
        saved["committed"] = Checkpointer(url, memory=False).steps()
        print("SAVED", json.dumps(saved), flush=True)
""")


def test_elastic_checkpoint_every_epochs_and_every_s_pick_the_saved_steps(tmp_path):
    """3 epochs of 4 batches (steps 1..12) in a real Keras fit(), once per setting."""
    require("tensorflow")
    configs = [{"every_epochs": 2},
               {"every_s": 1e-9},  # always due: every step is saved as it ends
               {"every_s": 1e9}]  # never due within the run: only the final save
    script = tmp_path / "keras_fit.py"
    script.write_text(KERAS_FIT)
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2",
           "ELASTIC_CKPT_MEMORY_DIR": str(tmp_path / "shm")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ELASTIC_GENERATION"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "ck"), json.dumps(configs)],
                         capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    epochs2, always, never = [json.loads(line.split("SAVED", 1)[1]) for line in res.stdout.splitlines()
                              if line.startswith("SAVED")]

    assert epochs2["batches"] == [None] * 8 + [8] * 4  # no mid-epoch saves
    assert epochs2["epochs"] == [None, 8, 8]  # at the end of epoch 2 (step 8), not of 1 or 3
    assert epochs2["committed"] == [8, 12]  # and the final save when fit() ends

    assert always["batches"] == list(range(1, 13))
    assert always["epochs"] == [4, 8, 12]
    assert never["batches"] == [None] * 12 and never["epochs"] == [None] * 3  # every_s alone: no epoch saves
    assert always["committed"][-1] == never["committed"][-1] == 12
