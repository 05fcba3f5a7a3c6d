"""A node cut off from the store by a partition comes back on its own once the network heals.

Three agents on loopback, ``--nnodes 2:3``; the embedded server runs in the first one; the third
reaches it through a small TCP forwarder (:class:`Cuttable`) that the test cuts (new connections
are accepted and never answered, live ones stop carrying bytes: a blackhole, as a real partition
looks to the client) and heals (the connections held meanwhile are dropped, as after a long
partition). While cut, the third node's lease expires: the survivors re-form at world size 2, and
the cut node fences its old workers (frozen before the survivors' round exists, so no step or
checkpoint of the round that is gone is published after it). After the heal their round is gone:
they are killed, the node takes a new lease and joins as a newcomer: the job runs at world size 3
again, no restart charged, no agent exited.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Callable, List

from services import free_port

from paths import ELASTIC_RUN, REPO

# The workers: no framework, no collective (on loopback the cut node's workers would still reach
# their peers directly; a real partition cuts those too). Each appends one line per step to a file
# every worker of the job shares (O_APPEND: the file's order is the order the steps happened in).
WORKER = r"""
import os, sys, time
steps, finish = sys.argv[1], sys.argv[2]
env = os.environ
node, gen, world = env["ELASTIC_NODE_ID"], env["ELASTIC_GENERATION"], env["WORLD_SIZE"]
print(f"WORKER node={node} gen={gen} world={world} rank={env['RANK']} "
      f"restart={env['TORCHELASTIC_RESTART_COUNT']} pid={os.getpid()}", flush=True)
fd = os.open(steps, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
step = 0
while not os.path.exists(finish):
    os.write(fd, f"{node} {gen} {world} {step} {os.getpid()}\n".encode())
    step += 1
    time.sleep(0.05)
"""


class Cuttable:
    """A loopback TCP forwarder to ``127.0.0.1:target`` that a test can cut and heal."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._cut = False
        self._closed = False
        self._live: List[socket.socket] = []  # both ends of every forwarded connection
        self._held: List[socket.socket] = []  # accepted during a cut, or alive when it began
        threading.Thread(target=self._accept, name="cuttable-accept", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """From now on nothing passes: bytes in flight are dropped, new clients get no answer."""
        with self._lock:
            self._cut = True
            self._held.extend(self._live)
            self._live = []

    def heal(self) -> None:
        """Forward again; what was open during the cut is dropped (its peers see a reset)."""
        with self._lock:
            self._cut = False
            held, self._held = self._held, []
        for sock in held:
            _close(sock)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks = self._live + self._held
            self._live, self._held = [], []
        _close(self._listener)
        for sock in socks:
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    _close(client)
                    return
                if self._cut:
                    self._held.append(client)
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                pair = [client, upstream]
                if self._cut:
                    self._held.extend(pair)
                    continue
                self._live.extend(pair)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst, pair), daemon=True).start()

    def _forwarding(self, pair: List[socket.socket]) -> bool:
        with self._lock:
            return not self._cut and pair[0] in self._live

    def _pump(self, src: socket.socket, dst: socket.socket, pair: List[socket.socket]) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if not self._forwarding(pair):
                continue  # cut: the bytes are lost
            try:
                dst.sendall(data)
            except OSError:
                break
        with self._lock:
            if not any(s in self._held for s in pair):
                self._live = [s for s in self._live if s not in pair]
                done = True
            else:
                done = False  # held by a cut: heal() drops it
        if done:
            for sock in pair:
                _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def _worker_lines(output: str) -> List[dict]:
    return [dict(kv.split("=", 1) for kv in line.split("WORKER ", 1)[1].split())
            for line in output.splitlines() if "WORKER node=" in line]


def _wait_until(done: Callable[[], bool], timeout_s: float, what: str) -> None:
    """A hard deadline for a condition, not a timing: the test fails only if it never holds."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"waited {timeout_s}s for {what}"
        time.sleep(0.05)


def _state(pid: int) -> str:
    """The process's state letter (``T``: stopped), or ``gone`` once it has exited."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return "gone"
    return "gone" if state in ("Z", "X") else state


