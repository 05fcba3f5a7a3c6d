"""What a lost peer looks like, as opposed to a bug: one list for the agent (a worker that
exited) and for ``@elastic.run`` (a collective that raised inside a running worker).

A fault is a peer that went away: its connections close or reset, or it stops answering
until a collective times out. Everything else a collective raises (a size or type mismatch,
"invalid usage", a bad argument) is a bug in the script, and is raised at once. A mismatch
can still look like a lost peer from the other side (Gloo aborts the rank that sees it, and
its peers read a reset connection): the aborting rank's own exit is the failure that is
charged, and a round that comes back with every node is charged too (see the agent).
"""
from __future__ import annotations

__all__ = ["LOST_PEER_SIGNS", "BUG_SIGNS", "looks_like_lost_peer", "looks_like_bug"]

# Lower-case fragments of the messages Gloo, NCCL, Horovod and sockets give when a peer is gone.
LOST_PEER_SIGNS = (
    "connection closed by peer",  # gloo: the peer process exited
    "connection reset by peer",  # gloo, horovod, grpc: the same, or the peer aborted
    "broken pipe",
    "connection refused",  # a peer's listening socket is gone (rendezvous, store)
    "timed out waiting",  # gloo: a peer stopped answering (hung, stopped, partitioned)
    "ncclremoteerror",  # nccl: a remote rank failed
    "remote process exited",
    "communicator was aborted",  # nccl: torch's watchdog aborted the group after a peer failed
    "watchdog caught collective operation timeout",
    # torch's store while a group forms: a peer did not come (or the store's host is gone)
    "waiting for clients",
    "socket timeout",
    "has timed out after",  # a client socket connecting to the store
)
# Messages that mean a bug even when they also name the transport (checked first).
BUG_SIGNS = ("mismatch", "invalid usage", "invalid argument", "doesn't match expected size")


def looks_like_bug(text: str) -> bool:
    """Whether ``text`` names a mistake in the collective calls themselves."""
    low = text.lower()
    return any(s in low for s in BUG_SIGNS)


def looks_like_lost_peer(text: str) -> bool:
    """Whether ``text`` (an exception's message, a worker's stderr) says a peer went away."""
    low = text.lower()
    return not looks_like_bug(low) and any(s in low for s in LOST_PEER_SIGNS)
