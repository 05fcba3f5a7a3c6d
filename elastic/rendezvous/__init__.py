"""The rendezvous round protocol: nodes agree on membership and rank order per generation."""
from .api import (NodeInfo, RendezvousClosedError, RendezvousError, RendezvousSettings,
                  RendezvousTimeoutError, RestartBudgetExceededError, Round)
from .protocol import RendezvousHandler

__all__ = ["RendezvousSettings", "NodeInfo", "Round", "RendezvousHandler", "RendezvousError",
           "RendezvousTimeoutError", "RendezvousClosedError", "RestartBudgetExceededError"]