def test_a_partitioned_node_is_fenced_and_rejoins_after_the_heal(procs, tmp_path):
    script = tmp_path / "steps_worker.py"
    script.write_text(WORKER)
    steps, finish = tmp_path / "steps.log", tmp_path / "finish"
    port = free_port()
    forwarder = Cuttable(port)
    # lease_ttl=2: a node is dead 2 s after its last renewal; read_timeout=3 bounds each request
    # the cut node makes into the blackhole; store_timeout=300: the cut node keeps trying for
    # that long (the test heals well before).
    conf = "last_call_timeout=1,lease_ttl=2,join_timeout=120,read_timeout=3,store_timeout=300"

    def agent(name: str, endpoint: str, host: bool) -> None:
        procs.start(name, [ELASTIC_RUN, "--nnodes", "2:3", "--nproc-per-node", "1", "--max-restarts", "0",
                           "--rdzv-endpoint", endpoint, "--rdzv-id", "partition",
                           "--rdzv-conf", f"{conf},is_host={'true' if host else 'false'}",
                           str(script), str(steps), str(finish)])

    try:
        agent("a0", f"127.0.0.1:{port}", host=True)
        procs.wait_for_output("a0", "listening", timeout_s=60)
        agent("a1", f"127.0.0.1:{port}", host=False)
        agent("cut", forwarder.endpoint, host=False)
        for name in ("a0", "a1", "cut"):
            procs.wait_for_output(name, "world size 3", timeout_s=120)
            procs.wait_for_output(name, "WORKER node=", timeout_s=120)
        before = {name: len(procs.output(name)) for name in ("a0", "a1", "cut")}
        (old,) = [w for w in _worker_lines(procs.output("cut")) if w["world"] == "3"]

        forwarder.cut()
        # The survivors re-form without the cut node; the cut node fences its workers.
        for name in ("a0", "a1"):
            procs.wait_for_output(name, "world size 2", timeout_s=120, after=before[name])
            procs.wait_for_output(name, "WORKER node=", timeout_s=120, after=before[name])
        procs.wait_for_output("cut", "fenced", timeout_s=120, after=before["cut"])
        # Fenced: frozen until the store answers (then killed, as its round is gone).
        _wait_until(lambda: _state(int(old["pid"])) in ("T", "t"), 30, "the cut node's old worker to stop")
        assert procs["cut"].poll() is None, procs.output("cut")[-3000:]
        two = [w for w in _worker_lines(procs.output("a0")[before["a0"]:]) if w["world"] == "2"]
        gen2 = int(two[0]["gen"])
        assert gen2 > int(old["gen"])
        healed = {name: len(procs.output(name)) for name in ("a0", "a1", "cut")}

        forwarder.heal()
        _wait_until(lambda: _state(int(old["pid"])) == "gone", 120, "the fenced worker to be killed")
        # The cut node takes a new lease and joins as a newcomer: world size 3 again.
        for name in ("a0", "a1", "cut"):
            procs.wait_for_output(name, "world size 3", timeout_s=120, after=healed[name])
        for name in ("a0", "a1", "cut"):
            procs.wait_for_output(name, "WORKER node=", timeout_s=120,
                                  after=procs.output(name).index("world size 3", healed[name]))
        assert procs["cut"].poll() is None, procs.output("cut")[-3000:]
        finish.write_text("")
        results = procs.wait(timeout_s=120)
    finally:
        forwarder.close()

    outs = {name: r.output for name, r in results.items()}
    for out in outs.values():
        assert "restart 1/0" not in out and "restart budget exhausted" not in out, out[-3000:]
        assert "error:" not in out, out[-3000:]
    final = [w for w in _worker_lines(outs["cut"][healed["cut"]:]) if w["world"] == "3"]
    assert final and all(w["restart"] == "0" for w in final), outs["cut"][-3000:]
    gens = {name: max(int(w["gen"]) for w in _worker_lines(out)) for name, out in outs.items()}
    assert len(set(gens.values())) == 1 and gens["cut"] > gen2, gens  # one round, the newest
    # The fence: once the survivors' round (gen2) stepped, no step of the cut node's old round did.
    lines = [line.split() for line in steps.read_text().splitlines() if line.strip()]
    first_new = next(i for i, (_, gen, *_rest) in enumerate(lines) if int(gen) == gen2)
    stale = [line for line in lines[first_new:] if line[4] == old["pid"]]
    assert not stale, stale[:5]
    # Two re-formations: one on the cut (world size 2), one on the heal (world size 3).
    worlds = [w["world"] for w in _worker_lines(outs["a0"])]
    assert worlds[0] == "3" and "2" in worlds and worlds[-1] == "3", worlds


