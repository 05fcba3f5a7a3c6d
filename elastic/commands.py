"""One convention for every console script's exit code.

``elastic-run``, ``elastic-rendezvous``, ``elastic-ckpt``, ``elastic-shards`` and ``elastic-prof``
run their body through :func:`run_command`: a :class:`~elastic.errors.UserError` (bad flags, a bad
URL, a wrong token) prints one line and exits 2; any other :class:`~elastic.errors.ElasticError`
(a store or storage that failed, a job that failed) prints one line and exits 1; Ctrl-C exits 130.
Anything else is a bug of ours and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

from .errors import ElasticError, UserError, one_line

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "run_command"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run ``body`` and map what it raises to an exit code and one line on stderr."""
    try:
        return body()
    except UserError as exc:
        print(f"{prog}: error: {one_line(exc, limit=1000)}", file=sys.stderr)
        return EXIT_USAGE
    except ElasticError as exc:
        print(f"{prog}: error: {one_line(exc, limit=1000)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
