"""Spawning, watching and stopping one node's workers, with warm standbys."""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO, TYPE_CHECKING, Deque, Dict, List, Mapping, Optional, Union

from .api import WorkerExit, WorkerSpec

if TYPE_CHECKING:  # forkserver is imported by the agent, which picks one kind of standbys
    from .forkserver import ForkedProcess, ForkServer

__all__ = ["StandbyPool", "WorkerGroup"]

log = logging.getLogger("elastic.agent")
RUNNER = [sys.executable, "-m", "elastic.agent._runner"]


def _popen(argv: List[str], env: Mapping[str, str], cwd: Optional[str], stdin=None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(env), cwd=cwd, start_new_session=True)


def _bind(pid: int, cpus) -> None:
    """Pin every thread of ``pid`` to ``cpus`` (a warm standby may have threads already)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        tids = [str(pid)]
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass  # the thread (or the worker) is gone already


@contextlib.contextmanager
def _bound(cpus):
    """Spawn under ``cpus``: a child inherits the affinity of the thread that forks it."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _group_has_members(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a process. A finished worker's pid may name
    someone else's process by now (pids wrap); while its group has a member the kernel cannot
    hand the pid out again, so only then is ``killpg`` sure to reach what the worker left."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[2]) == pgid:
                        return True
            except (OSError, IndexError, ValueError):
                continue
    return False


