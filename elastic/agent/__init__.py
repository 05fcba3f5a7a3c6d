"""The per-node agent: spawns and supervises workers, re-rendezvouses on change."""
from .agent import ElasticAgent
from .api import AgentError, FrameworkAdapter, WorkerExit, WorkerSpec

__all__ = ["ElasticAgent", "FrameworkAdapter", "WorkerSpec", "WorkerExit", "AgentError", "free_port"]
