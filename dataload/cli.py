"""``elastic-shards``: write a sharded dataset, show its index, warm a node cache.

::

    elastic-shards write ./images s3://bucket/images --shard-size 64MiB
    elastic-shards write table.parquet /data/ds --format parquet --samples-per-shard 10000
    elastic-shards info s3://bucket/images
    elastic-shards warm s3://bucket/images --cache-dir /local/cache --cache-size 50GiB
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

from elastic.commands import run_command
from elastic.errors import ConfigError

from .cache import FillProgress, ShardCache, parse_size
from .dataset import ShardedDataset
from .writer import write_shards

__all__ = ["main"]


def _options(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--storage-options must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError("--storage-options must be a JSON object")
    return value


def _print_stats(stats) -> None:
    print(stats.describe(), file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="elastic-shards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="turn a folder, .parquet, .npy or .npz into shards")
    w.add_argument("source")
    w.add_argument("dest", help="any fsspec URL: a path, s3://bucket/prefix, ...")
    w.add_argument("--format", default="npy", choices=["npy", "parquet"])
    w.add_argument("--samples-per-shard", type=int)
    w.add_argument("--shard-size", default="64MiB", help="target shard size (default 64MiB)")
    w.add_argument("--overwrite", action="store_true")
    for cmd in (sub.add_parser("info", help="show a dataset's index"),
                sub.add_parser("warm", help="fill a node cache with a whole dataset")):
        cmd.add_argument("url")
        if cmd.prog.endswith("warm"):
            cmd.add_argument("--cache-dir", required=True)
            cmd.add_argument("--cache-size", required=True, help="e.g. 50GiB")
            cmd.add_argument("--threads", type=int, default=4)
    for cmd in sub.choices.values():
        cmd.add_argument("--storage-options", help="JSON object passed to fsspec")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_command("elastic-shards", lambda: _run(args))


def _run(args) -> int:
    opts = _options(args.storage_options)
    if args.command == "write":
        index = write_shards(args.source, args.dest, format=args.format,
                             samples_per_shard=args.samples_per_shard,
                             shard_size_bytes=parse_size(args.shard_size),
                             storage_options=opts, overwrite=args.overwrite)
        print(f"wrote {index.num_samples} samples in {len(index.shards)} {index.shard_format} "
              f"shards ({index.size_bytes} bytes) to {args.dest}")
    elif args.command == "info":
        ds = ShardedDataset(args.url, storage_options=opts)
        idx = ds.index
        print(f"{args.url}: {idx.num_samples} samples, {len(idx.shards)} {idx.shard_format} "
              f"shards, {idx.size_bytes} bytes")
        for col in idx.columns:
            shape = f" {tuple(col.shape)}" if col.shape else ""
            print(f"  {col.name}: {col.kind}{' ' + col.dtype if col.dtype else ''}{shape}")
    else:
        progress = FillProgress(_print_stats, interval_s=1.0)
        cache = ShardCache(args.cache_dir, parse_size(args.cache_size), progress=progress)
        ds = ShardedDataset(args.url, storage_options=opts, cache=cache)
        if ds.index.size_bytes > cache.max_bytes:
            raise ConfigError(f"the dataset ({ds.index.size_bytes} bytes) does not fit in "
                              f"the cache ({cache.max_bytes} bytes)")
        with ThreadPoolExecutor(max(1, args.threads)) as pool:
            list(pool.map(ds.prefetch, range(len(ds.index.shards))))
        stats = progress.stats()
        print(f"cached {len(ds.index.shards)} shards of {args.url} in {args.cache_dir} "
              f"({stats.shards_done} filled now, {stats.bytes_done} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
