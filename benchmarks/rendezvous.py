"""Time to form one rendezvous round of N simulated nodes: ours (embedded, etcd) vs torch c10d.

    python benchmarks/rendezvous.py [--quick] [--sizes 8,64,256,1024] [--trials 3]
                                    [--liveness-s 15] [--c10d-timeout-s 300]

Each simulated node is a thread with its own handler and its own store connection, 32 to a
process; all nodes start joining at one "go" and the figure is the time until the
last node holds the closed round (MIN = MAX = N, so no last-call wait). For ours, joining
includes creating the handler (lease grant, liveness key). torch's side is its dynamic
rendezvous with the C10d backend over a TCPStore, as torchrun's ``--rdzv-backend c10d`` uses.

Like with like: both sides get the same liveness setting (``--liveness-s``, default 15 s:
our lease TTL, renewed every third of it; c10d's keep-alive every ``liveness/3`` s with
``keep_alive_max_attempt`` 3, its defaults). Our protocol parses each round value once per
process (a memo in elastic/rendezvous/state.py shared by the threads of a process); a real
node is a process of its own, so each simulated node gets a memo of its own instead
(``embedded_s_<N>``, ``etcd_s_<N>``: no node profits from another's parse), and the embedded
side is also timed with the shared one (``embedded_shared_cache_s_<N>``, how this benchmark
measured before) to show what sharing is worth here.

Ours is the median of ``--trials`` rounds; c10d runs once per size. A node that fails prints
its exception (type and message); a c10d round that fails is reported with that exception
(``c10d_error_<N>``), and only when every failure was c10d's own timeout
(``RendezvousTimeoutError``) is its figure null and the speedup a lower bound
(``speedup_is_lower_bound``). The last line is one JSON object: ``embedded_s_<N>``,
``embedded_shared_cache_s_<N>``, ``etcd_s_<N>``, ``c10d_s_<N>`` for every size measured and
``speedup_vs_c10d_256``; ``--quick`` runs c10d and etcd only up to 64 nodes, so its speedup key
is ``speedup_vs_c10d_64`` and the larger sizes' etcd and c10d keys are absent.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import os
import subprocess
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


# Simulated nodes are threads; more than a few dozen per process would measure the contention
# of their interpreter lock rather than the rendezvous. Every backend gets the same split.
_NODES_PER_PROCESS = 32


# -- one simulation process ----------------------------------------------------------------
def _no_shared_parse_cache() -> None:
    """Each simulated node keeps its own memo of parsed round values, as a node that is a
    process of its own does, instead of the one memo that elastic/rendezvous/state.py keeps
    per process (``_parse_round`` is a ``functools.wraps`` wrapper whose ``__wrapped__`` is
    the plain function): a node still parses a value once, but no node profits from
    another's parse."""
    import functools

    from elastic.rendezvous import state

    local = threading.local()

    def per_node(name, func):
        def wrapper(value):
            cached = getattr(local, name, None)
            if cached is None:
                cached = functools.lru_cache(maxsize=8)(func)
                setattr(local, name, cached)
            return cached(value)
        return wrapper

    state._parse_round = per_node("_parse_round", state._parse_round.__wrapped__)


def _join_ours(backend: str, endpoint: str, run_id: str, total: int, token: str, liveness_s: float):
    from elastic.rendezvous import NodeInfo, RendezvousHandler, RendezvousSettings
    from elastic.store import create_store

    conf = {"token": token} if backend == "embedded" else {}
    create_store(backend, endpoint, **conf).close()  # import and reach the backend before "go"
    settings = RendezvousSettings(run_id=run_id, min_nodes=total, max_nodes=total, last_call_s=0,
                                  lease_ttl_s=liveness_s, join_timeout_s=300)

    def join(i: int):
        # Each node has its own client, as on a real cluster (and as the c10d side does).
        store = create_store(backend, endpoint, **conf)
        handler = RendezvousHandler(store, settings, NodeInfo(f"n{os.getpid()}-{i}", "127.0.0.1", 1))
        try:
            rnd = handler.next_round(None)
        except BaseException:
            # As an agent that exits: its lease goes, and with it its join and coordinator
            # keys (a failed thread whose heartbeat kept its lease alive would keep holding
            # the coordinator key, and every other node would wait for it until its timeout).
            handler.leave()
            raise
        return handler, rnd.world_size
    return join


