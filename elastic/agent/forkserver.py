"""A fork server: one warm interpreter per node that has imported the framework and forks a
worker on demand, in milliseconds, from the first second of the job.

Warm standbys (one interpreter per local worker, refilled after each use) are slow exactly
when failures are most common: at the start of a job, and right after a replacement, they are
still importing the framework while the workers compete for the same cores. The fork server
imports once per node; every worker, first start or replacement, is a ``fork()`` of it.

Fork safety: the server runs one Python thread (a select loop; SIGCHLD wakes it) and never
initialises CUDA, so a child inherits no lock held by a Python thread and no device context:
the state torch supports forking from (its DataLoader forks its workers so). Only frameworks
that are fork-safe after import are preloaded here (PyTorch, Horovod's PyTorch half, which
starts nothing before ``hvd.init()``); TensorFlow (gRPC and its own threads at import) keeps
the warm standbys.

Protocol (a Unix socket, one connection per worker): the agent sends one JSON line, the run
spec, with the worker's stdout and stderr pipe ends attached (``SCM_RIGHTS``); the server
forks, answers ``{"pid": N}``, and once that child exits, ``{"returncode": R}`` (negative for
a signal, as :class:`subprocess.Popen`), then closes the connection.

    python -m elastic.agent._runner --fork-server SOCKET_PATH [--preload torch,...]
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Mapping, Optional

__all__ = ["ForkServer", "ForkedProcess", "FORK_SAFE_PRELOADS"]

# What may be imported before fork(): these start no threads of their own at import.
FORK_SAFE_PRELOADS = frozenset({"torch", "horovod.torch"})
_MAX_SPEC = 16 << 20


class ForkedProcess:
    """A worker forked by the fork server, with the part of :class:`subprocess.Popen` the
    agent uses (``pid``, ``poll``, ``wait``, ``returncode``, ``stdout``, ``stderr``)."""

    def __init__(self, conn: socket.socket, pid: int, stdout, stderr, argv: List[str]) -> None:
        self._conn = conn
        self._buf = b""
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.args = argv
        self.returncode: Optional[int] = None

    def _read(self, timeout: Optional[float]) -> None:
        if b"\n" not in self._buf:  # the exit may have come with the pid already
            self._conn.settimeout(timeout)
            try:
                data = self._conn.recv(4096)
            except (socket.timeout, BlockingIOError):
                return
            except OSError:
                data = b""
            if not data:  # the server is gone, and its children with it (PDEATHSIG)
                self.returncode = -signal.SIGKILL
            self._buf += data
        if b"\n" in self._buf:
            self.returncode = int(json.loads(self._buf.split(b"\n", 1)[0])["returncode"])
        if self.returncode is not None:
            self._conn.close()

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self._read(0.0)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and left is not None and left <= 0:  # left is set only with a timeout
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read(left)
        return self.returncode


class ForkServer:
    """The agent's side: start the server, hand out workers, stop it.

    Same interface as the standby pool: :meth:`take` starts a worker at once,
    :meth:`wait_warm` waits for the imports, :meth:`close` ends the server.
    """

    def __init__(self, python: str, preload: List[str], env: Mapping[str, str], cwd: Optional[str]) -> None:
        self._dir = tempfile.mkdtemp(prefix="elastic-fork-")
        self.path = os.path.join(self._dir, "sock")
        argv = [python, "-m", "elastic.agent._runner", "--fork-server", self.path]
        if preload:
            argv += ["--preload", ",".join(preload)]
        self._proc = subprocess.Popen(argv, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL,
                                      start_new_session=True)

    def wait_warm(self, timeout_s: float) -> bool:
        """Block until the server has imported its preloads and listens (or it died)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if os.path.exists(self.path + ".ready"):
                return True
            if self._proc.poll() is not None:
                return False
            time.sleep(0.02)
        return False

    def take(self, argv: List[str], module: bool, env: Mapping[str, str], cwd: str,
             cpus=None) -> ForkedProcess:
        """Fork one worker running ``argv`` (a module with ``module``) in ``env`` and ``cwd``."""
        if not self.wait_warm(600.0):
            raise OSError(f"the fork server exited with code {self._proc.returncode}")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            spec = {"argv": list(argv), "module": module, "env": dict(env), "cwd": cwd,
                    "cpus": sorted(cpus) if cpus else None}
            socket.send_fds(conn, [json.dumps(spec).encode() + b"\n"], [out_w, err_w])
            buf = b""
            while b"\n" not in buf:
                chunk = conn.recv(4096)
                if not chunk:
                    raise OSError("the fork server closed the connection")
                buf += chunk
        except BaseException:
            conn.close()
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        line, rest = buf.split(b"\n", 1)
        proc = ForkedProcess(conn, int(json.loads(line)["pid"]), os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb"),
                             list(argv))
        proc._buf = rest
        return proc

    def close(self) -> None:
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        for name in (self.path, self.path + ".ready"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass


# -- the server --------------------------------------------------------------------------
def _child(spec: dict, fds: List[int], listener: socket.socket, conns: List[socket.socket],
           wake: List[int]) -> None:
    """In the forked child: become the worker and never return."""
    code = 1
    try:
        listener.close()
        for c in conns:
            c.close()
        signal.set_wakeup_fd(-1)
        for fd in wake:
            os.close(fd)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        from ._runner import _die_with_parent, _run

        _die_with_parent()  # the server, which dies with the agent
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        if spec.get("cpus"):
            os.sched_setaffinity(0, spec["cpus"])
        os.environ.clear()
        os.environ.update(spec["env"])
        os.chdir(spec["cwd"])
        import random

        random.seed()  # a fresh interpreter's seed, not the server's
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        code = _run(spec["argv"], bool(spec.get("module")))
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve(path: str, preload: List[str]) -> int:
    from ._runner import warm_import

    warm_import(preload)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the select through the wakeup fd
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    children: Dict[int, socket.socket] = {}
    open(path + ".ready", "w").close()
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "wake":
                os.read(wake_r, 4096)
            elif key.data == "accept":
                conn, _ = listener.accept()
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, _MAX_SPEC, 2)
                    while not msg.endswith(b"\n"):
                        more = conn.recv(_MAX_SPEC)
                        if not more:
                            raise OSError("connection closed mid-spec")
                        msg += more
                    spec = json.loads(msg)
                except (OSError, ValueError) as exc:
                    print(f"elastic fork server: bad request: {exc}", file=sys.stderr, flush=True)
                    conn.close()
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(spec, fds, listener, list(children.values()) + [conn], [wake_r, wake_w])
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        while children:  # reap every child that exited; tell its agent connection
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            exited = children.pop(pid, None)
            if exited is not None:
                try:
                    exited.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:
                    pass
                exited.close()


def main(args: List[str]) -> int:
    """``SOCKET_PATH [--preload torch,...]`` (from ``elastic.agent._runner --fork-server``)."""
    preload: List[str] = []
    if "--preload" in args:
        i = args.index("--preload")
        preload = [m for m in args[i + 1].split(",") if m]
        args = args[:i] + args[i + 2:]
    return serve(args[0], preload)

