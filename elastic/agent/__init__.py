"""The per-node agent: spawns and supervises workers, re-rendezvouses on change."""
from .agent import ElasticAgent
from .api import EXIT_STORE_LOST, AgentError, FrameworkAdapter, WorkerExit, WorkerSpec

__all__ = ["ElasticAgent", "FrameworkAdapter", "WorkerSpec", "WorkerExit", "AgentError", "EXIT_STORE_LOST",
           "free_port"]
