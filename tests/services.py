"""Real servers for tests: an etcd v3 server and an S3 endpoint (moto), each on a free
loopback port, started as separate processes and stopped with the fixture that owns them."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import List, Optional

from elastic import net as _net

__all__ = ["free_port", "EtcdServer", "S3Server"]


def free_port() -> int:
    """A free port on loopback."""
    return _net.free_port("127.0.0.1")


def _wait_http(url: str, proc: subprocess.Popen, log_path: str, timeout_s: float, context=None) -> None:
    """Ready when ``url`` answers below 500 (``context``: an ``ssl.SSLContext`` for https)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url}: server not ready after {timeout_s}s:\n{_tail(log_path)}")


def _tail(path: str, n: int = 3000) -> str:
    with open(path, "rb") as f:
        return f.read()[-n:].decode("utf-8", "replace")


class _Server:
    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.tmp = tempfile.mkdtemp(prefix=f"{type(self).__name__.lower()}-")
        self.log_path = os.path.join(self.tmp, "server.log")

    def _spawn(self, argv: List[str], env: Optional[dict] = None) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env={**os.environ, **(env or {})})

    def stop(self) -> None:
        """Kill the server (SIGKILL: tests use this to simulate a dead service too)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EtcdServer(_Server):
    """A single-member etcd v3 cluster with a temporary data dir; ``endpoint`` is host:port.

    ``tls`` (a ``tls_certs.TlsFiles``): serve the client port over TLS with that certificate;
    ``client_cert_auth``: also require client certificates signed by ``tls.ca``
    (``--client-cert-auth --trusted-ca-file``)."""

    def __init__(self, tls=None, client_cert_auth: bool = False) -> None:
        if client_cert_auth and tls is None:
            raise ValueError("client_cert_auth needs tls")
        self.tls = tls
        self.client_cert_auth = client_cert_auth
        super().__init__()
        self.port = free_port()
        self.peer_port = free_port()
        self.host = "127.0.0.1"
        self.start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        etcd = shutil.which("etcd") or "/usr/bin/etcd"
        client = f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"
        peer = f"http://{self.host}:{self.peer_port}"
        tls_args: List[str] = []
        if self.tls is not None:
            tls_args = ["--cert-file", self.tls.cert, "--key-file", self.tls.key]
            if self.client_cert_auth:
                tls_args += ["--client-cert-auth", "--trusted-ca-file", self.tls.ca]
        self._spawn([
            etcd, "--name", "test", "--data-dir", os.path.join(self.tmp, "data"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}", "--initial-cluster-state", "new",
            "--log-level", "warn", *tls_args,
        ])
        if self.tls is None:
            _wait_http(f"{client}/health", self.proc, self.log_path, timeout_s=30)
        else:
            self._wait_tls(timeout_s=30)

    def _wait_tls(self, timeout_s: float) -> None:
        """Ready when /health answers over TLS (with the client certificate when required)."""
        import ssl

        ctx = ssl.create_default_context(cafile=self.tls.ca)
        if self.client_cert_auth:
            ctx.load_cert_chain(self.tls.cert, self.tls.key)
        _wait_http(f"https://{self.host}:{self.port}/health", self.proc, self.log_path, timeout_s, context=ctx)

    def client(self):
        import pyetcd

        return pyetcd.client(host=self.host, port=self.port)


class S3Server(_Server):
    """A real S3 HTTP endpoint (moto server) on loopback; talk to it with s3fs or boto3."""

    key = "testing"
    secret = "testing"

    def __init__(self) -> None:
        super().__init__()
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
        self._spawn([moto, "-H", "127.0.0.1", "-p", str(self.port)])
        _wait_http(f"{self.endpoint_url}/moto-api/", self.proc, self.log_path, timeout_s=60)

    @property
    def storage_options(self) -> dict:
        """What to pass to fsspec/s3fs so it talks to this endpoint."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": "us-east-1"},
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def new_bucket(self, name: str) -> str:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                     aws_secret_access_key=self.secret, region_name="us-east-1").create_bucket(Bucket=name)
        return name
