"""A multi-process test harness with hard timeouts.

Starts N processes (scripts, ``elastic-run`` agents, servers), waits for them with a
deadline, and reports the three ways a process can fail as three different errors, each
carrying every process's output: :class:`Hang` (still running at the deadline; the
process tree is killed), :class:`KilledBySignal` and :class:`NonZeroExit`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

__all__ = ["ProcessFailure", "Hang", "KilledBySignal", "NonZeroExit", "Result", "Procs"]


class ProcessFailure(AssertionError):
    """A harness process did not end as expected; ``results`` holds every process's end."""

    def __init__(self, message: str, results: Sequence["Result"]) -> None:
        self.results = list(results)
        outputs = "\n".join(r.describe() for r in self.results)
        super().__init__(f"{message}\n{outputs}")


class Hang(ProcessFailure):
    """A process was still running at the deadline."""


class KilledBySignal(ProcessFailure):
    """A process died by a signal."""


class NonZeroExit(ProcessFailure):
    """A process exited with a non-zero code."""


@dataclass(frozen=True)
class Result:
    name: str
    pid: int
    returncode: Optional[int]  # None: hung (killed by the harness at the deadline)
    output: str

    @property
    def hung(self) -> bool:
        return self.returncode is None

    @property
    def signal(self) -> Optional[int]:
        return -self.returncode if self.returncode is not None and self.returncode < 0 else None

    def describe(self, tail_chars: int = 4000) -> str:
        if self.hung:
            end = "HUNG"
        elif self.signal:
            end = f"killed by {signal.Signals(self.signal).name}"
        else:
            end = f"exit {self.returncode}"
        out = self.output[-tail_chars:]
        return f"--- {self.name} (pid {self.pid}): {end} ---\n{out}"


class Procs:
    """A set of processes started together; use as a context manager so none outlives a test."""

    def __init__(self, env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> None:
        self._env = dict(os.environ if env is None else env)
        self._cwd = cwd
        self._procs: Dict[str, subprocess.Popen] = {}
        self._logs: Dict[str, str] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="harness-")
        # Every process this harness starts, and everything they start, inherits this mark:
        # cleanup finds them by it, never by a process group id that may since name another
        # test's process (pids wrap in minutes under a parallel suite; workers lead sessions).
        self._mark = f"ELASTIC_TEST_HARNESS={uuid.uuid4().hex}"

    def start(self, name: str, argv: Sequence[str], env: Optional[Mapping[str, str]] = None,
              python: bool = False) -> subprocess.Popen:
        """Start ``argv`` (prefixed by this interpreter if ``python``) in its own session."""
        if name in self._procs:
            raise ValueError(f"duplicate process name {name!r}")
        cmd = [sys.executable, *argv] if python else list(argv)
        log_path = os.path.join(self._tmp.name, f"{name}.log")
        self._logs[name] = log_path
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**self._env, **(env or {}), "ELASTIC_TEST_HARNESS": self._mark.split("=", 1)[1]},
                cwd=self._cwd, start_new_session=True,
            )
        self._procs[name] = proc
        return proc

    def __getitem__(self, name: str) -> subprocess.Popen:
        return self._procs[name]

    def output(self, name: str) -> str:
        with open(self._logs[name], "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_for_output(self, name: str, text: str, timeout_s: float, after: int = 0) -> None:
        """Block until ``text`` appears in ``name``'s output (past its first ``after``
        characters); a deadline or an early exit fails."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output(name)[after:]:
                return
            if self._procs[name].poll() is not None:
                if text in self.output(name)[after:]:
                    return
                self._fail_with(ProcessFailure, f"{name} exited before printing {text!r}")
            time.sleep(0.05)
        self._fail_with(Hang, f"{name} did not print {text!r} within {timeout_s}s")

    def signal(self, name: str, sig: int, group: bool = False) -> None:
        proc = self._procs[name]
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    def wait(self, timeout_s: float, names: Optional[Sequence[str]] = None,
             check: bool = True) -> Dict[str, Result]:
        """Wait for ``names`` (default: all) until a shared deadline.

        With ``check``, a hang raises :class:`Hang`, a signal :class:`KilledBySignal` and a
        non-zero exit :class:`NonZeroExit`, in that order of precedence.
        """
        names = list(self._procs) if names is None else list(names)
        deadline = time.monotonic() + timeout_s
        for name in names:
            proc = self._procs[name]
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        hung = [n for n in names if self._procs[n].poll() is None]
        for name in hung:
            self._kill_tree(self._procs[name])
        results = {n: self._result(n, hung=n in hung) for n in names}
        if check:
            ordered = list(results.values())
            if hung:
                raise Hang(f"hung past {timeout_s}s: {', '.join(hung)}", ordered)
            by_signal = [r.name for r in ordered if r.signal]
            if by_signal:
                raise KilledBySignal(f"killed by a signal: {', '.join(by_signal)}", ordered)
            failed = [r.name for r in ordered if r.returncode]
            if failed:
                raise NonZeroExit(f"non-zero exit: {', '.join(failed)}", ordered)
        return results

    def _result(self, name: str, hung: bool = False) -> Result:
        proc = self._procs[name]
        return Result(name, proc.pid, None if hung else proc.returncode, self.output(name))

    def _fail_with(self, cls: type, message: str) -> None:
        results = [self._result(n, hung=p.poll() is None) for n, p in self._procs.items()]
        self.close()
        raise cls(message, results)

    @staticmethod
    def _kill_tree(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:  # alive: its process group id is still its own
                self._kill_tree(proc)
        for pid in self._marked():  # what they started, whichever session it moved to
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _marked(self) -> List[int]:
        """Live processes that carry this harness's mark in their environment."""
        mark = self._mark.encode() + b"\0"
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if mark in f.read() + b"\0":
                        found.append(int(entry))
            except OSError:
                continue
        return found

    def __enter__(self) -> "Procs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self._tmp.cleanup()
