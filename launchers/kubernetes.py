"""Kubernetes: the pod's side of an ``elastic-run`` job (``examples/kubernetes/``).

A PyTorchJob (Kubeflow training operator) or a JobSet runs one ``elastic-run`` per pod; the
operator's ``PET_*`` variables are read by elastic-run's own parser (``PET_NNODES``,
``PET_RDZV_ENDPOINT``, ``PET_RDZV_ID``, ``PET_RDZV_BACKEND``, ``PET_MAX_RESTARTS``,
``PET_CONTROL_PORT``, ``PET_DRAIN_GRACE``, ...), the token from a Secret as
``ELASTIC_RDZV_TOKEN``. This module is what the kubelet runs *inside* the container for the
probes and the ``preStop`` hook::

    python -m launchers.kubernetes healthz          # livenessProbe: exit 0 while the agent lives
    python -m launchers.kubernetes readyz           # readinessProbe: exit 0 while it trains
    python -m launchers.kubernetes drain --deadline 45 --reason preemption   # lifecycle.preStop

Why ``exec`` and not ``httpGet``: the kubelet sends an ``httpGet`` probe or hook to the pod's
IP, not to its loopback, and off loopback the agent's control port asks every request for the
job's token, which an ``httpGet``'s ``httpHeaders`` cannot read from a Secret (they are literal
strings in the manifest). From inside the container the control port is on 127.0.0.1 and no
token is involved. The port is ``--port``, else ``$PET_CONTROL_PORT`` (what ``elastic-run``
itself reads), else ``$ELASTIC_CONTROL_PORT``. Stdlib only: a probe starts in a fraction of a
second and imports no framework.

Exit codes: 0 the answer was what the probe or hook wanted, 1 it was not (or the agent did not
answer), 2 bad input (one line).
"""
from __future__ import annotations

import argparse
import http.client
import os
import sys
from typing import List, Optional, Tuple
from urllib.parse import urlencode

__all__ = ["main", "control_port", "request"]

DRAIN_REASONS = ("preemption", "maintenance", "scale_down")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def control_port(given: Optional[str] = None) -> int:
    """The agent's control port: ``given``, else ``$PET_CONTROL_PORT``, else ``$ELASTIC_CONTROL_PORT``."""
    raw = given if given is not None else os.environ.get("PET_CONTROL_PORT") or os.environ.get("ELASTIC_CONTROL_PORT")
    if raw is None or not str(raw).strip():
        raise ValueError("no control port: pass --port or set PET_CONTROL_PORT (elastic-run --control-port)")
    try:
        port = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"control port {raw!r}: expected a port number") from None
    if not 0 < port < 65536:
        raise ValueError(f"control port {port}: expected 1-65535")
    return port


def request(method: str, path: str, port: int, host: str = "127.0.0.1", timeout_s: float = 5.0) -> Tuple[int, str]:
    """One request to the agent's control port: (status, first line of the body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request(method, path, headers={"Content-Length": "0"} if method == "POST" else {})
        resp = conn.getresponse()
        body = resp.read(4096).decode("utf-8", "replace").strip()
        return resp.status, (body.splitlines() or [""])[0]
    finally:
        conn.close()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m launchers.kubernetes",
                description="Probes and the preStop drain of a pod that runs elastic-run (exec handlers).")
    sub = p.add_subparsers(dest="verb", required=True)
    for verb, what in (("healthz", "liveness: 0 while the agent loop is alive"),
                       ("readyz", "readiness: 0 while the node runs its workers in a closed round")):
        s = sub.add_parser(verb, help=what)
        s.add_argument("--port", default=None, help="the control port (default $PET_CONTROL_PORT)")
        s.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    d = sub.add_parser("drain", help="preStop: drain this node (its workers save, it leaves, exit 75)")
    d.add_argument("--port", default=None, help="the control port (default $PET_CONTROL_PORT)")
    d.add_argument("--deadline", type=float, default=None,
                   help="seconds the drain may take before the workers are killed (default: elastic-run's "
                        "--drain-grace); keep it inside terminationGracePeriodSeconds")
    d.add_argument("--reason", default="preemption", choices=DRAIN_REASONS)
    d.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "launchers.kubernetes"
    try:
        port = control_port(args.port)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.verb == "drain":
        if args.deadline is not None and not args.deadline >= 0:
            print(f"{prog}: --deadline {args.deadline}: expected seconds >= 0", file=sys.stderr)
            return 2
        query = {"reason": args.reason}
        if args.deadline is not None:
            query["deadline_s"] = f"{args.deadline:g}"
        method, path, wanted = "POST", "/drain?" + urlencode(query), (202,)
    else:
        method, path, wanted = "GET", "/" + args.verb, (200,)
    try:
        status, line = request(method, path, port, timeout_s=args.timeout)
    except OSError as exc:  # refused, reset, timed out: the agent is not there (or not yet)
        print(f"{prog}: {args.verb}: no answer from the agent on 127.0.0.1:{port}: {exc}", file=sys.stderr)
        return 1
    if status in wanted:
        print(f"{args.verb}: {status} {line}")
        return 0
    if args.verb == "drain" and status == 409:  # the node has ended already: nothing left to drain
        print(f"{args.verb}: {status} {line}")
        return 0
    print(f"{prog}: {args.verb}: {status} {line}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
