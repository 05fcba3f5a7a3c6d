"""dataload in one process: formats, writer, index, sampler math, cache bound, loaders."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

import dataload
from dataload import (CacheTooSmallError, ChecksumError, DatasetIndexError, ElasticNumpyLoader,
                      ElasticSampler, SamplerStateError, ShardCache, ShardedDataset,
                      ShardFormatError, write_shards)
from elastic import World
from elastic.errors import UserError
from needs import require

from paths import REPO  # noqa: E402


def _columns(n: int) -> dict:
    rng = np.random.default_rng(0)
    return {
        "id": np.arange(n, dtype=np.int64),
        "x": rng.random((n, 2, 3), dtype=np.float32),
        "label": [f"label-{i}" for i in range(n)],
        "blob": [bytes([i % 256]) * (i % 7) for i in range(n)],
    }


@pytest.fixture
def npy_ds(tmp_path):
    url = str(tmp_path / "ds")
    write_shards(_columns(500), url, samples_per_shard=37)
    return url


# -- formats and writer -------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_roundtrip_columns_and_batches_across_shards(tmp_path, fmt):
    cols = _columns(300)
    index = write_shards(cols, str(tmp_path / "ds"), format=fmt, samples_per_shard=29)
    assert index.num_samples == 300 and len(index.shards) == 11
    assert [c.kind for c in index.columns] == ["array", "array", "str", "bytes"]
    ds = ShardedDataset(str(tmp_path / "ds"))
    s = ds[123]
    assert s["id"] == 123 and s["label"] == "label-123" and s["blob"] == cols["blob"][123]
    np.testing.assert_array_equal(s["x"], cols["x"][123])
    assert ds[-1]["id"] == 299
    picks = [250, 3, 3, 140, 29, 28, 299, 0]  # several shards, out of order, a repeat
    batch = ds.get_batch(picks)
    np.testing.assert_array_equal(batch["id"], picks)
    np.testing.assert_array_equal(batch["x"], cols["x"][picks])
    assert batch["label"] == [f"label-{i}" for i in picks]
    assert batch["blob"] == [cols["blob"][i] for i in picks]
    with pytest.raises(IndexError):
        ds[300]


def test_npz_shards_are_mapped_and_what_callers_get_is_their_own(tmp_path):
    cols = _columns(60)
    schema = dataload.formats.schema_of(cols)
    fmt = dataload.formats.get_format("npy")
    path = str(tmp_path / "s.npz")
    with open(path, "wb") as f:
        f.write(fmt.encode(cols, schema))
    shard = fmt.decode(path, schema)
    assert not shard.columns["x"].flags.writeable  # a read-only mapping, not a copy
    sample = shard.row(7)
    sample["x"][:] = -1  # a sample and a batch are the caller's to change
    batch = shard.take(np.array([7, 3]))
    batch["x"][:] = -1
    np.testing.assert_array_equal(fmt.decode(path, schema).take(np.array([7, 3]))["x"],
                                  cols["x"][[7, 3]])
    assert shard.row(59)["label"] == "label-59" and shard.row(59)["blob"] == cols["blob"][59]
    # The same bytes in memory (a direct remote read) decode the same way.
    with open(path, "rb") as f:
        np.testing.assert_array_equal(fmt.decode(f.read(), schema).columns["x"], cols["x"])
    # A compressed .npz made by other tools still loads (numpy's reader).
    np.savez_compressed(str(tmp_path / "z.npz"), id=cols["id"], x=cols["x"],
                        **{"label": np.frombuffer(b"".join(s.encode() for s in cols["label"]),
                                                  np.uint8),
                           "label@offsets": np.cumsum([0] + [len(s) for s in cols["label"]]),
                           "blob": np.frombuffer(b"".join(cols["blob"]), np.uint8),
                           "blob@offsets": np.cumsum([0] + [len(b) for b in cols["blob"]])})
    z = fmt.decode(str(tmp_path / "z.npz"), schema)
    assert z.row(11)["label"] == "label-11"
    np.testing.assert_array_equal(z.columns["x"], cols["x"])
    # A file rewritten in place is parsed again (its layout is kept by inode, size, mtime).
    half = {k: v[:30] for k, v in cols.items()}
    with open(path, "wb") as f:
        f.write(fmt.encode(half, schema))
    assert fmt.decode(path, schema).num_samples == 30
    np.testing.assert_array_equal(fmt.decode(path, schema).columns["x"], cols["x"][:30])
    # A truncated shard is an error, never garbage.
    with open(path, "rb") as f:
        head = f.read(os.path.getsize(path) // 2)
    with open(tmp_path / "cut.npz", "wb") as f:
        f.write(head)
    with pytest.raises(ShardFormatError):
        fmt.decode(str(tmp_path / "cut.npz"), schema)
    damaged = bytearray(fmt.encode(cols, schema))  # a member's .npy header overwritten
    at = damaged.find(b"\x93NUMPY") + 10
    damaged[at:at + 10] = b"garbage!!!"
    with open(tmp_path / "bad.npz", "wb") as f:
        f.write(bytes(damaged))
    with pytest.raises(ShardFormatError):
        fmt.decode(str(tmp_path / "bad.npz"), schema)


def test_parquet_table_and_file_sources(tmp_path):
    pa = require("pyarrow", "the parquet extra")
    pq = require("pyarrow.parquet", "the parquet extra")
    table = pa.table({"id": list(range(100)), "text": [f"t{i}" for i in range(100)],
                      "tags": [[i, i + 1] if i % 2 else [] for i in range(100)]})
    pq.write_table(table, str(tmp_path / "t.parquet"))
    for fmt in ("parquet", "npy"):
        src = str(tmp_path / "t.parquet") if fmt == "npy" else table
        if fmt == "npy":  # a list column has no npy form: a clear error, then without it
            with pytest.raises(ShardFormatError, match="parquet"):
                write_shards(src, str(tmp_path / fmt), format=fmt, samples_per_shard=30)
            src = table.drop_columns(["tags"])
        write_shards(src, str(tmp_path / fmt), format=fmt, samples_per_shard=30)
        ds = ShardedDataset(str(tmp_path / fmt))
        assert len(ds) == 100 and len(ds.shards) == 4
        assert ds[77]["id"] == 77 and ds[77]["text"] == "t77"
        if fmt == "parquet":
            assert ds[77]["tags"] == [77, 78] and ds[76]["tags"] == []


def test_folder_source_and_cli(tmp_path):
    src = tmp_path / "files"
    (src / "sub").mkdir(parents=True)
    payloads = {f"f{i}.bin": os.urandom(1000 + i) for i in range(12)}
    for name, data in payloads.items():
        (src / ("sub" if name < "f5" else "") / name).write_bytes(data) if False else \
            (src / name).write_bytes(data)
    (src / "sub" / "deep.txt").write_bytes(b"deep")
    env = {**os.environ, "PYTHONPATH": REPO}
    cli = [sys.executable, "-m", "dataload.cli"]
    out = subprocess.run(cli + ["write", str(src), str(tmp_path / "ds"), "--shard-size", "3KB"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote 13 samples" in out.stdout
    ds = ShardedDataset(str(tmp_path / "ds"))
    got = {ds[i]["name"]: ds[i]["data"] for i in range(len(ds))}
    assert got == {**payloads, "sub/deep.txt": b"deep"}
    info = subprocess.run(cli + ["info", str(tmp_path / "ds")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert "13 samples" in info.stdout and "data: bytes" in info.stdout
    again = subprocess.run(cli + ["write", str(src), str(tmp_path / "ds")], capture_output=True,
                           text=True, env=env, timeout=120)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"elastic-shards: error: {tmp_path / 'ds'} already holds a dataset; "
        "pass overwrite=True to replace it"]


def test_writer_and_index_errors(tmp_path):
    with pytest.raises(ShardFormatError, match="unknown shard format 'zip'"):
        write_shards({"a": np.zeros(3)}, str(tmp_path / "a"), format="zip")
    with pytest.raises(ShardFormatError, match="has 2 samples, others 3"):
        write_shards({"a": np.zeros(3), "b": np.zeros(2)}, str(tmp_path / "b"))
    with pytest.raises(ShardFormatError, match="no such file"):
        write_shards(str(tmp_path / "nope.parquet"), str(tmp_path / "c"))
    with pytest.raises(DatasetIndexError, match="index.json not found"):
        ShardedDataset(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{\"format\": \"other\"}")
    with pytest.raises(DatasetIndexError, match="not an elastic-shards index"):
        ShardedDataset(str(tmp_path / "bad"))
    assert issubclass(DatasetIndexError, UserError) and issubclass(ShardFormatError, UserError)


# -- the sampler --------------------------------------------------------------------------
def test_any_sequence_of_world_and_batch_changes_sees_each_sample_once():
    """Simulated ranks: the epoch is split exactly, whatever worlds and batches follow."""
    rnd = random.Random(7)
    for trial in range(200):
        n = rnd.randint(1, 400)
        sampler = ElasticSampler(n, 1, seed=trial, shard_sizes=_split(n, rnd), block_shards=2)
        order = sampler.order()
        seen = []
        while sampler.position < n:
            w, b = rnd.randint(1, 6), rnd.randint(1, 9)
            steps = rnd.randint(1, 4)
            per_rank = []
            for r in range(w):
                s = ElasticSampler(n, b, world=World(rank=r, world_size=w), seed=trial,
                                   shard_sizes=sampler.shard_sizes, block_shards=2)
                s.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
                per_rank.append(list(s.slices())[:steps])
            for k in range(steps):
                afters = {sl[k][2] for sl in per_rank if len(sl) > k}
                if not afters:
                    break
                assert len(afters) == 1, "ranks disagree on the global position"
                for sl in per_rank:
                    if len(sl) > k:
                        seen.extend(order[sl[k][0]:sl[k][1]].tolist())
                sampler.advance(afters.pop())
        assert sorted(seen) == list(range(n)), f"trial {trial}"


def _split(n, rnd):
    sizes = []
    while n:
        k = min(n, rnd.randint(1, 50))
        sizes.append(k)
        n -= k
    return sizes


def test_order_is_deterministic_per_seed_epoch_and_blocked_by_shards():
    sizes = [100] * 20
    a = ElasticSampler(2000, 8, seed=3, shard_sizes=sizes, block_shards=4)
    b = ElasticSampler(2000, 8, seed=3, shard_sizes=sizes, block_shards=4,
                       world=World(rank=1, world_size=2))
    np.testing.assert_array_equal(a.order(0), b.order(0))
    assert not np.array_equal(a.order(0), a.order(1))
    assert sorted(a.order(1).tolist()) == list(range(2000))
    for start in range(0, 2000, 400):  # each block of 4 shards' samples comes from 4 shards
        assert len(set((a.order(0)[start:start + 400] // 100).tolist())) == 4
    assert ElasticSampler(10, 2, shuffle=False).order().tolist() == list(range(10))


def test_drop_last_and_tail_split():
    rows = [list(dataload.rank_slices(10, 0, 3, r, 3)) for r in range(3)]
    assert rows[0] == [(0, 3, 9), (9, 10, 10)] and rows[1] == [(3, 6, 9)] and rows[2] == [(6, 9, 9)]
    assert [list(dataload.rank_slices(10, 0, 3, r, 3, True)) for r in range(3)] == \
        [[(0, 3, 9)], [(3, 6, 9)], [(6, 9, 9)]]
    s = ElasticSampler(10, 3, world=World(rank=1, world_size=3))
    assert len(s) == 1
    s.world = World(rank=0, world_size=3)
    assert len(s) == 2


def test_state_is_plain_json_and_rejects_another_dataset(npy_ds, tmp_path):
    ds = ShardedDataset(npy_ds)
    loader = ElasticNumpyLoader(ds, 16, seed=5, world=World(rank=1, world_size=3))
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = loader.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert (state["epoch"], state["position"], state["seed"]) == (0, 4 * 3 * 16, 5)
    write_shards(_columns(500), str(tmp_path / "other"), samples_per_shard=50)
    other = ElasticNumpyLoader(ShardedDataset(str(tmp_path / "other")), 16)
    with pytest.raises(SamplerStateError, match="another shard layout"):
        other.load_state_dict(state)
    with pytest.raises(SamplerStateError, match="of 9 samples, this one has 500"):
        ElasticNumpyLoader(ShardedDataset(npy_ds), 4).load_state_dict({**state, "num_samples": 9})
    with pytest.raises(SamplerStateError):
        loader.load_state_dict({"kind": "elastic-sampler", "version": 1})
    with pytest.raises(SamplerStateError, match="invalid sampler position"):
        loader.load_state_dict({**state, "position": 501})


def test_resume_deep_in_an_epoch_gives_the_remaining_order_without_replay(npy_ds):
    world = World(rank=2, world_size=3)
    full = ElasticNumpyLoader(ShardedDataset(npy_ds), 7, seed=11, world=world)
    batches = [b["id"].tolist() for b in full]
    assert full.state_dict()["epoch"] == 1
    # Walk an uninterrupted run to 90% of the epoch, then resume a fresh loader there.
    first = ElasticNumpyLoader(ShardedDataset(npy_ds), 7, seed=11, world=world)
    it = iter(first)
    k = int(len(batches) * 0.9)
    for _ in range(k):
        next(it)
    state = first.state_dict()
    ds = ShardedDataset(npy_ds)
    resumed = ElasticNumpyLoader(ds, 7, seed=0, world=world, prefetch_shards=0)
    resumed.load_state_dict(state)
    rest = iter(resumed)
    head = next(rest)["id"].tolist()
    # Only the shards of the first resumed batch were read: nothing was replayed.
    assert set(ds._open) == set(ds.shard_of(np.asarray(head)).tolist())
    assert [head] + [b["id"].tolist() for b in rest] == batches[k:]
    assert resumed.state_dict()["epoch"] == 1


def test_epoch_advances_and_an_end_position_starts_the_next_epoch(npy_ds):
    ds = ShardedDataset(npy_ds)
    loader = ElasticNumpyLoader(ds, 50)
    ids0 = np.concatenate([b["id"] for b in loader])
    assert sorted(ids0.tolist()) == list(range(500))
    assert (loader.epoch, loader.position) == (1, 0)
    ids1 = np.concatenate([b["id"] for b in loader])
    assert not np.array_equal(ids0, ids1) and sorted(ids1.tolist()) == list(range(500))
    loader.load_state_dict({**loader.state_dict(), "epoch": 4, "position": 500})
    assert len(np.concatenate([b["id"] for b in loader])) == 500 and loader.epoch == 6


def test_torch_loader_with_workers_counts_consumed_batches_not_prefetched(npy_ds, tmp_path):
    torch = require("torch")
    cache = ShardCache(str(tmp_path / "cache"), "10MiB", progress=False)
    ds = ShardedDataset(npy_ds, cache=cache)
    world = World(rank=0, world_size=2)
    ref = [b["id"].tolist() for b in dataload.ElasticDataLoader(ds, 8, world=world, seed=2)]
    loader = dataload.ElasticDataLoader(ds, 8, world=world, seed=2, num_workers=2,
                                        prefetch_factor=4)
    it = iter(loader)
    got = [next(it) for _ in range(3)]
    assert isinstance(got[0]["x"], torch.Tensor) and got[0]["x"].shape == (8, 2, 3)
    assert got[0]["label"][0].startswith("label-")
    state = loader.state_dict()
    assert state["position"] == 3 * 2 * 8
    del it
    again = dataload.ElasticDataLoader(ds, 8, world=world, num_workers=2)
    again.load_state_dict(state)
    rest = [b["id"].tolist() for b in again]
    assert [g["id"].tolist() for g in got] + rest == ref
    # A user collate_fn gets sample dicts, as with torch's DataLoader.
    custom = dataload.ElasticDataLoader(ds, 4, collate_fn=lambda xs: [x["id"] for x in xs])
    assert len(next(iter(custom))) == 4


def test_world_from_horovod_environment(monkeypatch, npy_ds):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOROVOD_RANK", "1")
    monkeypatch.setenv("HOROVOD_SIZE", "3")
    s = ElasticSampler(30, 2)
    assert (s.world.rank, s.world.world_size) == (1, 3)
    assert list(s.slices())[0] == (2, 4, 6)


# -- the cache ------------------------------------------------------------------------------
def test_cache_size_bound_holds_under_eviction_and_evicts_lru(tmp_path):
    url = str(tmp_path / "ds")
    index = write_shards({"x": np.arange(4000, dtype=np.int64)}, url, samples_per_shard=250)
    shard_bytes = max(s.size_bytes for s in index.shards)
    bound = 3 * shard_bytes + shard_bytes // 2  # room for three shards
    cache = ShardCache(str(tmp_path / "cache"), bound, progress=False)
    ds = ShardedDataset(url, cache=cache, max_open_shards=1)
    loader = ElasticNumpyLoader(ds, 64, prefetch_shards=2)
    seen = []
    for b in loader:
        seen.extend(b["x"].tolist())
        assert cache.usage_bytes() <= bound
        assert _dir_bytes(tmp_path / "cache") <= bound
    assert sorted(seen) == list(range(4000))
    # LRU: touch the oldest, fill a new one: the least recently used other shard goes.
    cache2 = ShardCache(str(tmp_path / "c2"), bound, progress=False)
    opener = lambda i: (lambda: open(os.path.join(url, index.shards[i].name), "rb"))  # noqa
    paths = [cache2.fetch(index.shards[i], opener(i)) for i in range(3)]
    os.utime(paths[1], (1, 1))
    os.utime(paths[2], (2, 2))
    os.utime(paths[0], (3, 3))
    assert cache2.get(index.shards[0]) is not None  # a hit touches it again
    st = os.stat(paths[0])  # by atime: the mtime, which readers key parsed layouts by, stays
    assert st.st_atime > 3 and st.st_mtime == 3
    cache2.fetch(index.shards[3], opener(3))
    assert [os.path.exists(p) for p in paths] == [True, False, True]


def _wait_cached(cache, shards, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not all(cache.contains(s, ".npz") for s in shards):
        assert time.monotonic() < deadline, "the prefetch never filled the next shards"
        time.sleep(0.01)


def test_prefetch_fills_the_next_shards_ahead_of_the_reader_and_no_further(tmp_path):
    url = str(tmp_path / "ds")
    index = write_shards({"id": np.arange(600, dtype=np.int64)}, url, samples_per_shard=50)
    shards = index.shards  # 12; unshuffled, batch 50: batch j reads shard j
    cache = ShardCache(str(tmp_path / "cache"), 1 << 30, progress=False)
    loader = ElasticNumpyLoader(ShardedDataset(url, cache=cache), 50, shuffle=False,
                                prefetch_shards=2)
    it = iter(loader)
    assert next(it)["id"][0] == 0
    _wait_cached(cache, shards[1:3])  # two ahead, filled in the background
    assert not any(cache.contains(s, ".npz") for s in shards[3:])
    assert next(it)["id"][0] == 50
    _wait_cached(cache, shards[3:4])
    assert not any(cache.contains(s, ".npz") for s in shards[4:])
    # A pass resumed deep in the epoch looks ahead from there, not from the start.
    cache2 = ShardCache(str(tmp_path / "cache2"), 1 << 30, progress=False)
    resumed = ElasticNumpyLoader(ShardedDataset(url, cache=cache2), 50, shuffle=False,
                                 prefetch_shards=2)
    resumed.load_state_dict(dict(loader.state_dict(), position=400))
    rit = iter(resumed)  # kept: an abandoned pass drops what it had queued
    assert next(rit)["id"][0] == 400
    _wait_cached(cache2, shards[8:11])
    assert not any(cache2.contains(s, ".npz") for s in shards[:8] + shards[11:])


def _dir_bytes(path) -> int:
    """Bytes on disk under ``path``; a file the prefetch thread evicts mid-walk counts as gone."""
    total = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except FileNotFoundError:
                pass
    return total


def test_checksum_mismatch_is_never_cached(tmp_path):
    url = str(tmp_path / "ds")
    index = write_shards({"x": np.arange(100)}, url, samples_per_shard=50)
    path = os.path.join(url, index.shards[1].name)
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    cache = ShardCache(str(tmp_path / "cache"), "1MiB", progress=False)
    ds = ShardedDataset(url, cache=cache)
    assert ds[0]["x"] == 0
    with pytest.raises(ChecksumError, match="shard-00001"):
        ds[60]
    assert cache.get(index.shards[1], ".npz") is None
    assert os.listdir(tmp_path / "cache" / "tmp") == []


def test_cache_too_small_and_a_stale_part_is_replaced(tmp_path):
    url = str(tmp_path / "ds")
    index = write_shards({"x": np.arange(1000)}, url, samples_per_shard=500)
    with pytest.raises(CacheTooSmallError, match="larger than the whole cache"):
        ShardedDataset(url, cache=ShardCache(str(tmp_path / "tiny"), 100, progress=False))[0]
    cache = ShardCache(str(tmp_path / "cache"), "1MiB", progress=False)
    info = index.shards[0]
    stale = tmp_path / "cache" / "tmp" / f"{info.sha256}.{info.size_bytes}.999999.0.part"
    stale.write_bytes(b"half a shard")  # a filler that died: nobody holds the shard's lock
    assert cache.usage_bytes() == info.size_bytes  # counted until someone looks at it
    path = cache.fetch(info, lambda: open(os.path.join(url, info.name), "rb"), ".npz")
    assert not stale.exists()
    assert open(path, "rb").read() == open(os.path.join(url, info.name), "rb").read()


def test_first_fill_reports_progress(npy_ds, tmp_path):
    reports = []
    cache = ShardCache(str(tmp_path / "cache"), "10MiB",
                       progress=dataload.FillProgress(reports.append, interval_s=0))
    ds = ShardedDataset(npy_ds, cache=cache)
    list(ElasticNumpyLoader(ds, 100))
    last = reports[-1]
    assert last.shards_done == last.shards_total == len(ds.shards)
    assert last.bytes_done == last.bytes_total == ds.index.size_bytes
    assert "cache fill: 14/14 shards" in last.describe()
    n = len(reports)
    list(ElasticNumpyLoader(ds, 100))  # a warm cache fills nothing
    assert len(reports) == n


def test_tf_dataset_adapter(npy_ds):
    tf = require("tensorflow")
    ds = ShardedDataset(npy_ds)
    tfl = dataload.to_tf_dataset(ds, 32, world=World(rank=0, world_size=2), seed=1)
    ids = []
    for i, batch in enumerate(tfl.dataset_tf):
        assert batch["x"].dtype == tf.float32 and batch["label"].dtype == tf.string
        ids.extend(batch["id"].numpy().tolist())
        if i == 2:
            state = tfl.state_dict(batch)
    assert state["position"] == 3 * 64
    other = dataload.to_tf_dataset(ds, 32, world=World(rank=1, world_size=2), seed=1)
    ids += [int(x) for b in other.dataset_tf for x in b["id"].numpy()]
    assert sorted(ids) == list(range(500))
