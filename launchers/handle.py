"""``AgentHandle``: a node's agent running in a thread of the caller's process (``start()``).

For schedulers that embed elastic-run (a Ray actor, a Kubernetes operator's thread): the agent
runs as ``launch()`` would, without signal handlers (they belong to the main thread), and the
handle waits for it and steers it through the job's store, as any ``JobController`` can.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

from elastic.commands import EXIT_FAILED, EXIT_USAGE
from elastic.control import DrainReason, JobController, JobStatus
from elastic.errors import UserError

__all__ = ["AgentHandle"]


class AgentHandle:
    def __init__(self, node) -> None:
        self._node = node
        self.exit_code: Optional[int] = None
        self.error: Optional[BaseException] = None
        self.controller = JobController(node.store, node.config.run_id)
        self._thread = threading.Thread(target=self._run, name=f"elastic-agent-{node.node_id}", daemon=True)
        self._thread.start()

    @property
    def node_id(self) -> str:
        return self._node.node_id

    def _run(self) -> None:
        try:
            self.exit_code = self._node.run()
        except BaseException as exc:  # surfaced by wait()
            self.error = exc
            self.exit_code = EXIT_USAGE if isinstance(exc, UserError) else EXIT_FAILED

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout_s: Optional[float] = None) -> Optional[int]:
        """The agent's exit code once it ended (None if ``timeout_s`` passed first); an error
        that ended it is raised here."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            return None
        if self.error is not None:
            raise self.error
        return self.exit_code

    def status(self) -> JobStatus:
        return self.controller.status()

    def drain(self, deadline_s: Optional[float] = None, reason: Any = DrainReason.MAINTENANCE) -> None:
        """Drain this node: its workers save at their next safe point and it leaves (exit 75)."""
        self.controller.request_drain(self.node_id, reason, deadline_s)

    def stop(self, graceful: bool = True) -> None:
        """Stop the whole job (every node saves and exits 0)."""
        self.controller.stop(graceful)