class StandbyPool:
    """Interpreters that have already imported the framework, waiting for a script to run.

    ``take()`` hands one out and starts its replacement at once, so the pool refills while
    the workers run and is warm when the next failure comes.
    """

    def __init__(self, spec: WorkerSpec, base_env: Mapping[str, str], size: int) -> None:
        self._python = spec.python or sys.executable
        self._preload = ",".join(spec.preload)
        self._env = dict(base_env)
        self._cwd = spec.cwd
        self._size = size
        self._ready: Deque[subprocess.Popen] = collections.deque()
        self._lock = threading.Lock()
        self._marker = os.path.join(tempfile.mkdtemp(prefix="elastic-standby-"), "ready")
        self._env["ELASTIC_STANDBY_READY"] = self._marker
        self._fill()

    def _argv(self) -> List[str]:
        argv = [self._python, "-m", "elastic.agent._runner", "--standby"]
        return argv + (["--preload", self._preload] if self._preload else [])

    def _fill(self) -> None:
        with self._lock:
            while len(self._ready) < self._size:
                self._ready.append(_popen(self._argv(), self._env, self._cwd, stdin=subprocess.PIPE))

    def wait_warm(self, timeout_s: float) -> bool:
        """Block until every standby has finished its imports (or ``timeout_s`` passes)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                pending = [p for p in self._ready
                           if p.poll() is None and not os.path.exists(f"{self._marker}.{p.pid}")]
            if not pending:
                return True
            time.sleep(0.05)
        return False

    def take(self, argv: List[str], module: bool, env: Mapping[str, str], cwd: str,
             cpus=None) -> subprocess.Popen:
        with self._lock:
            while self._ready and self._ready[0].poll() is not None:
                self._ready.popleft()  # a standby that died (e.g. OOM) is useless
            proc = self._ready.popleft() if self._ready else None
        if proc is None:
            proc = _popen(self._argv(), self._env, self._cwd, stdin=subprocess.PIPE)
        if cpus is not None:
            _bind(proc.pid, cpus)  # before the script starts
        spec = {"argv": list(argv), "module": module, "env": dict(env), "cwd": cwd}
        stdin = proc.stdin
        if stdin is None:  # every standby is started with stdin=PIPE
            raise RuntimeError(f"standby {proc.pid} has no stdin pipe to send its script on")
        stdin.write((json.dumps(spec) + "\n").encode())
        stdin.close()
        self._fill()
        return proc

    def close(self) -> None:
        """Kill the unused standbys: they hold no state, and may still be importing."""
        with self._lock:
            ready, self._ready = list(self._ready), collections.deque()
        for proc in ready:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in ready:
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:  # all three are pipes for a standby (see _popen, _fill)
                    pipe.close()
        shutil.rmtree(os.path.dirname(self._marker), ignore_errors=True)


class _Worker:
    def __init__(self, proc: Union[subprocess.Popen, ForkedProcess], rank: int, local_rank: int, error_file: str,
                 out_dir: Optional[str], tee: bool) -> None:
        self.proc = proc
        self.rank = rank
        self.local_rank = local_rank
        self.error_file = error_file
        self.stderr_tail: Deque[str] = collections.deque(maxlen=40)
        self.exit: Optional[WorkerExit] = None
        self.readers = [
            threading.Thread(target=self._pump, args=(proc.stdout, out_dir, "stdout.log", sys.stdout, tee, False),
                             daemon=True),
            threading.Thread(target=self._pump, args=(proc.stderr, out_dir, "stderr.log", sys.stderr, tee, True),
                             daemon=True),
        ]
        for t in self.readers:
            t.start()

    def _pump(self, pipe: IO[bytes], out_dir: Optional[str], name: str, console: IO[str], tee: bool,
              keep_tail: bool) -> None:
        sink = open(os.path.join(out_dir, name), "ab") if out_dir else None
        prefix = f"[{self.rank}]:"
        try:
            for line in iter(pipe.readline, b""):
                if sink:
                    sink.write(line)
                    sink.flush()
                text = line.decode("utf-8", "replace")
                if keep_tail:
                    self.stderr_tail.append(text)
                if tee:
                    console.write(prefix + text)
                    console.flush()
        finally:
            if sink:
                sink.close()

    def read_error(self) -> str:
        try:
            with open(self.error_file) as f:
                record = json.load(f)["message"]
            return record["extraInfo"]["py_callstack"] or record["message"]
        except (OSError, ValueError, KeyError, TypeError):
            return ""


class WorkerGroup:
    """The ``nproc_per_node`` workers of one round on this node."""

    def __init__(self, spec: WorkerSpec, standbys: Optional[Union[StandbyPool, ForkServer]]) -> None:
        self.spec = spec
        self._standbys = standbys
        self.workers: List[_Worker] = []

    def start(self, envs: List[Dict[str, str]], attempt_dir: str) -> None:
        """Start one worker per environment (index = local rank)."""
        self.replace(dict(enumerate(envs)), attempt_dir)

    def replace(self, envs: Dict[int, Dict[str, str]], attempt_dir: str) -> None:
        """Start workers for the given local ranks, replacing any earlier ones there."""
        cwd = self.spec.cwd or os.getcwd()
        for local_rank, env in sorted(envs.items()):
            out_dir = None
            if self.spec.log_dir:
                out_dir = os.path.join(attempt_dir, str(local_rank))
                os.makedirs(out_dir, exist_ok=True)
            # Several agents on one host share the attempt dir: the node rank keeps them apart.
            error_file = os.path.join(attempt_dir, f"error_{env.get('GROUP_RANK', '0')}_{local_rank}.json")
            try:
                os.unlink(error_file)
            except FileNotFoundError:
                pass
            env = {**env, "TORCHELASTIC_ERROR_FILE": error_file}
            argv = list(self.spec.entrypoint)
            cpus = self.spec.cpu_affinity[local_rank] if self.spec.cpu_affinity is not None else None
            proc: Union[subprocess.Popen, ForkedProcess]
            if self.spec.no_python:
                with _bound(cpus):
                    proc = _popen(argv, env, cwd)
            elif self._standbys is not None:
                try:
                    proc = self._standbys.take(argv, self.spec.module, env, cwd, cpus=cpus)
                except OSError as exc:  # no warm interpreter to be had: start this one cold
                    log.warning("starting local rank %d cold: %s", local_rank, exc)
                    proc = self._cold(argv, env, cwd, cpus)
            else:
                proc = self._cold(argv, env, cwd, cpus)
            tee = self.spec.tee and (self.spec.console_local_ranks is None
                                     or local_rank in self.spec.console_local_ranks)
            worker = _Worker(proc, int(env["RANK"]), local_rank, error_file, out_dir, tee)
            self.workers = [w for w in self.workers if w.local_rank != local_rank] + [worker]
            self.workers.sort(key=lambda w: w.local_rank)

    def _cold(self, argv: List[str], env: Mapping[str, str], cwd: str, cpus) -> subprocess.Popen:
        runner = [self.spec.python or sys.executable, "-m", "elastic.agent._runner"]
        with _bound(cpus):
            return _popen(runner + (["-m"] if self.spec.module else []) + argv, env, cwd)

    @property
    def pids(self) -> List[int]:
        return [w.proc.pid for w in self.workers]

    def poll(self) -> List[WorkerExit]:
        """Exits seen so far (each reported once it happens, in the order seen)."""
        now = time.monotonic()
        for w in self.workers:
            code = w.proc.poll() if w.exit is None else None  # poll() answers the returncode
            if code is not None:
                if code != 0:
                    for t in w.readers:
                        t.join(timeout=2)  # let the traceback reach the tail
                w.exit = WorkerExit(w.rank, w.local_rank, w.proc.pid, code, now,
                                    error=w.read_error() if code else "",
                                    stderr_tail="".join(w.stderr_tail) if code else "")
        return sorted((w.exit for w in self.workers if w.exit), key=lambda e: e.at_s)

    def kill_stopped(self) -> None:
        """SIGKILL workers that are stopped (SIGSTOP, a debugger): to their peers they hang."""
        for w in self.workers:
            if w.proc.poll() is not None:
                continue
            try:
                with open(f"/proc/{w.proc.pid}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state in (b"T", b"t"):
                log.warning("rank %d (pid %d) is stopped; killing it so its peers can recover",
                            w.rank, w.proc.pid)
                try:
                    os.killpg(w.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every worker's process group now, without waiting or reaping (safe
        from another thread than the one that polls). SIGKILL, or SIGSTOP (:meth:`pause`): a
        fence, so no worker gets to save or step once more until the agent decides."""
        for w in self.workers:
            if w.proc.returncode is None:
                try:
                    os.killpg(w.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def pause(self) -> None:
        """Freeze every worker (SIGSTOP to its process group, its children and threads included)."""
        self.kill(signal.SIGSTOP)

    def resume(self) -> None:
        self.kill(signal.SIGCONT)

    def all_alive(self) -> bool:
        return bool(self.workers) and all(w.proc.poll() is None for w in self.workers)

    def running(self) -> bool:
        return any(w.proc.poll() is None for w in self.workers)

    def stop(self, sig: int = signal.SIGTERM, grace_s: Optional[float] = None) -> None:
        """Signal every live worker's process group, then SIGKILL what outlives the grace."""
        grace_s = self.spec.stop_grace_s if grace_s is None else grace_s
        for w in self.workers:
            if w.proc.poll() is None:
                try:
                    os.killpg(w.proc.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for w in self.workers:
            if w.proc.poll() is None or _group_has_members(w.proc.pid):  # grandchildren of finished ones too
                try:
                    os.killpg(w.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                w.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not die after SIGKILL", w.proc.pid)
        for w in self.workers:
            for t in w.readers:
                t.join(timeout=2)
