"""Micro-benchmark of the rendezvous store backends, side by side in one run.

Two figures per backend:
- ``ops_per_s``: sequential put+get round trips from one client (each counted as 2 ops).
- ``round_s_<N>``: N simulated nodes, each with its own client on its own thread, do what a
  node does to join a round (grant a lease, put its key, three gets, then wait on the
  round's "closed" key); the N-th arrival closes the round. Time from the first start to the
  last node seeing the close, connection set-up included.

The embedded server runs as its own ``elastic-rendezvous serve`` process (as on a real job),
etcd as the Debian etcd server. Usage: ``python benchmarks/rendezvous_store.py [--quick]``.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from elastic.store import create_store  # noqa: E402

TOKEN = "bench-token"


def ops_per_s(make_store, seconds: float) -> float:
    store = make_store()
    try:
        n = 0
        end = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < end:
            store.put(f"/bench/ops/{n % 100}", b"x" * 64)
            store.get(f"/bench/ops/{n % 100}")
            n += 1
        return 2 * n / (time.perf_counter() - start)
    finally:
        store.close()


def form_round(make_store, nodes: int, run: str) -> float:
    """Seconds for ``nodes`` simulated nodes to join one round and all see it close."""
    base = f"/bench/{run}/"
    arrived = [0]
    lock = threading.Lock()
    errors = []
    barrier = threading.Barrier(nodes + 1)
    done = threading.Barrier(nodes + 1)

    def node(i: int) -> None:
        try:
            barrier.wait()
            store = make_store()
            try:
                lease = store.grant_lease(30)
                store.put(f"{base}nodes/{i:05d}", b"alive", lease=lease)
                for _ in range(3):
                    store.get(f"{base}state")
                    store.get(f"{base}nodes/{i:05d}")
                _, rev = store.get_prefix(f"{base}closed")
                with lock:
                    arrived[0] += 1
                    last = arrived[0] == nodes
                if last:
                    store.put(f"{base}closed", b"1")
                while store.get(f"{base}closed") is None:
                    events = store.wait(f"{base}closed", rev, 30)
                    if events:
                        break
                store.revoke_lease(lease)
            finally:
                store.close()
        except Exception as exc:  # reported after the run
            errors.append(repr(exc))
        finally:
            done.wait()

    threads = [threading.Thread(target=node, args=(i,), daemon=True) for i in range(nodes)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    done.wait()
    elapsed = time.perf_counter() - start
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} nodes failed, first: {errors[0]}")
    return elapsed


def start_embedded():
    script = os.path.join(os.path.dirname(sys.executable), "elastic-rendezvous")
    argv = [script] if os.path.exists(script) else [sys.executable, "-m", "elastic.rendezvous_cli"]
    proc = subprocess.Popen(argv + ["serve", "--host", "127.0.0.1", "--port", "0", "--token", TOKEN,
                                    "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    line = proc.stdout.readline()
    port = int(re.search(r":(\d+)", line.split("listening on")[1]).group(1))
    return proc, f"127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter runs")
    args = parser.parse_args()
    sizes = [8, 64, 256] if args.quick else [8, 64, 256, 1024]
    seconds = 1.0 if args.quick else 3.0
    results = {}

    proc, endpoint = start_embedded()
    backends = {"embedded": lambda: create_store("embedded", endpoint, token=TOKEN)}
    etcd = None
    if shutil.which("etcd") or os.path.exists("/usr/bin/etcd"):
        try:
            import pyetcd  # noqa: F401
            from services import EtcdServer

            etcd = EtcdServer()
            backends["etcd"] = lambda: create_store("etcd", etcd.endpoint)
        except ImportError:
            pass
    try:
        rows = []
        for name, make in backends.items():
            row = {"backend": name, "ops_per_s": ops_per_s(make, seconds)}
            for n in sizes:
                if name == "etcd" and n > 256:
                    continue  # a thread per node with a gRPC channel each: too heavy here
                row[n] = form_round(make, n, f"{name}-{n}-{time.time_ns()}")
            rows.append(row)
    finally:
        proc.terminate()
        proc.wait(10)
        if etcd is not None:
            etcd.close()

    header = f"{'backend':<10} {'ops/s':>10} " + " ".join(f"{'round ' + str(n):>11}" for n in sizes)
    print(header)
    print("-" * len(header))
    for row in rows:
        cells = " ".join(f"{row[n]:>10.3f}s" if n in row else f"{'-':>11}" for n in sizes)
        print(f"{row['backend']:<10} {row['ops_per_s']:>10.0f} {cells}")
        results[f"{row['backend']}_ops_per_s"] = round(row["ops_per_s"], 1)
        for n in sizes:
            if n in row:
                results[f"{row['backend']}_round_s_{n}"] = round(row[n], 4)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
