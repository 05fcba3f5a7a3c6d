"""``elastic-ckpt`` / ``python -m checkpoint``: list checkpoints and verify their checksums."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from elastic.commands import run_command
from elastic.errors import UserError

from .errors import CheckpointStorageError

__all__ = ["main"]


def _parse_options(pairs: Sequence[str]) -> Dict[str, Any]:
    """``a.b=v`` pairs -> nested dict; values are JSON when they parse, else strings."""
    out: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"storage option must be KEY=VALUE, got {pair!r}")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parsed
    return out


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _inspect(args: argparse.Namespace) -> int:
    from .checkpointer import Checkpointer

    ck = Checkpointer(args.url, storage_options=_parse_options(args.option), rank=0,
                      world_size=1, memory=False)
    try:
        infos = ck.list()
        broken_manifests = sorted(set(ck.steps()) - {i.step for i in infos})
        rows: List[Dict[str, Any]] = []
        bad = 0
        for info in infos:
            problems = ck.verify(info.step) if args.verify else []
            bad += bool(problems)
            rows.append({"step": info.step, "generation": info.generation,
                         "world_size": info.world_size, "files": info.num_files,
                         "size_bytes": info.size_bytes, "created_unix_s": info.created_unix_s,
                         "status": ("CORRUPT" if problems else "ok" if args.verify else "unverified"),
                         "problems": problems, "path": info.path})
        for step in broken_manifests:
            bad += 1
            rows.append({"step": step, "status": "CORRUPT", "problems": ["unreadable manifest"]})
        rows.sort(key=lambda r: r["step"])
    finally:
        ck.close()
    if args.json:
        print(json.dumps({"url": args.url, "checkpoints": rows}))
    elif not rows:
        print(f"no checkpoints at {args.url}")
    else:
        print(f"{'step':>12}  {'gen':>5}  {'world':>5}  {'files':>5}  {'size':>10}  "
              f"{'created':19}  status")
        for r in rows:
            created = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_unix_s"]))
                       if "created_unix_s" in r else "?")
            print(f"{r['step']:>12}  {r.get('generation', '?'):>5}  {r.get('world_size', '?'):>5}  "
                  f"{r.get('files', '?'):>5}  {_human(r['size_bytes']) if 'size_bytes' in r else '?':>10}  "
                  f"{created:19}  {r['status']}")
            for p in r["problems"]:
                print(f"{'':>14}{p}")
    if not rows:
        return 1
    return 1 if bad else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="elastic-ckpt", description="Inspect elastic-run checkpoints on any fsspec URL.")
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="list checkpoints and verify every file's checksum")
    ins.add_argument("url", help="checkpoint root: a path, file://, memory://, s3://...")
    ins.add_argument("--no-verify", dest="verify", action="store_false",
                     help="list only; do not read the files to check sizes and checksums")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                     help="fsspec storage option (dots nest: client_kwargs.endpoint_url=...)")
    args = parser.parse_args(argv)
    return run_command("elastic-ckpt", lambda: _inspect_storage(args))


def _inspect_storage(args) -> int:
    try:
        return _inspect(args)
    except OSError as exc:  # storage the URL names but we cannot read: one line, exit 1
        raise CheckpointStorageError(f"{args.url}: {exc}") from exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
