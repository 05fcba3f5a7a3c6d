"""The job-wide records beside the rounds: the restart budget spent, the worker failures
reported, and the job's final status.

Any node (and a scheduler's controller, which joins no round) reads them through
:class:`JobLedger`; the round protocol writes them.
"""
from __future__ import annotations

import json
import time
from typing import List, Optional

from ..store import Store
from .keys import JobKeys
from .state import dumps

__all__ = ["JobLedger"]


class JobLedger:
    """Restarts, failures and status of job ``keys.run_id`` on ``store``."""

    def __init__(self, store: Store, keys: JobKeys) -> None:
        self.store = store
        self.keys = keys

    # -- the restart budget -------------------------------------------------------------
    def restart_count(self) -> int:
        kv = self.store.get(self.keys.restarts())
        return int(kv.value) if kv else 0

    def add_restart(self) -> int:
        """Count one more restart (compare-and-set: nodes failing at once each count); the new count."""
        key = self.keys.restarts()
        while True:
            kv = self.store.get(key)
            count = (int(kv.value) if kv else 0) + 1
            ok, _ = self.store.compare_and_set(key, kv.mod_revision if kv else None, str(count).encode())
            if ok:
                return count

    # -- worker failures ----------------------------------------------------------------
    def report_failure(self, generation: int, record: dict) -> None:
        """Publish a worker failure so any node can name the first failing rank."""
        self.store.put(self.keys.failures(generation, record["rank"]), dumps(record))

    def failures_of(self, generation: int) -> List[dict]:
        """The worker failures reported in round ``generation``."""
        kvs, _ = self.store.get_prefix(self.keys.failures(generation))
        return [json.loads(kv.value) for kv in kvs]

    def first_failure(self) -> Optional[dict]:
        """The earliest failure of the latest round that had any (the one that ended the job)."""
        kvs, _ = self.store.get_prefix(self.keys.failures())
        if not kvs:
            return None
        last_gen = max(kv.key.split("/")[-2] for kv in kvs)
        records = [json.loads(kv.value) for kv in kvs if kv.key.split("/")[-2] == last_gen]
        return min(records, key=lambda r: r["time"])

    def failure_summary(self, reason: str) -> str:
        """What a failed job prints: why, and the first failure with its traceback."""
        first = self.first_failure()
        lines = ["", "=" * 72, f"elastic-run: job {self.keys.run_id!r} failed: {reason}"]
        if first:
            lines.append(f"first failure: {first['describe']} on node {first['node_rank']} "
                         f"({first['host']}) at {time.strftime('%H:%M:%S', time.localtime(first['time']))}")
            if first.get("error"):
                lines.append(first["error"].rstrip())  # message, then the worker's traceback
        lines.append("=" * 72)
        return "\n".join(lines)

    # -- the job's status ---------------------------------------------------------------
    def mark_failed(self, reason: str) -> None:
        self.store.put(self.keys.status(), dumps({"failed": reason}))

    def job_failure(self) -> Optional[str]:
        """Why the job failed, or None while it has not."""
        kv = self.store.get(self.keys.status())
        status = json.loads(kv.value) if kv is not None else None
        return status.get("failed") if status else None
