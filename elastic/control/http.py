"""The agent's HTTP control port (placeholder until the server lands)."""
from __future__ import annotations

__all__ = ["ControlServer"]


class ControlServer:
    def __init__(self, agent, host: str, port: int, token=None) -> None:
        raise NotImplementedError("the control port is being built")
