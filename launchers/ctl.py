"""``elastic-run ctl``: read and steer a running job from a shell, a probe or a scheduler.

    elastic-run ctl status   --rdzv-endpoint HOST:PORT --rdzv-id JOB [--json] [--watch]
    elastic-run ctl scale 4 --wait
    elastic-run ctl drain node-3 --deadline 120 --reason preemption
    elastic-run ctl events --follow --json
    elastic-run ctl health          # exit 0: forming or running, every node's lease fresh

Every verb takes the launcher's ``--rdzv-backend/--rdzv-endpoint/--rdzv-id/--rdzv-conf`` flags
(both spellings, ``PET_*`` defaults, so it runs unchanged inside a pod or a Slurm step) and
``--json`` (one JSON object per line). It goes through :class:`elastic.control.JobController`:
it talks to the job's store, never to its workers. A user's mistake (unknown node, a size
outside the range, a wrong token, no such job, a store that cannot be reached) is one line and
exit 2. ``ctl`` is the first word only: a training script literally named ``ctl`` runs as
``elastic-run ./ctl``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Optional

from elastic.commands import EXIT_FAILED, EXIT_OK, run_command
from elastic.errors import ConfigError, UserError

__all__ = ["main", "build_parser", "HEALTHY_LEASE_AGE_S"]

PROG = "elastic-run ctl"

#: ``health``: a node whose agent has not published for longer is stale (agents republish
#: every 5 s; a dead agent's status disappears with its lease).
HEALTHY_LEASE_AGE_S = 15.0

_RUNNING_STATES = ("forming", "running")
_FINAL_STATES = ("succeeded", "failed", "stopped")
_ENDING_EVENTS = ("stop", "stopped", "succeeded", "failed")


class _Parser(argparse.ArgumentParser):
    """A bad command line is one line on stderr and exit 2, like every user error."""

    def error(self, message: str):
        self.exit(2, f"{PROG}: error: {message} ({PROG} --help lists the verbs)\n")


def _store_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """The launcher's store flags (same spellings, ``PET_*`` defaults through its ``_flag``).

    They are accepted before the verb and after it; after it (``suppress``) they only
    override what was given before."""
    from .cli import _flag

    def add(*names: str, dest: str, metavar: str, default: Any, help: str) -> None:
        if suppress:
            parser.add_argument(*names, dest=dest, metavar=metavar, default=argparse.SUPPRESS, help=help)
        else:
            _flag(parser, *names, dest=dest, metavar=metavar, default=default, help=help)

    add("--rdzv-backend", "--rdzv_backend", dest="rdzv_backend", metavar="NAME", default=None,
        help="embedded ('c10d' is an alias) or etcd ('etcd-v2'), as given to the agents (default "
             "$PET_RDZV_BACKEND, then $ELASTIC_RDZV_BACKEND, else embedded)")
    add("--rdzv-endpoint", "--rdzv_endpoint", dest="rdzv_endpoint", metavar="HOST:PORT", default="",
        help="host:port of the job's rendezvous store (default $PET_RDZV_ENDPOINT, "
             "then $ELASTIC_RDZV_ENDPOINT)")
    add("--rdzv-id", "--rdzv_id", dest="rdzv_id", metavar="ID", default=None,
        help="the job's id (default $PET_RDZV_ID; inside a worker: its own job)")
    add("--rdzv-conf", "--rdzv_conf", dest="rdzv_conf", metavar="K=V,...", default="",
        help="k=v,... as given to the agents, e.g. token_file=PATH (protocol settings are ignored)")
    if suppress:
        parser.add_argument("--json", dest="json", action="store_true", default=argparse.SUPPRESS,
                            help="one JSON object per line instead of text")
    else:
        parser.add_argument("--json", dest="json", action="store_true", default=False,
                            help="one JSON object per line instead of text")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG, allow_abbrev=False,
        description="Read and steer a running elastic-run job through its rendezvous store. "
                    "'ctl' is recognised only as the first argument of elastic-run: a training "
                    "script literally named 'ctl' is run as 'elastic-run ./ctl'.",
        epilog="Exit codes: 0 ok; 1 the job or its store failed, or (health) the job is not healthy; "
               "2 a bad request (unknown node, size outside the range, wrong token, no such job, "
               "unreachable store).")
    _store_flags(p, suppress=False)
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help, description=help, allow_abbrev=False)
        _store_flags(sub, suppress=True)
        return sub

    s = verb("status", "the job's state, size and range, and one line per node")
    s.add_argument("--watch", action="store_true", help="print it again every --interval until the job ends")
    s.add_argument("--interval", type=_seconds("--interval", positive=True), default=2.0, metavar="S",
                   help="seconds between two --watch prints (default 2)")

    s = verb("scale", "run with N nodes (within the job's MIN:MAX range)")
    s.add_argument("nodes", metavar="N", type=_count("N"))
    s.add_argument("--wait", action="store_true", help="return once the job runs with N nodes")
    s.add_argument("--timeout", type=_seconds("--timeout"), default=120.0, metavar="S",
                   help="seconds --wait waits (default 120)")

    s = verb("set-range", "change the job's node range (nodes above the new MAX drain)")
    s.add_argument("range", metavar="MIN:MAX", nargs="+", help="MIN:MAX, or MIN MAX")

    s = verb("drain", "ask a node (id, host or node rank) to save at its next safe point and leave")
    s.add_argument("node", metavar="NODE")
    s.add_argument("--deadline", type=_seconds("--deadline"), default=None, metavar="S",
                   help="seconds from now after which the node leaves anyway")
    s.add_argument("--reason", choices=["maintenance", "preemption", "scale_down"], default="maintenance")

    s = verb("undrain", "withdraw a drain its node has not acted on yet")
    s.add_argument("node", metavar="NODE")

    s = verb("stop", "end the job: every node saves at its next safe point and exits 0")
    s.add_argument("--now", action="store_true", help="stop the workers at once instead")

    s = verb("events", "the job's events (rounds, joins, leaves, failures, drains, scale, stop)")
    s.add_argument("--since", default="", metavar="SEQ", help="only events after this seq")
    s.add_argument("--follow", action="store_true", help="keep printing new events as they come")
    s.add_argument("--timeout", type=_seconds("--timeout"), default=None, metavar="S",
                   help="with --follow: stop after S seconds without an event (default: never)")

    s = verb("health", "exit 0 when the job is forming or running and every node's lease is fresh "
                       "(for liveness/readiness probes), 1 otherwise")
    s.add_argument("--max-lease-age", type=_seconds("--max-lease-age", positive=True),
                   default=HEALTHY_LEASE_AGE_S, metavar="S",
                   help=f"a node that has not published for longer is stale (default {HEALTHY_LEASE_AGE_S:g})")
    return p


def _seconds(flag: str, positive: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected seconds") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {'positive' if positive else 'non-negative'} seconds")
        return value
    parse.__name__ = flag
    return parse


def _count(name: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number of nodes") from None
    parse.__name__ = name
    return parse


def _range(values: List[str]) -> tuple:
    text = ":".join(values) if len(values) == 2 else (values[0] if len(values) == 1 else "")
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"set-range {' '.join(values)!r}: expected MIN:MAX (or MIN MAX) with integers") from None
    return lo, hi


# -- connecting ------------------------------------------------------------------------------
def connect(args: argparse.Namespace):
    """A JobController for the job the flags (or the environment) name."""
    from elastic.control import JobController

    from .config import parse_rdzv_conf, store_conf

    backend = args.rdzv_backend or os.environ.get("ELASTIC_RDZV_BACKEND") or "embedded"
    backend = {"c10d": "embedded", "static": "embedded", "etcd-v2": "etcd"}.get(backend, backend)
    endpoint = args.rdzv_endpoint or os.environ.get("ELASTIC_RDZV_ENDPOINT", "")
    if not endpoint:
        raise UserError("no store to talk to: give --rdzv-endpoint HOST:PORT (or set PET_RDZV_ENDPOINT) "
                        "and --rdzv-id, as given to the job's agents")
    conf = store_conf(parse_rdzv_conf(args.rdzv_conf), backend)
    return JobController.connect(endpoint, args.rdzv_id or None, backend, **conf)


# -- printing --------------------------------------------------------------------------------
def _emit(obj: Dict[str, Any]) -> None:
    print(json.dumps(obj, default=_json_default), flush=True)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "value"):
        return obj.value
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _node_json(node) -> Dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(node), "draining": node.draining}


def _status_json(status) -> Dict[str, Any]:
    out = status.to_json()
    out["nodes"] = [_node_json(n) for n in status.nodes]
    return out


def _opt(value: Any) -> str:
    return "-" if value is None else str(value)


def _drain_text(drain) -> str:
    if drain is None:
        return "-"
    reason = getattr(drain.reason, "value", drain.reason)
    if drain.deadline is None:
        return str(reason)
    return f"{reason} (deadline in {max(0.0, drain.deadline - time.time()):.0f}s)"


def status_lines(status) -> List[str]:
    """The human form: a header line, then one line per node."""
    state = getattr(status.state, "value", status.state)
    head = (f"job {status.run_id}: {state}  generation {status.generation}  world size {status.world_size}  "
            f"nodes {status.num_nodes}  range {status.min_nodes}:{status.max_nodes}  "
            f"desired {_opt(status.desired_nodes)}  restarts {status.restarts}/{status.max_restarts}")
    if status.reason and state not in ("running",):
        head += f"  ({status.reason})"
    rows = [("NODE", "HOST", "RANK", "STATE", "DRAINING", "LEASE", "PIDS", "STEP", "CKPT")]
    for n in status.nodes:
        rows.append((n.node_id, n.host, _opt(n.node_rank), str(getattr(n.state, "value", n.state)),
                     _drain_text(n.drain), f"{n.lease_age_s:.1f}s",
                     ",".join(str(p) for p in n.worker_pids) or "-", _opt(n.last_step), _opt(n.last_checkpoint_step)))
    if len(rows) == 1:
        return [head, "  (no node has published a status)"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [head] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _event_line(event) -> str:
    when = datetime.fromtimestamp(event.time, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    parts = [when, event.name]
    if event.generation:
        parts.append(f"round {event.generation}")
    if event.node:
        parts.append(f"node {event.node}")
    parts += [f"{k}={json.dumps(v, default=_json_default) if not isinstance(v, str) else v}"
              for k, v in event.details.items()]
    parts.append(f"seq={event.seq}")
    return "  ".join(parts)


# -- the verbs -------------------------------------------------------------------------------
def _status(ctl, args) -> int:
    if not args.watch:
        status = ctl.status()
        if args.json:
            _emit(_status_json(status))
        else:
            print("\n".join(status_lines(status)), flush=True)
        return EXIT_OK
    from elastic.store import StoreCompactedError, StoreError

    last = None
    while True:
        try:
            _, rev = ctl.store.get_prefix(ctl.keys.prefix)
            status = ctl.status()
        except StoreError as exc:
            if last is None:
                raise
            # An embedded store lives in one of the job's agents: it goes when the job ends.
            ended = getattr(last.state, "value", last.state) in _FINAL_STATES + ("draining",)
            print(f"{PROG}: the job's store went away ({exc}); "
                  f"{'the job ended' if ended else 'last seen ' + str(getattr(last.state, 'value', last.state))}",
                  file=sys.stderr, flush=True)
            return EXIT_OK if ended else EXIT_FAILED
        if args.json:
            _emit({"time": time.time(), **_status_json(status)})
        else:
            stamp = datetime.now().strftime("%H:%M:%S")
            lines = status_lines(status)
            print("\n".join([f"[{stamp}] {lines[0]}"] + lines[1:]) + "\n", flush=True)
        last = status
        if getattr(status.state, "value", status.state) in _FINAL_STATES:
            return EXIT_OK
        try:  # again after --interval, or at once when a round or a request changes
            ctl.store.wait(ctl.keys.prefix, rev, timeout_s=args.interval)
        except StoreCompactedError:
            pass
        except StoreError:
            continue  # the next status() says whether the store is gone


def _scale(ctl, args) -> int:
    status = ctl.scale(args.nodes, wait=args.wait, timeout_s=args.timeout)
    if args.json:
        _emit({"verb": "scale", "desired_nodes": args.nodes, "status": _status_json(status)})
    elif args.wait:
        print(f"job {status.run_id} runs with {status.num_nodes} nodes (world size {status.world_size})", flush=True)
    else:
        more = args.nodes - status.num_nodes
        hint = (f"; {more} more node(s) wanted: start agents for them if none are waiting" if more > 0 else
                f"; {-more} node(s) draining" if more < 0 else "")
        print(f"job {status.run_id}: desired {args.nodes} nodes (range {status.min_nodes}:{status.max_nodes}), "
              f"running {status.num_nodes}{hint}", flush=True)
    return EXIT_OK


def _set_range(ctl, args) -> int:
    lo, hi = _range(args.range)
    status = ctl.set_range(lo, hi)
    if args.json:
        _emit({"verb": "set-range", "min_nodes": lo, "max_nodes": hi, "status": _status_json(status)})
    else:
        print(f"job {status.run_id}: node range {lo}:{hi} (running {status.num_nodes} nodes)", flush=True)
    return EXIT_OK


def _drain(ctl, args) -> int:
    node = ctl.drain(args.node, deadline_s=args.deadline, reason=args.reason)
    if args.json:
        _emit({"verb": "drain", "node": _node_json(node), "reason": args.reason, "deadline_s": args.deadline})
    else:
        deadline = "" if args.deadline is None else f", leaves by {args.deadline:g}s from now"
        print(f"draining node {node.node_id} (node rank {_opt(node.node_rank)}, host {node.host}): "
              f"{args.reason}{deadline}", flush=True)
    return EXIT_OK


def _undrain(ctl, args) -> int:
    node = ctl.undrain(args.node)
    if args.json:
        _emit({"verb": "undrain", "node": _node_json(node)})
    else:
        print(f"drain of node {node.node_id} (node rank {_opt(node.node_rank)}) withdrawn", flush=True)
    return EXIT_OK


def _stop(ctl, args) -> int:
    ctl.stop(graceful=not args.now)
    if args.json:
        _emit({"verb": "stop", "run_id": ctl.run_id, "graceful": not args.now})
    else:
        how = "stopping its workers now" if args.now else "every node saves at its next safe point and exits 0"
        print(f"job {ctl.run_id}: stop requested ({how})", flush=True)
    return EXIT_OK


def _events(ctl, args) -> int:
    ctl.status()  # no such job: one line and exit 2, not an empty list
    events: Iterable = ctl.events(since=args.since, follow=args.follow, timeout_s=args.timeout)
    from elastic.store import StoreError

    last = ""
    try:
        for event in events:
            last = event.name
            if args.json:
                _emit(event.to_json())
            else:
                print(_event_line(event), flush=True)
    except StoreError as exc:
        if not args.follow:
            raise
        # An embedded store lives in one of the job's agents: it goes when the job ends.
        ended = last in _ENDING_EVENTS
        print(f"{PROG}: the job's store went away ({exc}){'; the job ended' if ended else ''}",
              file=sys.stderr, flush=True)
        return EXIT_OK if ended else EXIT_FAILED
    return EXIT_OK


def health_problems(status, max_lease_age_s: float = HEALTHY_LEASE_AGE_S) -> List[str]:
    """Why the job is not healthy ([] when it is forming or running with every lease fresh)."""
    state = getattr(status.state, "value", status.state)
    problems = []
    if state not in _RUNNING_STATES:
        problems.append(f"job is {state}" + (f": {status.reason}" if status.reason else ""))
    if not status.nodes:
        problems.append("no node has published a status")
    for n in status.nodes:
        if n.lease_age_s > max_lease_age_s:
            problems.append(f"node {n.node_id} last published {n.lease_age_s:.0f}s ago")
        if getattr(n.state, "value", n.state) == "failed":
            problems.append(f"node {n.node_id} failed")
    if state == "running":
        seen = sum(1 for n in status.nodes if n.node_rank is not None)
        if seen < status.num_nodes:
            problems.append(f"{status.num_nodes - seen} node(s) of round {status.generation} have no live status")
    return problems


def _health(ctl, args) -> int:
    status = ctl.status()
    problems = health_problems(status, args.max_lease_age)
    state = getattr(status.state, "value", status.state)
    if args.json:
        _emit({"healthy": not problems, "run_id": status.run_id, "state": state, "generation": status.generation,
               "world_size": status.world_size, "num_nodes": status.num_nodes, "problems": problems})
    elif problems:
        print(f"unhealthy: job {status.run_id}: " + "; ".join(problems), flush=True)
    else:
        print(f"ok: job {status.run_id} {state}, generation {status.generation}, "
              f"{status.num_nodes} nodes, world size {status.world_size}", flush=True)
    return EXIT_FAILED if problems else EXIT_OK


VERBS = {"status": _status, "scale": _scale, "set-range": _set_range, "drain": _drain, "undrain": _undrain,
         "stop": _stop, "events": _events, "health": _health}


def _run(args: argparse.Namespace) -> int:
    with connect(args) as ctl:
        return VERBS[args.verb](ctl, args)


def main(argv: Optional[List[str]] = None) -> int:
    """``elastic-run ctl VERB ...`` (``argv``: what follows ``ctl``)."""
    args = build_parser().parse_args(sys.argv[2:] if argv is None else argv)
    try:
        return run_command(PROG, lambda: _run(args))
    except BrokenPipeError:  # `elastic-run ctl events --follow | head`: no traceback at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