def _join_c10d(endpoint: str, run_id: str, total: int, timeout_s: float, liveness_s: float):
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
            timeout=RendezvousTimeout(join=timedelta(seconds=timeout_s), last_call=timedelta(seconds=0.01)),
            keep_alive_interval=max(1, round(liveness_s / 3)), keep_alive_max_attempt=3)
        info = handler.next_rendezvous()
        return handler, info.world_size
    return join


def simulate(backend: str, endpoint: str, run_id: str, count: int, total: int, token: str,
             timeout_s: float, liveness_s: float, shared_cache: bool) -> None:
    if not shared_cache:
        _no_shared_parse_cache()
    join = _join_c10d(endpoint, run_id, total, timeout_s, liveness_s) if backend == "c10d" else _join_ours(
        backend, endpoint, run_id, total, token, liveness_s)
    finish = [0.0] * count
    sizes = [0] * count
    errors = []
    keep = []

    def node(i: int) -> None:
        try:
            handler, size = join(i)
        except Exception as exc:  # e.g. c10d's RendezvousTimeoutError: no round within timeout_s
            text = " ".join(str(exc).split())[:300]
            errors.append(f"{type(exc).__name__}: {text}")
            print(f"node {i}: {type(exc).__name__}: {text}", file=sys.stderr, flush=True)
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
    print(json.dumps({"finish": max(finish), "sizes": sorted(set(sizes)), "errors": errors}), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip orderly shutdown of hundreds of handlers


# -- the driver ----------------------------------------------------------------------------
class RoundFailed(RuntimeError):
    """Some simulated nodes did not get the round; ``errors`` counts their exceptions."""

    def __init__(self, backend: str, total: int, sizes: set, errors: "collections.Counter") -> None:
        self.errors = errors
        self.timeout_only = bool(errors) and all(e.startswith("RendezvousTimeoutError") for e in errors)
        listed = "; ".join(f"{n} x {e}" for e, n in errors.most_common(3))
        super().__init__(f"{backend}, {total} nodes: {sum(errors.values())} node(s) failed "
                         f"(world sizes seen {sorted(sizes)}): {listed}")


def form_round(backend: str, endpoint: str, total: int, token: str = "", timeout_s: float = 600.0,
               liveness_s: float = 15.0, shared_cache: bool = False) -> float:
    """Seconds until all ``total`` nodes hold the round; raises :class:`RoundFailed` otherwise."""
    procs_n = -(-total // _NODES_PER_PROCESS)
    counts = [total // procs_n + (1 if i < total % procs_n else 0) for i in range(procs_n)]
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen([sys.executable, __file__, "--simulate", backend, endpoint, run_id, str(c),
                               str(total), token, str(timeout_s), str(liveness_s), str(int(shared_cache))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
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
    errors = collections.Counter(e for r in results for e in r["errors"])
    label = backend + (" (shared parse cache)" if shared_cache else "")
    if errors or sizes != {total}:
        print(f"  {label:>8} {total:>5} nodes: FAILED, {sum(errors.values())} node error(s): "
              + "; ".join(f"{n} x {e}" for e, n in errors.most_common(3)), file=sys.stderr, flush=True)
        raise RoundFailed(backend, total, sizes, errors)
    took = max(r["finish"] for r in results) - go
    print(f"  {label:>8} {total:>5} nodes: {took:.3f}s", file=sys.stderr, flush=True)
    return took


def _versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import importlib.metadata as md

        out["etcd-sdk-python"] = md.version("etcd-sdk-python")
    except Exception:
        out["etcd-sdk-python"] = None
    try:
        import shutil

        etcd = shutil.which("etcd") or "/usr/bin/etcd"
        first = subprocess.run([etcd, "--version"], capture_output=True, text=True).stdout.splitlines()
        out["etcd"] = first[0].split(":", 1)[-1].strip() if first else None
    except Exception:
        out["etcd"] = None
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--simulate":
        backend, endpoint, run_id, count, total, token, timeout_s, liveness_s, shared = sys.argv[2:11]
        simulate(backend, endpoint, run_id, int(count), int(total), token, float(timeout_s),
                 float(liveness_s), shared == "1")
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="c10d and etcd only up to 64 nodes")
    p.add_argument("--sizes", default="")
    p.add_argument("--trials", type=int, default=3, help="rounds per size for ours (median reported)")
    p.add_argument("--liveness-s", type=float, default=15.0,
                   help="ours: lease TTL; c10d: keep-alive interval (this / 3) x 3 attempts")
    p.add_argument("--c10d-timeout-s", type=float, default=300.0,
                   help="c10d's join timeout; no round by then is reported as a lower bound")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [8, 64, 256, 1024]
    c10d_max = 64 if args.quick else 256
    etcd_max = 64 if args.quick else 1024
    liveness = args.liveness_s
    if round(liveness / 3) * 3 != liveness:
        p.error("--liveness-s must be a multiple of 3 (c10d's keep-alive interval is whole seconds)")

    from elastic.store.embedded_server import EmbeddedServer
    from services import EtcdServer
    from torch.distributed import TCPStore

    versions = _versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"settings: MIN = MAX = N, no last call; liveness {liveness:g} s on both sides (ours: "
          f"lease TTL {liveness:g} s renewed every {liveness / 3:g} s; c10d: keep_alive_interval "
          f"{liveness / 3:g} s x keep_alive_max_attempt 3); join timeout: ours 300 s, c10d "
          f"{args.c10d_timeout_s:g} s; {_NODES_PER_PROCESS} nodes per process, each with its own "
          f"store client; ours: median of {args.trials} trials, c10d: 1; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")

    figures = {}
    timed_out = []  # sizes at which c10d formed no round within --c10d-timeout-s
    failed = {}
    token = uuid.uuid4().hex
    server = EmbeddedServer("127.0.0.1", 0, token=token).start()
    etcd = EtcdServer()
    tcp = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    def median_of(backend, endpoint, n, **kw):
        try:
            return statistics.median(form_round(backend, endpoint, n, liveness_s=liveness, **kw)
                                     for _ in range(args.trials))
        except RoundFailed as exc:
            failed[f"{backend}{'_shared_cache' if kw.get('shared_cache') else ''}_{n}"] = str(exc)
            return None

    print(f"{'nodes':>6} {'embedded s':>11} {'(shared cache)':>15} {'etcd s':>9} {'c10d s':>9}")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    try:
        for n in sizes:
            emb = median_of("embedded", server.endpoint, n, token=token)
            emb_shared = median_of("embedded", server.endpoint, n, token=token, shared_cache=True)
            et = median_of("etcd", etcd.endpoint, n) if n <= etcd_max else None
            c10d = None
            if n <= c10d_max:
                try:
                    c10d = form_round("c10d", f"127.0.0.1:{tcp.port}", n, timeout_s=args.c10d_timeout_s,
                                      liveness_s=liveness)
                except RoundFailed as exc:
                    if exc.timeout_only:
                        timed_out.append(n)
                    figures[f"c10d_error_{n}"] = exc.errors.most_common(1)[0][0]
            figures[f"embedded_s_{n}"] = None if emb is None else round(emb, 4)
            figures[f"embedded_shared_cache_s_{n}"] = None if emb_shared is None else round(emb_shared, 4)
            if n <= etcd_max:
                figures[f"etcd_s_{n}"] = None if et is None else round(et, 4)
            if n <= c10d_max:
                figures[f"c10d_s_{n}"] = None if c10d is None else round(c10d, 4)
            print(f"{n:>6} {fmt(emb):>11} {fmt(emb_shared):>15} {fmt(et):>9} {fmt(c10d):>9}", flush=True)
    finally:
        server.stop()
        etcd.close()
    for what, why in failed.items():
        print(f"FAILED {what}: {why}")
    for n in timed_out:
        print(f"c10d formed no {n}-node round within {args.c10d_timeout_s:.0f} s "
              f"({figures[f'c10d_error_{n}']})")
    ref = 256 if 256 in sizes and 256 <= c10d_max else max((n for n in sizes if n <= c10d_max), default=None)
    if ref is not None:
        c10d_ref, emb_ref = figures.get(f"c10d_s_{ref}"), figures.get(f"embedded_s_{ref}")
        if ref in timed_out:  # c10d took longer than its timeout: the ratio is at least this
            c10d_ref = args.c10d_timeout_s
            figures["c10d_timeout_s"] = args.c10d_timeout_s
            figures["speedup_is_lower_bound"] = True
        figures[f"speedup_vs_c10d_{ref}"] = round(c10d_ref / emb_ref, 1) if c10d_ref and emb_ref else None
        speed = f"{figures[f'speedup_vs_c10d_{ref}']}x c10d at {ref}"
    else:
        speed = "c10d not run"
    print(f"target: 1024 nodes <= 2 s embedded; >= 10x c10d at 256 "
          f"(got {figures.get('embedded_s_1024')} s; {speed})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
