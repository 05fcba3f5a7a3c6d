"""``elastic-prof``: summarise profiler output.

``elastic-prof report RUN_DIR`` prints per-phase p50/p95, throughput, MFU and stragglers, and
writes PNG plots (step time per rank, phase breakdown) to ``RUN_DIR/report`` (or ``--out``).
User mistakes print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from elastic.commands import run_command

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastic-prof", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="summarise a run directory and plot it")
    rep.add_argument("run_dir", help="directory holding rank-*.jsonl files (searched recursively)")
    rep.add_argument("--out", help="where to write PNG plots (default: RUN_DIR/report)")
    rep.add_argument("--threshold", type=float, default=0.1,
                     help="straggler threshold: busy time above the median by this fraction "
                          "(default 0.1)")
    rep.add_argument("--warmup", type=int, default=2,
                     help="leave out each rank's first N steps (default 2)")
    rep.add_argument("--no-plots", action="store_true", help="print the summary only")
    rep.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return parser


def _report(args: argparse.Namespace) -> int:
    from .report import format_summary, summarize, write_plots

    summary = summarize(args.run_dir, threshold_frac=args.threshold, warmup_steps=args.warmup)
    plots: List[str] = []
    if not args.no_plots:
        plots = write_plots(args.run_dir, args.out or os.path.join(args.run_dir, "report"),
                            warmup_steps=args.warmup)
    if args.json:
        out = summary.to_json()
        out["plots"] = plots
        print(json.dumps(out))
    else:
        print(format_summary(summary))
        if plots:
            print("plots: " + ", ".join(plots))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_command("elastic-prof", lambda: _report(args))


if __name__ == "__main__":
    sys.exit(main())
