"""The control plane: read a running job's state and steer it (scale, range, drain, stop).

``JobController.connect()`` from any process that reaches the job's store; the same requests
come from ``elastic-run ctl`` and from each agent's HTTP port (``--control-port``).
"""
from .api import (EXIT_DRAINED, ControlError, Drain, DrainReason, JobEvent, JobState, JobStatus, NodeState,
                  NodeStatus, NoSuchJobError, UnknownNodeError)
from .controller import JobController

__all__ = ["JobController", "JobStatus", "NodeStatus", "JobEvent", "JobState", "NodeState", "DrainReason",
           "Drain", "ControlError", "NoSuchJobError", "UnknownNodeError", "EXIT_DRAINED"]
