"""Time to form one rendezvous round of N simulated nodes: ours (embedded, etcd) vs torch c10d.

    python benchmarks/rendezvous.py [--quick] [--sizes 8,64,256,1024]

Each simulated node is a thread with its own handler and its own store connection, 32 to a
process; all nodes start joining at one "go" and the figure is the time until the
last node holds the closed round (MIN = MAX = N, so no last-call wait). For ours, joining
includes creating the handler (lease grant, liveness key). torch's side is its dynamic
rendezvous with the C10d backend over a TCPStore, as torchrun's ``--rdzv-backend c10d`` uses.
Ours is the median of ``--trials`` rounds; c10d runs once per size, and when it forms no
round within ``--c10d-timeout-s`` (here it formed none at 256 nodes in 10 minutes) its figure
is null and the speedup a lower bound (``speedup_is_lower_bound``). The last line is one JSON
object: ``embedded_s_<N>``, ``etcd_s_<N>``, ``c10d_s_<N>``, ``speedup_vs_c10d_256``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


# Simulated nodes are threads; more than a few dozen per process would measure the contention
# of their interpreter lock rather than the rendezvous. Every backend gets the same split.
_NODES_PER_PROCESS = 32


# -- one simulation process ----------------------------------------------------------------
def _join_ours(backend: str, endpoint: str, run_id: str, total: int, token: str):
    from elastic.rendezvous import NodeInfo, RendezvousHandler, RendezvousSettings
    from elastic.store import create_store

    conf = {"token": token} if backend == "embedded" else {}
    create_store(backend, endpoint, **conf).close()  # import and reach the backend before "go"
    settings = RendezvousSettings(run_id=run_id, min_nodes=total, max_nodes=total, last_call_s=0,
                                  lease_ttl_s=30, join_timeout_s=300)
    def join(i: int):
        # Each node has its own client, as on a real cluster (and as the c10d side does).
        store = create_store(backend, endpoint, **conf)
        handler = RendezvousHandler(store, settings, NodeInfo(f"n{os.getpid()}-{i}", "127.0.0.1", 1))
        rnd = handler.next_round(None)
        return handler, rnd.world_size
    return join


def _join_c10d(endpoint: str, run_id: str, total: int, timeout_s: float):
    from datetime import timedelta

    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (DynamicRendezvousHandler,
                                                                         RendezvousTimeout)

    host, port = endpoint.rsplit(":", 1)

    def join(i: int):
        # Each node has its own client, as on a real cluster (a shared one would serialise them).
        store = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
        handler = DynamicRendezvousHandler.from_backend(
            run_id, store, C10dRendezvousBackend(store, run_id), total, total, local_addr="127.0.0.1",
            timeout=RendezvousTimeout(join=timedelta(seconds=timeout_s), last_call=timedelta(seconds=0.01)))
        info = handler.next_rendezvous()
        return handler, info.world_size
    return join


def simulate(backend: str, endpoint: str, run_id: str, count: int, total: int, token: str,
             timeout_s: float) -> None:
    join = _join_c10d(endpoint, run_id, total, timeout_s) if backend == "c10d" else _join_ours(
        backend, endpoint, run_id, total, token)
    finish = [0.0] * count
    sizes = [0] * count
    keep = []

    def node(i: int) -> None:
        try:
            handler, size = join(i)
        except Exception as exc:  # e.g. c10d's RendezvousTimeoutError: no round within timeout_s
            print(f"node {i}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return
        finish[i] = time.time()
        sizes[i] = size
        keep.append(handler)

    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(count)]
    print("READY", flush=True)
    sys.stdin.readline()  # GO
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"finish": max(finish), "sizes": sorted(set(sizes))}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip orderly shutdown of hundreds of handlers


# -- the driver ----------------------------------------------------------------------------
def form_round(backend: str, endpoint: str, total: int, token: str = "",
               timeout_s: float = 600.0) -> Optional[float]:
    """Seconds until all ``total`` nodes hold the round; None if c10d formed none in time."""
    procs_n = -(-total // _NODES_PER_PROCESS)
    counts = [total // procs_n + (1 if i < total % procs_n else 0) for i in range(procs_n)]
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen([sys.executable, __file__, "--simulate", backend, endpoint, run_id, str(c),
                               str(total), token, str(timeout_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for c in counts]
    for p in procs:
        assert p.stdout.readline().strip() == "READY"
    go = time.time()
    for p in procs:
        p.stdin.write("GO\n")
        p.stdin.flush()
    results = []
    for p in procs:
        line = p.stdout.readline()
        p.wait(timeout=timeout_s + 60)
        results.append(json.loads(line))
    sizes = {s for r in results for s in r["sizes"]}
    if backend == "c10d" and 0 in sizes:
        print(f"  {backend:>8} {total:>5} nodes: no round within {timeout_s:.0f}s", file=sys.stderr, flush=True)
        return None
    print(f"  {backend:>8} {total:>5} nodes: {max(r['finish'] for r in results) - go:.3f}s", file=sys.stderr, flush=True)
    if sizes != {total}:
        raise RuntimeError(f"{backend}: nodes disagree on the world size: {sizes}")
    return max(r["finish"] for r in results) - go


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--simulate":
        backend, endpoint, run_id, count, total, token, timeout_s = sys.argv[2:9]
        simulate(backend, endpoint, run_id, int(count), int(total), token, float(timeout_s))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes; c10d and etcd only up to 64 nodes")
    p.add_argument("--sizes", default="")
    p.add_argument("--trials", type=int, default=3, help="rounds per size for ours (median reported)")
    p.add_argument("--c10d-timeout-s", type=float, default=300.0,
                   help="c10d's join timeout; no round by then is reported as a lower bound")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [8, 64, 256, 1024]
    c10d_max = 64 if args.quick else 256
    etcd_max = 64 if args.quick else 1024

    from elastic.store.embedded_server import EmbeddedServer
    from services import EtcdServer
    from torch.distributed import TCPStore

    figures = {}
    timed_out = []  # sizes at which c10d formed no round within --c10d-timeout-s
    token = uuid.uuid4().hex
    server = EmbeddedServer("127.0.0.1", 0, token=token).start()
    etcd = EtcdServer()
    tcp = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    print(f"{'nodes':>6} {'embedded s':>11} {'etcd s':>9} {'c10d s':>9}")
    try:
        for n in sizes:
            emb = statistics.median(form_round("embedded", server.endpoint, n, token)
                                    for _ in range(args.trials))
            et = statistics.median(form_round("etcd", etcd.endpoint, n)
                                   for _ in range(args.trials)) if n <= etcd_max else None
            c10d = form_round("c10d", f"127.0.0.1:{tcp.port}", n,
                              timeout_s=args.c10d_timeout_s) if n <= c10d_max else None
            if c10d is None and n <= c10d_max:
                timed_out.append(n)
            figures[f"embedded_s_{n}"] = round(emb, 4)
            figures[f"etcd_s_{n}"] = None if et is None else round(et, 4)
            figures[f"c10d_s_{n}"] = None if c10d is None else round(c10d, 4)
            fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"{n:>6} {emb:>11.3f} {fmt(et):>9} {fmt(c10d):>9}", flush=True)
    finally:
        server.stop()
        etcd.close()
    c10d_256, emb_256 = figures.get("c10d_s_256"), figures.get("embedded_s_256")
    if 256 in timed_out:  # c10d took longer than its timeout: the ratio is at least this
        c10d_256 = args.c10d_timeout_s
        figures["c10d_timeout_s"] = args.c10d_timeout_s
        figures["speedup_is_lower_bound"] = True
        print(f"c10d formed no 256-node round within {args.c10d_timeout_s:.0f} s: speedup is a lower bound")
    figures["speedup_vs_c10d_256"] = round(c10d_256 / emb_256, 1) if c10d_256 and emb_256 else None
    print(f"target: 1024 nodes <= 2 s embedded; >= 10x c10d at 256 "
          f"(got {figures.get('embedded_s_1024')} s; {figures['speedup_vs_c10d_256']}x)")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
