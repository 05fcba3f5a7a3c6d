"""A small userspace TCP forwarder that delays every byte by ``delay_s`` (this kernel has no
netem): each chunk read from one side is written to the other ``delay_s`` after it arrived,
in order, per direction. Runs inside a host through ``Cluster.spawn``:

    python -m benchmarks.chaos.proxy --listen ADDR:PORT --upstream ADDR:PORT --delay-s S

or from Python: ``DelayProxy(cluster, "h2", "10.213.7.12:29500", "10.213.7.11:29400", 0.05)``
(a context manager; ``start()`` waits until it listens). Point a client at the listen address
to see the upstream with the delay added (each way).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

__all__ = ["DelayProxy", "serve"]

READY = "DELAYPROXY LISTENING"


def _split(hostport: str) -> tuple:
    host, _, port = hostport.rpartition(":")
    return host, int(port)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        while True:
            data = await reader.read(65536)
            await queue.put((time.monotonic() + delay_s, data))
            if not data:
                return

    async def write() -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(read(), write())
    except (ConnectionError, OSError):
        pass


async def _handle(client_r, client_w, upstream: tuple, delay_s: float) -> None:
    try:
        up_r, up_w = await asyncio.open_connection(*upstream)
    except OSError:
        client_w.close()
        return
    try:
        await asyncio.gather(_pump(client_r, up_w, delay_s), _pump(up_r, client_w, delay_s))
    finally:
        for w in (up_w, client_w):
            w.close()


async def serve(listen: str, upstream: str, delay_s: float) -> None:
    up = _split(upstream)
    server = await asyncio.start_server(lambda r, w: _handle(r, w, up, delay_s), *_split(listen),
                                        reuse_address=True)
    print(READY, flush=True)
    async with server:
        await server.serve_forever()


class DelayProxy:
    """The forwarder as a process on host ``listen_host`` of ``cluster``."""

    def __init__(self, cluster, listen_host: str, listen_addr: str, upstream_addr: str, delay_s: float) -> None:
        self.cluster, self.host = cluster, listen_host
        self.listen_addr, self.upstream_addr, self.delay_s = listen_addr, upstream_addr, float(delay_s)
        self.proc: Optional[subprocess.Popen] = None
        self.log = Path(cluster.workdir) / f"proxy-{listen_host}-{listen_addr.replace(':', '_')}.log"

    def start(self, timeout_s: float = 20.0) -> "DelayProxy":
        repo = str(Path(__file__).resolve().parents[2])
        env = {"PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p),
               "PYTHONUNBUFFERED": "1"}
        self.proc = self.cluster.spawn(self.host, [sys.executable, "-m", "benchmarks.chaos.proxy", "--listen",
                                                   self.listen_addr, "--upstream", self.upstream_addr,
                                                   "--delay-s", str(self.delay_s)], env=env, log_path=self.log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.log.exists() and READY in self.log.read_text(errors="replace"):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        text = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        self.stop()
        raise RuntimeError(f"delay proxy on {self.host} did not start:\n{text}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "DelayProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="ADDR:PORT to listen on")
    p.add_argument("--upstream", required=True, help="ADDR:PORT to forward to")
    p.add_argument("--delay-s", type=float, required=True, help="added delay each way, seconds")
    args = p.parse_args(argv)
    try:
        asyncio.run(serve(args.listen, args.upstream, args.delay_s))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
