"""The round protocol, written once on top of :class:`elastic.store.Store`.

The job's keys are laid out in :mod:`elastic.rendezvous.keys` (:class:`JobKeys`).

Joining costs each node O(1) requests with no contention: every joiner puts its own key and
waits on ``round``. The node that opened the round takes the coordinator key, follows the join
keys (read once, then through events) and closes the round with one compare-and-set on
``round``. If the coordinator dies its key expires with its lease, and a joiner whose wait
times out takes over. A failed job also marks ``round`` ("failed"), so every waiting node
learns at once without polling ``status``.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Dict, List, Optional, Tuple

from ..errors import one_line
from ..store import KeyValue, LeaseNotFoundError, Store, StoreCompactedError, StoreError, StoreUnavailableError
from .api import (NodeInfo, NodeTable, RendezvousClosedError, RendezvousSettings, RendezvousTimeoutError,
                  RestartBudgetExceededError, Round, StoreLostError)
from .keys import JobKeys
from .ledger import JobLedger
from .changes import why_over
from .state import ChangeReason, NodeLimits, RoundChange, RoundState, RoundStatus, dumps

__all__ = ["RendezvousHandler"]

log = logging.getLogger("elastic.rendezvous")


def _state(kv: Optional[KeyValue]) -> Optional[RoundState]:
    """The round ``kv`` holds (parsed once per value in a process; immutable)."""
    return None if kv is None else RoundState.from_json(kv.value)


# How the reason of a round opened because a collective lost a peer begins (the agent's words).
LOST_PEER_REASON = "a worker lost a peer"
# How long past the last call a re-forming round waits for a previous node that is alive but
# has not joined yet (stopping its workers: SIGTERM, a final save, SIGKILL after 5 s).
REJOIN_GRACE_S = 15.0


class RendezvousHandler:
    """One node's side of the protocol: join rounds, watch for changes, leave.

    Holds a lease for the node's lifetime, renewed by a daemon thread every third of its TTL.
    A lease that expired (a partition, a pause) is replaced by a new one: the node then joins
    the next round as a newcomer. :attr:`lease_epoch` counts the replacements and
    :meth:`lease_expires_at` says until when the lease surely holds, so the agent can fence
    workers of a round it may no longer be in. A store silent for ``settings.store_loss_s`` is
    given up (:class:`StoreLostError`).
    """

    def __init__(self, store: Store, settings: RendezvousSettings, node: NodeInfo) -> None:
        self.store = store
        self.settings = settings
        self.node = node
        self.keys = JobKeys(settings.run_id)
        self.ledger = JobLedger(store, self.keys)
        self.prefix = self.keys.prefix
        self._round_key = self.keys.round()
        self._closed = threading.Event()
        self._opened_generation = 0  # the last round this node opened: it coordinates that one
        self._lease_lock = threading.Lock()  # one live lease: the heartbeat and a join may both renew it
        self._lost = False  # the store was given up: leaving does not wait on it
        self._store_error = ""  # the heartbeat's last failure, while the store does not answer
        self._warned: Dict[str, float] = {}  # when each kind of store warning was last logged
        sent = time.monotonic()
        self._lease = store.grant_lease(settings.lease_ttl_s)
        self._lease_sent = sent  # when the last renewal that succeeded was sent: it holds TTL past that
        self._contact = time.monotonic()  # the store's last answer to this node's heartbeat
        self._lease_epoch = 0  # bumped by every new lease: a round joined under an older one is gone
        store.put(self.keys.alive(node.node_id), dumps(node.to_json()), lease=self._lease)
        self._alive_put = True
        self._heartbeat = threading.Thread(target=self._beat, name="rdzv-heartbeat", daemon=True)
        self._heartbeat.start()

    # -- public ----------------------------------------------------------------------------
    @property
    def lease(self) -> int:
        """This node's lease: keys put with it vanish when the node dies or leaves."""
        return self._lease

    @property
    def lease_epoch(self) -> int:
        """How many times this node's lease was lost and replaced by a new one."""
        return self._lease_epoch

    def lease_expires_at(self) -> float:
        """``time.monotonic()`` until which the current lease surely holds on the store (the last
        renewal that succeeded was sent TTL before); past it this node may be dead to the others."""
        return self._lease_sent + self.settings.lease_ttl_s

    def store_silent_s(self) -> float:
        """Seconds since the store last answered this node's heartbeat."""
        return max(0.0, time.monotonic() - self._contact)

    def await_store(self) -> None:
        """Block until the store answers this node's heartbeat again (a renewal, or the news that
        the lease is gone); raise :class:`StoreLostError` once it has been silent for ``store_loss_s``."""
        since = time.monotonic()
        while self._contact < since and not self._closed.is_set():
            silent, limit = self.store_silent_s(), self.settings.store_loss_s
            if silent > limit:
                self._lost = True
                raise StoreLostError(self.endpoint, silent, limit, self._store_error)
            time.sleep(min(0.1, self.settings.lease_ttl_s / 10))

    def confirm_lease(self, epoch: int) -> bool:
        """Whether the lease this node held at ``epoch`` is still alive on the store, proven by a
        renewal now (a lease found gone is left to the heartbeat or the next join to replace)."""
        with self._lease_lock:
            if self._lease_epoch != epoch or self._closed.is_set():
                return False
            sent = time.monotonic()
            try:
                self.store.keep_alive(self._lease)
            except LeaseNotFoundError:
                return False
            self._lease_sent, self._contact = max(self._lease_sent, sent), time.monotonic()
            return True

    @property
    def endpoint(self) -> str:
        """Where the store is, for messages."""
        return str(getattr(self.store, "endpoint", "") or type(self.store).__name__)

    def next_round(self, prev: Optional[Round] = None, node: Optional[NodeInfo] = None) -> Round:
        """Join the next round and block until it closes with us in it.

        ``prev`` is the round this node last ran (None at start); ``node`` may update what
        others see of us (e.g. a fresh master port).
        """
        if node is not None:
            self.node = node
        deadline = time.monotonic() + self.settings.join_timeout_s
        announced_waiting = False
        known: Optional[KeyValue] = None  # the round as a compare-and-set just returned it
        try:
            while True:
                if time.monotonic() >= deadline:
                    raise RendezvousTimeoutError(
                        f"no round formed within {self.settings.join_timeout_s:.0f}s "
                        f"(need {self.settings.min_nodes} node(s) for job {self.settings.run_id!r})")
                try:
                    kv, known = (known, None) if known is not None else (self.store.get(self._round_key), None)
                    if kv is None:
                        # The first round: whoever writes it first opens it; the others (a
                        # crowd, when a whole job starts at once) get it back from the same call.
                        first = RoundState(1, RoundStatus.OPEN, opener=self.node.node_id)
                        opened, known = self.store.compare_and_set(self._round_key, None, first.to_json())
                        if opened:
                            self._opened_generation = 1
                        continue
                    state = RoundState.from_json(kv.value)
                    gen = state.generation
                    if state.is_failed:
                        raise RendezvousClosedError(f"job failed: {state.reason or 'unknown'}")
                    if state.is_closed:
                        mine = prev is not None and prev.generation == gen
                        if mine or len(state.nodes) < self.limits().target:
                            # We ran in it and need a new one, or it has room: open the next round.
                            self._open_next(kv, state)
                            continue
                        if not announced_waiting:
                            log.info("round %d is full (%d nodes); waiting for a place", gen, len(state.nodes))
                            self.store.put(self.keys.waiting(self.node.node_id), b"1", lease=self._lease)
                            announced_waiting = True
                        if not self.store.wait(self._round_key, kv.mod_revision, timeout_s=self._poll_s(deadline)):
                            self._raise_if_failed()
                        continue
                    result = self._join_open_round(kv, prev, deadline)
                    if result is not None:
                        return result
                except (LeaseNotFoundError, StoreUnavailableError) as exc:
                    self._ride_out(exc)
        finally:
            if announced_waiting and not self._lost:
                try:
                    self.store.delete(self.keys.waiting(self.node.node_id))
                except StoreError as exc:  # leased: it goes with our lease anyway
                    log.warning("could not withdraw the waiting mark: %s", exc)

    def watch(self, rnd: Round, timeout_s: float) -> Optional[RoundChange]:
        """Block up to ``timeout_s`` for a change that ends ``rnd``; returns why, or None."""
        reason, rev = self._check(rnd)
        if reason:
            return reason
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                events = self.store.wait(self.prefix, rev, timeout_s=max(0.0, deadline - time.monotonic()))
            except StoreCompactedError:
                reason, rev = self._check(rnd)
                if reason:
                    return reason
                continue
            if not events:
                return None
            rev = events[-1].revision
            if any(self._relevant(e.key) for e in events):
                reason, rev = self._check(rnd)
                if reason:
                    return reason
        return None

    def request_new_round(self, rnd: Round, reason: str, cause: ChangeReason, *, joining: bool = True) -> bool:
        """End ``rnd`` so that every node re-rendezvouses; a worker's failure
        (:attr:`ChangeReason.WORKER_FAILED`) spends the restart budget, nothing else does.
        ``joining=False``: this node will not join the next round (it drains), so the first
        node that joins coordinates it.

        Returns whether this call opened the next round (another node may have been first).
        """
        if cause is ChangeReason.WORKER_FAILED:
            self.charge_restart(reason)
        kv = self.store.get(self._round_key)
        state = _state(kv)
        if kv and state and state.generation == rnd.generation and state.is_closed:
            return self._open_next(kv, state, reason, cause, joining=joining)
        return False

    def limits(self) -> NodeLimits:
        """The node range and desired size in force now (a scheduler may have changed them)."""
        return NodeLimits.of(self.settings.min_nodes, self.settings.max_nodes, self._value(self.keys.node_range()),
                             self._value(self.keys.desired()))

    def _value(self, key: str) -> Optional[bytes]:
        kv = self.store.get(key)
        return None if kv is None else kv.value

    def charge_restart(self, reason: str) -> None:
        """Spend one restart of the job-wide budget; past it, fail the job and raise."""
        count = self.ledger.add_restart()
        if count > self.settings.max_restarts:
            msg = f"restart budget exhausted ({self.settings.max_restarts} restarts) after: {reason}"
            self.fail(msg)
            raise RestartBudgetExceededError(msg)
        log.info("restart %d/%d: %s", count, self.settings.max_restarts, reason)

    def mark_done(self, rnd: Round) -> None:
        """Record that this node's workers succeeded, so its leaving is not a scale-down."""
        self.store.put(self.keys.done(rnd.generation, self.node.node_id), b"1")

    def fail(self, reason: str) -> None:
        """Fail the job for every node: the status record, then the round every node waits on."""
        self.ledger.mark_failed(reason)
        while True:
            kv = self.store.get(self._round_key)
            state = _state(kv)
            if state is not None and state.is_failed:
                return
            failed = RoundState(state.generation + 1 if state else 1, RoundStatus.FAILED, reason=reason)
            if self.store.compare_and_set(self._round_key, kv.mod_revision if kv else None,
                                          failed.to_json())[0]:
                return

    def leave(self) -> None:
        """Leave cleanly: revoking the lease deletes our keys, so peers rescale at once. Once is
        enough: a second call (the launcher's, after the agent's) does nothing."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._lost:
            return  # the store is gone: nothing to revoke, and no answer to wait for
        try:
            self.store.revoke_lease(self._lease)
        except StoreError as exc:
            log.warning("could not revoke the rendezvous lease: %s", exc)

    def close(self) -> None:
        self.leave()
        self.store.close()

    # -- joining ---------------------------------------------------------------------------
    def _join_open_round(self, opened: KeyValue, prev: Optional[Round], deadline: float) -> Optional[Round]:
        """Join the open round read as ``kv``; returns the closed round, or None to start over.

        A joiner's requests: put its join key and wait for the round key's next change, which
        carries the closed round. The node that opened the round coordinates it; the others
        try for the coordinator key (and re-check the job status and their join key) only
        when a wait times out.
        """
        gen = RoundState.from_json(opened.value).generation
        kv: Optional[KeyValue] = opened
        join_prefix = self.keys.join(gen)
        coordinator_key = self.keys.coordinator(gen)
        info = dumps({**self.node.to_json(), "prev_gen": prev.generation if prev else None})
        self.store.put(join_prefix + self.node.node_id, info, lease=self._lease)
        first = True
        while True:
            self._check_deadline(gen, deadline)
            if kv is None:  # after a timeout or a coordinator's pass: look again
                self._raise_if_failed()
                kv = self.store.get(self._round_key)
            if kv is None:
                return None  # the round is gone: start over
            state = RoundState.from_json(kv.value)
            if state.generation != gen or not state.is_open:
                if state.generation == gen and state.is_closed:
                    rank = state.nodes.rank_of(self.node.node_id)
                    if rank is not None:
                        return self._round_from(state, rank, kv)
                return None  # superseded, or closed without us: start over
            if not first and self.store.get(join_prefix + self.node.node_id) is None:
                # Our join key vanished (lease lost while paused): join again.
                self.store.put(join_prefix + self.node.node_id, info, lease=self._lease)
            # One node coordinates: whoever holds the (leased) coordinator key. A dead
            # coordinator's key expires with its lease and the next node to look takes over.
            won = False
            if not first or self._opened_generation == gen or not state.opener:
                me = self.node.node_id.encode()
                won, holder = self.store.compare_and_set(coordinator_key, None, me, lease=self._lease)
                won = won or (holder is not None and holder.value == me)
            first = False
            if won:
                self._coordinate(gen, join_prefix, deadline)
                kv = None
            else:
                # The round's new value arrives with the event: no second read of it.
                try:
                    events = self.store.wait(self._round_key, kv.mod_revision, timeout_s=self._poll_s(deadline))
                except StoreCompactedError:
                    events = []
                puts = [e for e in events if e.kind == "put"]
                kv = KeyValue(self._round_key, puts[-1].value, puts[-1].revision) if puts else None

    def _coordinate(self, gen: int, join_prefix: str, deadline: float) -> None:
        """Watch the joiners of round ``gen`` and close it at MAX, or at MIN after last call.

        The joiners are read once and then followed through events, so coordinating N
        joiners costs O(N), not O(N^2) re-reads. Returns once the round is closed or gone.
        A round that re-forms a running job (it has previous nodes) closes as soon as every
        live node (``alive/``) has joined: the last call is for nodes still on their way, and
        there are none. It also waits past the last call, up to ``REJOIN_GRACE_S``, for a
        previous node that is alive (it is stopping its workers, which may take seconds:
        leaving it out would reorder the ranks and cost another round) until it joins or its
        lease ends; except in a round opened for a lost peer, where a dead node's lease runs
        on and the last call decides. A node asked to drain is not waited for; a scheduler's
        desired size closes the round at once when reached.
        """
        settings = self.settings
        kvs, rev = self.store.get_prefix(join_prefix)
        joins: Dict[str, KeyValue] = {kv.key: kv for kv in kvs}
        alive_prefix, drain_prefix, control_prefix = self.keys.alive(), self.keys.drain(), self.keys.control()
        alive = {kv.key[len(alive_prefix):] for kv in self.store.get_prefix(alive_prefix)[0]}
        draining = {kv.key[len(drain_prefix):] for kv in self.store.get_prefix(drain_prefix)[0]}
        limits = self.limits()
        min_reached_at: Optional[float] = None
        kv: Optional[KeyValue] = None
        state = RoundState(gen, RoundStatus.OPEN)
        while True:
            self._check_deadline(gen, deadline)
            if kv is None:  # re-read only after a timeout or a lost close: one round trip per
                kv = self.store.get(self._round_key)  # event batch keeps a 1024-node join fast
                if kv is None:
                    return
                state = RoundState.from_json(kv.value)
                if state.generation != gen or not state.is_open:
                    return
            now = time.monotonic()
            n = len(joins)
            if n < limits.min_nodes:
                min_reached_at = None
            elif min_reached_at is None:
                min_reached_at = now
            close = n >= limits.target
            last_call_over = False
            if not close and min_reached_at is not None:
                # Below MIN nothing else can close the round: the sets below are built only
                # from MIN on (a 1024-node round would otherwise rebuild them per event batch).
                joined = {k[len(join_prefix):] for k in joins}
                living = alive - draining
                prev = set(state.prev_nodes)
                everyone = bool(prev) and living <= joined
                patient = state.cause is not ChangeReason.LOST_PEER
                last_call_over = now - min_reached_at >= settings.last_call_s
                awaited = (patient and bool((prev & living) - joined)
                           and now - min_reached_at < settings.last_call_s + REJOIN_GRACE_S)
                close = everyone or (last_call_over and not awaited)
            if close:
                self._close(kv, state, sorted(joins.values(), key=lambda j: j.mod_revision), limits)
                kv = None
                continue
            timeout = self._poll_s(deadline)
            if min_reached_at is not None:
                ends = min_reached_at + settings.last_call_s + (REJOIN_GRACE_S if last_call_over else 0.0)
                timeout = min(timeout, max(0.0, ends - now))
            try:  # the whole job's prefix: the join keys, and the round if it fails meanwhile
                events = self.store.wait(self.prefix, rev, timeout_s=timeout)
            except StoreCompactedError:
                kvs, rev = self.store.get_prefix(join_prefix)
                joins = {j.key: j for j in kvs}
                alive = {a.key[len(alive_prefix):] for a in self.store.get_prefix(alive_prefix)[0]}
                draining = {d.key[len(drain_prefix):] for d in self.store.get_prefix(drain_prefix)[0]}
                kv = None
                continue
            if not events:
                self._raise_if_failed()
                kv = None
            for event in events:
                if event.key.startswith(join_prefix):
                    if event.kind == "put":
                        joins[event.key] = KeyValue(event.key, event.value, event.revision)
                    else:
                        joins.pop(event.key, None)
                elif event.key.startswith(alive_prefix):
                    (alive.add if event.kind == "put" else alive.discard)(event.key[len(alive_prefix):])
                elif event.key.startswith(drain_prefix):
                    (draining.add if event.kind == "put" else draining.discard)(event.key[len(drain_prefix):])
                elif event.key.startswith(control_prefix):
                    limits = self.limits()
                elif event.key == self._round_key:
                    kv = None
                rev = event.revision

    def _check_deadline(self, gen: int, deadline: float) -> None:
        if time.monotonic() >= deadline:
            raise RendezvousTimeoutError(
                f"round {gen} did not close within {self.settings.join_timeout_s:.0f}s "
                f"(need {self.settings.min_nodes} node(s) for job {self.settings.run_id!r})")

    def _close(self, kv: KeyValue, state: RoundState, joins: List[KeyValue], limits: NodeLimits) -> None:
        prev_order = {node_id: i for i, node_id in enumerate(state.prev_nodes)}
        infos = [json.loads(j.value) for j in joins]  # already in join order

        def order(item: Tuple[int, dict]):
            join_idx, info = item
            if info.get("rank_hint") is not None:
                return (0, info["rank_hint"], join_idx)
            if info["node_id"] in prev_order:  # survivors keep their order
                return (1, prev_order[info["node_id"]], join_idx)
            return (2, join_idx, 0)  # newcomers are appended in join order

        ranked = [info for _, info in sorted(enumerate(infos), key=order)]
        chosen = ranked[: limits.max_nodes]
        closed = RoundState(state.generation, RoundStatus.CLOSED,
                            nodes=NodeTable.of([NodeInfo.from_json(i) for i in chosen]),
                            restart_count=self.ledger.restart_count())
        ok, _ = self.store.compare_and_set(self._round_key, kv.mod_revision, closed.to_json())
        if ok:
            log.info("round %d closed with %d node(s)", state.generation, len(chosen))

    def _open_next(self, kv: KeyValue, state: RoundState, reason: str = "",
                   cause: Optional[ChangeReason] = None, joining: bool = True) -> bool:
        nxt = state.opened_next(reason, cause, opener=self.node.node_id if joining else "")
        ok, _ = self.store.compare_and_set(self._round_key, kv.mod_revision, nxt.to_json())
        if ok:
            self._opened_generation = nxt.generation
            log.info("opened round %d%s", nxt.generation, f" ({reason})" if reason else "")
        return ok

    def _round_from(self, state: RoundState, rank: int, kv: KeyValue) -> Round:
        return Round(generation=state.generation, nodes=state.nodes, node_rank=rank,
                     restart_count=state.restart_count, revision=kv.mod_revision,
                     max_nodes=self.settings.max_nodes)

    # -- watching --------------------------------------------------------------------------
    def _relevant(self, key: str) -> bool:
        k = self.keys
        return key in (k.round(), k.status()) or key.startswith((k.alive(), k.waiting(), k.control()))

    def _check(self, rnd: Round) -> Tuple[Optional[RoundChange], int]:
        """Why ``rnd`` is over (None while it holds), and the revision that was read."""
        kvs, rev = self.store.get_prefix(self.prefix)
        return why_over(self.keys, self.settings, self.node.node_id, rnd, kvs), rev

    # -- helpers ---------------------------------------------------------------------------
    def _poll_s(self, deadline: float) -> float:
        return max(0.0, min(deadline - time.monotonic(), self.settings.lease_ttl_s / 2))

    def _raise_if_failed(self) -> None:
        reason = self.ledger.job_failure()
        if reason:
            raise RendezvousClosedError(f"job failed: {reason}")

    def _ride_out(self, exc: StoreError) -> None:
        """A join step failed on the store; every step is safe to repeat. A lease that ended (a
        partition, a pause past the TTL) is replaced, and the next round admits this node as a
        newcomer; a store that does not answer (overloaded, restarting, or a partition) is tried
        again, until it has been silent for ``store_loss_s``."""
        try:
            if isinstance(exc, LeaseNotFoundError):
                self._renew_lease()
                return
        except StoreUnavailableError as again:
            exc = again
        self._give_up_if_lost(exc)
        self._warn("join", "rendezvous store did not answer (%s); retrying%s", exc, self._silence())
        time.sleep(min(0.5, self.settings.lease_ttl_s / 4))

    def _silence(self) -> str:
        silent = self.store_silent_s()
        if silent < self.settings.lease_ttl_s:
            return ""
        return f" (silent for {silent:.0f}s; given up after {self.settings.store_loss_s:g}s)"

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """A warning about the store, logged at most once per lease period per ``kind`` (a store
        that is gone fails every retry, several a second), the rest at debug level."""
        now = time.monotonic()
        if now - self._warned.get(kind, float("-inf")) >= max(1.0, self.settings.lease_ttl_s):
            self._warned[kind] = now
            log.warning(message, *args)
        else:
            log.debug(message, *args)

    def _answered(self) -> None:
        """The heartbeat got an answer (a renewal, or the news that the lease is gone)."""
        now = time.monotonic()
        if self._store_error:
            log.warning("rendezvous store answers again after %.1fs of silence", now - self._contact)
            self._store_error = ""
        self._contact = now

    def _give_up_if_lost(self, exc: BaseException) -> None:
        """Raise :class:`StoreLostError` once the store has been silent for ``store_loss_s``."""
        silent, limit = self.store_silent_s(), self.settings.store_loss_s
        if silent > limit:
            self._lost = True
            raise StoreLostError(self.endpoint, silent, limit, one_line(exc)) from None

    def _renew_lease(self) -> None:
        """Make sure this node holds a live lease and its ``alive`` key: renew the current lease,
        or, if it is gone, take a new one (this node was declared dead: it comes back as a newcomer)."""
        with self._lease_lock:
            if self._closed.is_set():
                return
            lease, sent = self._lease, time.monotonic()
            try:
                self.store.keep_alive(lease)
                self._lease_sent, self._contact = sent, time.monotonic()
            except LeaseNotFoundError:
                self._contact = time.monotonic()  # an answer: the store is there, our lease is not
                if self._closed.is_set():
                    return  # leave() revoked it meanwhile: nothing is wrong
                sent = time.monotonic()
                self._lease = self.store.grant_lease(self.settings.lease_ttl_s)
                self._lease_sent, self._alive_put = sent, False
                self._lease_epoch += 1
                log.warning("rendezvous lease %d expired; this node rejoins as a newcomer with lease %d",
                            lease, self._lease)
            if not self._alive_put:
                self.store.put(self.keys.alive(self.node.node_id), dumps(self.node.to_json()), lease=self._lease)
                self._alive_put = True

    def _beat(self) -> None:
        """Renew the lease every third of its TTL; after a failed renewal try again soon, not a
        whole interval later (on a loaded machine a late beat must not become a false death).
        A lease found gone is replaced (see :meth:`_renew_lease`); the store's silence is timed
        for :meth:`store_silent_s`."""
        interval = self.settings.lease_ttl_s / 3
        wait = interval
        while not self._closed.wait(wait):
            wait = interval
            lease, sent = self._lease, time.monotonic()
            try:
                self.store.keep_alive(lease)
                with self._lease_lock:
                    if lease == self._lease:
                        self._lease_sent = max(self._lease_sent, sent)
                self._answered()
                if not self._alive_put:
                    self._renew_lease()
            except LeaseNotFoundError:
                self._answered()
                if self._closed.is_set():
                    return  # leave() revoked it while this renewal was in flight: nothing is wrong
                try:
                    self._renew_lease()
                except StoreError as exc:
                    self._warn("beat", "rendezvous heartbeat could not rejoin: %s", exc)
                    wait = min(interval, 0.2)
            except StoreError as exc:
                if self._closed.is_set():
                    return
                self._store_error = one_line(exc)
                self._warn("beat", "rendezvous heartbeat failed: %s%s", exc, self._silence())
                wait = min(interval, 0.2)