def test_a_join_under_an_expired_lease_takes_a_new_one(any_store, run_id):
    """The join path replaces a lease that ended behind the node's back (the heartbeat may be
    first: either way one new lease, the alive key under it, and the epoch counts it)."""
    from elastic.rendezvous import NodeInfo, RendezvousHandler, RendezvousSettings

    settings = RendezvousSettings(run_id=run_id, min_nodes=1, max_nodes=1, lease_ttl_s=30.0)
    h = RendezvousHandler(any_store, settings, NodeInfo(node_id="a", host="127.0.0.1", nproc=1))
    try:
        old = h.lease
        any_store.revoke_lease(old)  # as the store does when the TTL passes during a partition
        rnd = h.next_round()
        assert rnd.node_ids == ("a",) and h.lease != old and h.lease_epoch == 1
        alive = any_store.get(f"/elastic/{run_id}/alive/a")
        assert alive is not None and alive.lease in (0, h.lease)  # etcd's client may not report it
    finally:
        h.leave()


class _Outage:
    """A real memory store that every node loses at once while ``down`` is set (each call waits
    for it to come back), and whose leases outlive that (as etcd's do across a restart): the
    handler is told a 1 s TTL, the store keeps leases for 60 s."""

    def __init__(self) -> None:
        from elastic.store import MemoryStore

        self.inner = MemoryStore()
        self.up = threading.Event()
        self.up.set()

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.up.wait()
            return method(*args, **kwargs)
        return call

    def grant_lease(self, ttl_s):
        self.up.wait()
        return self.inner.grant_lease(60.0)


def test_workers_frozen_by_a_store_outage_go_on_when_their_round_stands(tmp_path):
    """The fence freezes, it does not kill: when the store comes back with this node's lease and
    its round intact (an outage every node saw), the same workers go on, with no new round."""
    from elastic.agent import ElasticAgent, WorkerSpec
    from elastic.rendezvous import NodeInfo, RendezvousHandler, RendezvousSettings

    script = tmp_path / "steps_worker.py"
    script.write_text(WORKER)
    steps, finish = tmp_path / "steps.log", tmp_path / "finish"
    store = _Outage()
    settings = RendezvousSettings(run_id="outage", min_nodes=1, max_nodes=1, lease_ttl_s=1.0, last_call_s=0.0,
                                  join_timeout_s=60.0, store_timeout_s=300.0)
    handler = RendezvousHandler(store, settings, NodeInfo(node_id="n0", host="127.0.0.1", nproc=1))  # type: ignore[arg-type]
    spec = WorkerSpec(entrypoint=(str(script), str(steps), str(finish)), standby=False, cwd=str(tmp_path),
                      env={"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    agent = ElasticAgent(spec, handler)
    codes: List[int] = []
    runner = threading.Thread(target=lambda: codes.append(agent.run()), daemon=True)
    runner.start()
    try:
        _wait_until(lambda: steps.exists() and steps.read_text().count("\n") >= 3, 60, "the worker's first steps")
        pid = int(steps.read_text().splitlines()[0].split()[4])
        store.up.clear()  # the store is gone for everyone; the lease outlives the outage
        _wait_until(lambda: _state(pid) in ("T", "t"), 60, "the fence to freeze the worker")
        frozen_at = steps.read_text().count("\n")
        store.up.set()
        _wait_until(lambda: steps.read_text().count("\n") > frozen_at + 3, 60, "the worker to step again")
        assert _state(pid) not in ("T", "t", "gone")
        assert {line.split()[4] for line in steps.read_text().splitlines()} == {str(pid)}  # the same worker
        finish.write_text("")
        runner.join(60)
        assert codes == [0]
        assert {line.split()[1] for line in steps.read_text().splitlines()} == {"1"}  # no new round
        round_kv = store.inner.get("/elastic/outage/round")
        assert round_kv is not None and json.loads(round_kv.value)["generation"] == 1
    finally:
        store.up.set()
        finish.write_text("")
        runner.join(30)
        handler.close()
