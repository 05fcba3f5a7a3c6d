"""dataload through the real S3 endpoint (moto server, s3fs): write, cache fill, direct read."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dataload import (ChecksumError, ElasticNumpyLoader, ShardCache, ShardedDataset,
                      write_shards)
from needs import needs

pytestmark = needs("s3fs", "boto3", tools=["moto_server"], why="the s3 extra and the test extra's moto")
from paths import REPO  # noqa: E402


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_epoch_through_the_cache_from_s3(s3_bucket, tmp_path, fmt):
    bucket, opts = s3_bucket
    url = f"s3://{bucket}/ds-{fmt}"
    n = 600
    index = write_shards({"id": np.arange(n), "v": np.arange(n, dtype=np.float32) * 2}, url,
                         format=fmt, samples_per_shard=64, storage_options=opts)
    assert len(index.shards) == 10
    cache = ShardCache(str(tmp_path / "cache"), "16MiB", progress=False)
    ds = ShardedDataset(url, storage_options=opts, cache=cache)
    ids = []
    for batch in ElasticNumpyLoader(ds, 50, seed=9):
        np.testing.assert_array_equal(batch["v"], np.asarray(batch["id"], np.float32) * 2)
        ids.extend(batch["id"].tolist())
    assert sorted(ids) == list(range(n))
    assert sorted(os.listdir(tmp_path / "cache" / "shards")) == \
        sorted(s.sha256 + ("." + fmt if fmt == "parquet" else ".npz") for s in index.shards)


def test_direct_s3_read_verifies_checksums(s3_bucket, s3_server):
    bucket, opts = s3_bucket
    url = f"s3://{bucket}/ds"
    index = write_shards({"id": np.arange(100)}, url, samples_per_shard=50, storage_options=opts)
    ds = ShardedDataset(url, storage_options=opts)
    assert ds.get_batch([99, 0])["id"].tolist() == [99, 0]
    fs = s3_server.filesystem()
    key = f"{bucket}/ds/{index.shards[1].name}"
    data = bytearray(fs.cat_file(key))
    data[-5] ^= 1
    fs.pipe_file(key, bytes(data))
    fresh = ShardedDataset(url, storage_options=opts)
    assert fresh[10]["id"] == 10
    with pytest.raises(ChecksumError, match="shard-00001"):
        fresh[60]


def test_cli_writes_to_s3_and_warms_a_cache_with_progress(s3_bucket, tmp_path):
    bucket, opts = s3_bucket
    np.save(tmp_path / "arr.npy", np.arange(5000, dtype=np.int64).reshape(1000, 5))
    env = {**os.environ, "PYTHONPATH": REPO}
    cli = [sys.executable, "-m", "dataload.cli"]
    so = ["--storage-options", json.dumps(opts)]
    out = subprocess.run(cli + ["write", str(tmp_path / "arr.npy"), f"s3://{bucket}/arr",
                                "--samples-per-shard", "100"] + so,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    warm = subprocess.run(cli + ["warm", f"s3://{bucket}/arr", "--cache-dir",
                                 str(tmp_path / "cache"), "--cache-size", "10MiB"] + so,
                          capture_output=True, text=True, env=env, timeout=120)
    assert warm.returncode == 0, warm.stderr
    assert "cache fill: 10/10 shards" in warm.stderr
    assert len(os.listdir(tmp_path / "cache" / "shards")) == 10
    ds = ShardedDataset(f"s3://{bucket}/arr", storage_options=opts,
                        cache=ShardCache(str(tmp_path / "cache"), "10MiB", progress=False))
    assert ds[999]["data"].tolist() == list(range(4995, 5000))
