"""One JSON line per training step (and per worker start, re-formation and checkpoint), and
the reader the goodput analysis uses.

Every worker process appends to its own file ``<dir>/<host>-<pid>.jsonl`` (no two writers
share a file, so a SIGKILL mid-write can only truncate that process's last line, which the
reader skips). All times are ``time.time()``: the namespace hosts of the chaos harness share
the machine's clock, so lines from every host compare directly.

Records (``kind``):

- ``step``: ``t_start``, ``t_end``, ``step`` (1-based: the global step this line completes),
  ``epoch``, ``generation``, ``rank``, ``world_size``, ``samples`` (this rank's sample ids),
  ``checksum`` (a CRC32 of the parameters' bytes after the step, every 10th step, else None).
- ``start``: a worker process began (``t``; its rank, world size, generation, the step it
  resumes from and where that came from: ``scratch`` or ``checkpoint``; ``launch`` with step
  -1 for a line written before the process group formed).
- ``reform``: an in-process re-formation finished (``@elastic.run``'s reset): new rank,
  world size and generation, the step rolled back to.
- ``ckpt``: a checkpoint of ``step`` was published (``published=True``) by this rank, or a
  publish was refused (``published=False``, ``detail`` says why: a stale generation);
  ``t_start`` is when its save began, ``t`` when the outcome was known.

Every record also carries ``host``, ``pid`` and ``t`` (for ``step``: ``t_end``).
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

__all__ = ["StepLog", "Record", "read_dir", "read_lines", "CHECKSUM_EVERY"]

#: A parameter checksum is logged on every step divisible by this.
CHECKSUM_EVERY = 10


@dataclass(frozen=True)
class Record:
    """One line of a step log. Fields that a kind does not use are None/empty."""
    kind: str
    t: float
    host: str
    pid: int
    rank: int = -1
    world_size: int = 0
    generation: int = 0
    step: int = 0
    epoch: int = 0
    t_start: float = 0.0
    t_end: float = 0.0
    samples: tuple = field(default_factory=tuple)
    checksum: Optional[str] = None
    source: str = ""
    published: bool = False
    detail: str = ""
    launcher: str = ""

    @classmethod
    def from_json(cls, obj: dict) -> "Record":
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        if "samples" in known:
            known["samples"] = tuple(int(s) for s in known["samples"])
        return cls(**known)


def _host() -> str:
    return os.environ.get("CHAOS_HOST") or socket.gethostname()


class StepLog:
    """The writer: one file per process, line-buffered, each record one ``write``."""

    def __init__(self, directory: str, *, launcher: str = "") -> None:
        os.makedirs(directory, exist_ok=True)
        self.host = _host()
        self.pid = os.getpid()
        self.launcher = launcher
        self.path = os.path.join(directory, f"{self.host}-{self.pid}.jsonl")
        self._f = open(self.path, "a", buffering=1)

    def _write(self, rec: dict) -> None:
        rec.update(host=self.host, pid=self.pid, launcher=self.launcher)
        self._f.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def start(self, *, rank: int, world_size: int, generation: int, step: int, source: str) -> None:
        self._write({"kind": "start", "t": time.time(), "rank": rank, "world_size": world_size,
                     "generation": generation, "step": step, "source": source})

    def reform(self, *, rank: int, world_size: int, generation: int, step: int) -> None:
        self._write({"kind": "reform", "t": time.time(), "rank": rank, "world_size": world_size,
                     "generation": generation, "step": step})

    def step(self, *, t_start: float, t_end: float, step: int, epoch: int, generation: int,
             rank: int, world_size: int, samples: Sequence[int], checksum: Optional[str]) -> None:
        self._write({"kind": "step", "t": t_end, "t_start": t_start, "t_end": t_end, "step": step,
                     "epoch": epoch, "generation": generation, "rank": rank, "world_size": world_size,
                     "samples": [int(s) for s in samples], "checksum": checksum})

    def ckpt(self, *, step: int, generation: int, rank: int, world_size: int, published: bool,
             t_save: float, detail: str = "") -> None:
        self._write({"kind": "ckpt", "t": time.time(), "t_start": t_save, "step": step, "generation": generation,
                     "rank": rank, "world_size": world_size, "published": published, "detail": detail})

    def close(self) -> None:
        self._f.close()


def read_lines(lines: Iterable[str]) -> list:
    """Records of these lines; a line that is not whole JSON (a SIGKILL mid-write) is skipped."""
    out = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            out.append(Record.from_json(json.loads(line)))
        except (ValueError, TypeError):
            continue
    return out


def read_dir(directory: str) -> list:
    """Every record of every ``*.jsonl`` file under ``directory``, ordered by time."""
    recs: list = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".jsonl"):
            with open(os.path.join(directory, name), errors="replace") as f:
                recs.extend(read_lines(f))
    recs.sort(key=lambda r: (r.t, r.host, r.pid))
    return recs
