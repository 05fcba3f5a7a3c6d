"""Real servers for tests: an etcd v3 server and an S3 endpoint (moto), each on a free
loopback port, and a Slurm cluster (munged, slurmctld, slurmd per node), started as separate
processes and stopped with the fixture that owns them."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import List, Optional

from elastic import net as _net

__all__ = ["free_port", "EtcdServer", "S3Server", "SlurmCluster"]


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


class SlurmCluster:
    """A real Slurm cluster on this machine (Debian's slurm-wlm and munge): a private munged,
    one slurmctld and ``nodes`` slurmd (``slurmd -N nK``), every node at 127.0.0.1 on its own
    port, everything (slurm.conf, munge key and socket, spool, state, logs) in one temp dir.

    ``env`` is what a client command needs (``SLURM_CONF``); :meth:`run` runs one (``sbatch``,
    ``scontrol``, ...). ``close()`` stops every daemon and the jobs' processes and removes the dir.
    """

    TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun")

    def __init__(self, nodes: int = 3, cpus: int = 2) -> None:
        self.tmp = tempfile.mkdtemp(prefix="slurm-")
        os.chmod(self.tmp, 0o755)  # job steps run as root, but srun/slurmstepd read the conf
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.procs: List[subprocess.Popen] = []
        self.ctld_port, self.node_ports = free_port(), [free_port() for _ in self.nodes]
        self.conf = os.path.join(self.tmp, "slurm.conf")
        self.munge_socket = os.path.join(self.tmp, "munge", "munge.socket")
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        try:
            self._munged()
            self._write_conf(cpus)
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", self.conf])
            self._wait(lambda: self._ok(["scontrol", "ping"]) and "UP" in self.run(["scontrol", "ping"]).stdout,
                       "slurmctld answering scontrol ping")
            for name in self.nodes:
                os.makedirs(os.path.join(self.tmp, "spool", name), exist_ok=True)
                self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", self.conf])
            self._wait(self._all_idle, f"nodes {','.join(self.nodes)} idle")
        except BaseException:
            self.close()
            raise

    # -- set-up -----------------------------------------------------------------------
    def _munged(self) -> None:
        mdir = os.path.join(self.tmp, "munge")
        os.makedirs(mdir, mode=0o700)
        key = os.path.join(mdir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", ["munged", "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={mdir}/munged.pid", f"--seed-file={mdir}/munged.seed",
                               f"--log-file={mdir}/munged.log"])
        self._wait(lambda: os.path.exists(self.munge_socket), "munged's socket")

    def _write_conf(self, cpus: int) -> None:
        t = self.tmp
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(t, sub), exist_ok=True)
        lines = [
            "ClusterName=elastic-test", f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={t}/state", f"SlurmdSpoolDir={t}/spool/%n",
            f"SlurmctldPidFile={t}/slurmctld.pid", f"SlurmdPidFile={t}/spool/slurmd-%n.pid",
            f"SlurmctldLogFile={t}/log/slurmctld.log", f"SlurmdLogFile={t}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill", "MailProg=/bin/true", "SelectType=select/linear", "MpiDefault=none",
            "ReturnToService=2", "SlurmdParameters=config_overrides", "SlurmdTimeout=300",
            "KillWait=30", "MinJobAge=600", "InactiveLimit=0", "Waittime=0",
        ]
        for name, port in zip(self.nodes, self.node_ports):
            lines.append(f"NodeName={name} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} Port={port} "
                         f"CPUs={cpus} RealMemory=1000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(self.conf, 0o644)

    def _spawn(self, name: str, argv: List[str]) -> None:
        log = open(os.path.join(self.tmp, "log", f"{name}.out") if os.path.isdir(os.path.join(self.tmp, "log"))
                   else os.path.join(self.tmp, f"{name}.out"), "ab")
        with log:
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               start_new_session=True, env=self.env))
        if self.procs[-1].poll() is not None:
            raise RuntimeError(f"{name} exited at once with {self.procs[-1].returncode}")

    def _wait(self, ready, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"slurm cluster: {dead[0].args[0]} exited with {dead[0].returncode} while "
                                   f"waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"slurm cluster: no {what} after {timeout_s}s:\n{self.logs()}")

    def _ok(self, argv: List[str]) -> bool:
        return self.run(argv, check=False).returncode == 0

    def _all_idle(self) -> bool:
        states = self.node_states()
        return len(states) == len(self.nodes) and all(s.upper().startswith("IDLE") for s in states.values())

    # -- use --------------------------------------------------------------------------
    def run(self, argv: List[str], check: bool = True, timeout_s: float = 30, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster (text output)."""
        res = subprocess.run(argv, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                             timeout=timeout_s, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")
        return res

    def node_states(self) -> dict:
        res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        return dict(line.split() for line in res.stdout.splitlines() if len(line.split()) == 2)

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, NodeList, Restarts, ExitCode, ...)."""
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        out = {}
        for item in res.stdout.split():
            key, sep, value = item.partition("=")
            if sep:
                out[key] = value
        return out

    def logs(self, n: int = 2000) -> str:
        parts = []
        for root, _, files in os.walk(self.tmp):
            for name in sorted(files):
                if name.endswith((".log", ".out")):
                    parts.append(f"--- {name} ---\n{_tail(os.path.join(root, name), n)}")
        return "\n".join(parts)

    def close(self) -> None:
        if os.path.exists(self.conf) and self.procs:
            self.run(["scancel", "--full", "--user", "root"], check=False)
        for proc in reversed(self.procs):  # slurmd's, then slurmctld, then munged
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)
        self.procs = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
