"""checkpoint: single-process behaviour on real files, memory:// and the real S3 endpoint."""
from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import uuid
import zlib

import numpy as np
import pytest

import checkpoint
from checkpoint import (CheckpointCorruptError, CheckpointError, CheckpointNotFoundError,
                        CheckpointStateError, CheckpointStorageError, CheckpointURLError,
                        CheckpointWriteError, Checkpointer, PerRank, StaleGenerationError)
from elastic.errors import ConfigError, UserError
from needs import require

from paths import REPO  # noqa: E402


@pytest.fixture
def memdir(monkeypatch):
    """A private node-memory directory (what /dev/shm/elastic-run is in production)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = os.path.join(base or os.environ.get("TMPDIR", "/tmp"), f"ckpt-test-{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("ELASTIC_CKPT_MEMORY_DIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "step": step,
        "weights": {"w": rng.standard_normal((64, 33)).astype(np.float32),
                    "b": np.arange(7, dtype=np.int64) * step},
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 4), np.float16),
        "scalar": np.float32(step / 2),
        "plain": {"lr": 0.1, "name": "run", "ids": [1, 2, (3, "x")], 5: None, "raw": b"\x00\xff",
                  "inf": float("inf")},
    }


def assert_state_equal(got, want):
    assert type(got) is type(want) or (isinstance(want, np.generic) and isinstance(got, np.generic))
    if isinstance(want, dict):
        assert list(got.keys()) == list(want.keys())
        for k in want:
            assert_state_equal(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert_state_equal(a, b)
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    else:
        assert got == want and type(got) is type(want)


@pytest.mark.parametrize("scheme", ["path", "file", "memory"])
def test_round_trip_latest_and_given_step(tmp_path, memdir, scheme):
    url = {"path": str(tmp_path / "ck"), "file": f"file://{tmp_path}/ck",
           "memory": f"memory://ck-{uuid.uuid4().hex[:8]}"}[scheme]
    with Checkpointer(url, keep=3) as ck:
        for step in (10, 20, 30, 40):
            ck.save(step, make_state(step))
        ck.wait()
        assert ck.steps() == [20, 30, 40]
        assert ck.latest_step() == 40
        assert [i.step for i in ck.list()] == [20, 30, 40]
        assert all(i.world_size == 1 and i.num_files == 1 for i in ck.list())
        assert_state_equal(ck.load(), make_state(40))
        assert ck.last_load.step == 40
        assert_state_equal(ck.load(step=20), make_state(20))
        assert ck.last_load.source == "storage"  # the memory tier holds only step 40
    fresh = Checkpointer(url, memory=False)
    assert_state_equal(fresh.load(), make_state(40))
    assert fresh.last_load.source == "storage"


def test_format_is_standard_safetensors_and_manifest_describes_everything(tmp_path, memdir):
    from safetensors.numpy import load_file

    root = tmp_path / "ck"
    with Checkpointer(str(root), generation=5) as ck:
        ck.save(3, make_state(3), blocking=True)
    sdir = root / "step-000000000003"
    manifest = json.loads((sdir / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["generation"] == 5 and manifest["world_size"] == 1
    (f,) = manifest["files"]
    data = (sdir / f["name"]).read_bytes()
    assert f["size_bytes"] == len(data)
    assert f["checksum"] == f"crc32:{zlib.crc32(data):08x}"
    assert struct.unpack("<Q", data[:8])[0] + 8 == 4096  # header padded to a page
    w = manifest["tensors"]["weights/w"]
    assert (w["dtype"], w["shape"], w["kind"]) == ("F32", [64, 33], "replicated")
    assert w["pieces"][0]["offsets"] == [0, 0] and w["pieces"][0]["file"] == f["name"]
    loaded = load_file(str(sdir / f["name"]))  # a standard tool reads our shard
    want = make_state(3)
    np.testing.assert_array_equal(loaded["weights/w"], want["weights"]["w"])
    np.testing.assert_array_equal(loaded["flags"], want["flags"])
    assert loaded["empty"].shape == (0, 4)
    # No pickle anywhere: every file is JSON or safetensors.
    for name in os.listdir(sdir):
        assert name.endswith((".json", ".safetensors")), name


def test_flipped_byte_is_detected_and_skipped(tmp_path, memdir):
    url = str(tmp_path / "ck")
    with Checkpointer(url, keep=3, memory=False) as ck:
        ck.save(1, make_state(1))
        ck.save(2, make_state(2), blocking=True)
    sdir = tmp_path / "ck" / "step-000000000002"
    (name,) = [n for n in os.listdir(sdir) if n.endswith(".safetensors")]
    with open(sdir / name, "r+b") as f:
        f.seek(4096 + 100)
        byte = f.read(1)
        f.seek(4096 + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    ck = Checkpointer(url, memory=False)
    with pytest.warns(RuntimeWarning, match="step 2 .* damaged .*checksum mismatch"):
        state = ck.load()
    assert_state_equal(state, make_state(1))
    assert ck.last_load.step == 1 and ck.last_load.skipped[0][0] == 2
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
        ck.load(step=2)
    assert ck.verify(1) == [] and "checksum mismatch" in ck.verify(2)[0]


def test_truncated_file_and_bad_manifest_fall_back(tmp_path, memdir):
    url = str(tmp_path / "ck")
    with Checkpointer(url, keep=3, memory=False) as ck:
        for s in (1, 2, 3):
            ck.save(s, make_state(s))
    step3 = tmp_path / "ck" / "step-000000000003"
    (name,) = [n for n in os.listdir(step3) if n.endswith(".safetensors")]
    with open(step3 / name, "r+b") as f:
        f.truncate(5000)
    (tmp_path / "ck" / "step-000000000002" / "manifest.json").write_text("{not json")
    ck = Checkpointer(url, memory=False)
    with pytest.warns(RuntimeWarning):
        state = ck.load()
    assert_state_equal(state, make_state(1))
    assert [s for s, _ in ck.last_load.skipped] == [3, 2]
    assert "truncated" in ck.last_load.skipped[0][1]


def test_memory_tier_is_used_in_process_and_a_memory_copy_is_not_trusted_when_stale(tmp_path, memdir):
    url = str(tmp_path / "ck")
    ck = Checkpointer(url, run_id="job1")
    ck.save(1, make_state(1), blocking=True)
    assert_state_equal(ck.load(), make_state(1))
    assert ck.last_load.source == "memory"
    # A newer step committed by someone else (no memory copy): storage must win.
    other = Checkpointer(url, run_id="job1", memory=False)
    other.save(2, make_state(2), blocking=True)
    assert_state_equal(ck.load(), make_state(2))
    assert ck.last_load.source == "storage"
    ck.drop_memory()
    assert_state_equal(ck.load(step=1), make_state(1))
    assert ck.last_load.source == "storage"


def test_keep_deletes_only_after_commit_and_cleans_abandoned_dirs(tmp_path, memdir):
    url = str(tmp_path / "ck")
    abandoned = tmp_path / "ck" / "step-000000000001"
    abandoned.mkdir(parents=True)
    (abandoned / "r00000-of-00001.g0.safetensors").write_bytes(b"partial")
    with Checkpointer(url, keep=1) as ck:
        ck.save(2, make_state(2), blocking=True)
        assert not abandoned.exists()
        assert ck.steps() == [2]
        ck.save(3, make_state(3), blocking=True)
        assert ck.steps() == [3]
        assert sorted(os.listdir(tmp_path / "ck")) == ["step-000000000003"]


def test_stale_generation_cannot_publish(tmp_path, memdir):
    url = str(tmp_path / "ck")
    current = {"gen": 3}
    with Checkpointer(url, generation=3, current_generation=lambda: current["gen"]) as ck:
        ck.save(1, make_state(1), blocking=True)
        current["gen"] = 4  # a new round formed without this writer
        with pytest.raises(StaleGenerationError, match="generation 3 is stale"):
            ck.save(2, make_state(2))
    # A newer generation published; an old writer that does not know it yet is refused at commit.
    with Checkpointer(url, generation=5, memory=False) as new:
        new.save(10, make_state(10), blocking=True)
    old = Checkpointer(url, generation=4, memory=False)
    old.save(11, make_state(11))
    with pytest.raises(StaleGenerationError, match="generation 5 is already published"):
        old.wait()
    old.close()
    reader = Checkpointer(url, memory=False)
    assert reader.steps() == [1, 10]
    assert reader.load()["step"] == 10


def test_background_error_surfaces_at_wait_and_next_save(tmp_path, memdir):
    root = tmp_path / "ck"
    ck = Checkpointer(str(root))
    root.write_text("not a directory")  # the writer cannot create step directories now
    ck.save(1, make_state(1))  # returns: only the copy into memory happens here
    with pytest.raises(CheckpointWriteError, match="step 1"):
        ck.wait()
    ck.save(2, make_state(2))
    with pytest.raises(CheckpointWriteError, match="step 2"):
        ck.save(3, make_state(3))
    ck.wait()  # the error was reported once; nothing pending now
    ck.close()


def test_staging_bound_writes_directly_and_blocks(tmp_path, memdir):
    url = str(tmp_path / "ck")
    ck = Checkpointer(url, staging_bytes=1024)
    state = make_state(4)
    ck.save(4, state)  # larger than the bound: written from the tensors, committed on return
    assert ck.steps() == [4]
    assert_state_equal(ck.load(), state)
    assert ck.last_load.source == "storage"  # nothing was staged in node memory
    ck.close()


def test_save_copies_so_later_mutation_does_not_leak(tmp_path, memdir):
    url = str(tmp_path / "ck")
    state = make_state(1)
    with Checkpointer(url) as ck:
        ck.save(1, state)
        state["weights"]["w"][:] = -1  # training goes on while the writer persists
        state["plain"]["lr"] = 99
    got = Checkpointer(url, memory=False).load()
    assert_state_equal(got, make_state(1))


def test_load_into_target_arrays_in_place(tmp_path, memdir):
    url = str(tmp_path / "ck")
    with Checkpointer(url) as ck:
        ck.save(1, make_state(1), blocking=True)
    w = np.zeros((64, 33), np.float32)
    got = Checkpointer(url, memory=False).load(target={"weights": {"w": w}})
    assert got["weights"]["w"] is w
    np.testing.assert_array_equal(w, make_state(1)["weights"]["w"])
    with pytest.raises(CheckpointStateError, match="shape"):
        Checkpointer(url, memory=False).load(target={"weights": {"w": np.zeros((3, 3), np.float32)}})
    with pytest.raises(CheckpointStateError, match="does not hold"):
        Checkpointer(url, memory=False).load(target={"nope": np.zeros(3)})


def test_bad_urls_missing_checkpoints_and_bad_state_give_clear_errors(tmp_path, memdir):
    with pytest.raises(CheckpointURLError, match="Protocol not known: nope") as info:
        Checkpointer("nope://somewhere")
    assert isinstance(info.value, UserError)
    with pytest.raises(CheckpointURLError, match="non-empty"):
        Checkpointer("")
    with pytest.raises(CheckpointURLError, match=r"s3://: names no bucket; use s3://BUCKET"):
        Checkpointer("s3://")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CheckpointStorageError, match=f"ftp://127.0.0.1:{port}/x: cannot open the "
                                                     f"storage: ConnectionRefusedError"):
        Checkpointer(f"ftp://127.0.0.1:{port}/x")
    path_url = Checkpointer(tmp_path / "as-path", memory=False)  # os.PathLike works as a URL
    assert path_url.url == str(tmp_path / "as-path")
    path_url.save(1, {"x": np.ones(2)}, blocking=True)
    assert Checkpointer(str(tmp_path / "as-path"), memory=False).steps() == [1]
    with pytest.raises(ConfigError, match="keep"):
        Checkpointer(str(tmp_path / "a"), keep=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        Checkpointer(str(tmp_path / "file"))
    ck = Checkpointer(str(tmp_path / "empty"))
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at") as info:
        ck.load()
    assert isinstance(info.value, UserError)
    ck.save(1, {"x": np.ones(2)}, blocking=True)
    with pytest.raises(CheckpointNotFoundError, match=r"step 7 .*committed steps: 1"):
        ck.load(step=7)
    with pytest.raises(CheckpointStateError, match=r"'obj'.*neither a tensor"):
        ck.save(2, {"obj": object()})
    with pytest.raises(CheckpointStateError, match="dict key"):
        ck.save(2, {("tuple", "key"): 1})
    with pytest.raises(CheckpointStateError, match="complex"):
        ck.save(2, {"c": np.ones(2, np.complex64)})
    with pytest.raises(CheckpointStateError, match="step must be"):
        ck.save(-1, {})
    ck.close()


def test_torch_model_optimizer_scheduler_round_trip(tmp_path, memdir):
    torch = require("torch")

    def build():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        opt = torch.optim.AdamW(m.parameters(), lr=0.01)
        return m, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    model, opt, sched = build()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        sched.step()
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
             "rng": PerRank({"torch": torch.get_rng_state(), "np": np.random.get_state()}),
             "half": torch.randn(5, 5).to(torch.bfloat16), "mask": torch.tensor([True, False])}
    url = str(tmp_path / "ck")
    with Checkpointer(url) as ck:
        ck.save(3, state, blocking=True)
    for memory in (True, False):
        out = Checkpointer(url, memory=memory).load()
        m2, opt2, sched2 = build()
        m2.load_state_dict(out["model"])
        opt2.load_state_dict(out["optim"])  # int keys of optimizer state survived
        sched2.load_state_dict(out["sched"])
        for k, v in model.state_dict().items():
            assert torch.equal(v, m2.state_dict()[k])
        a, b = opt.state_dict(), opt2.state_dict()
        assert a["param_groups"] == b["param_groups"]
        assert sorted(a["state"]) == sorted(b["state"]) == [0, 1, 2, 3]
        for i in a["state"]:
            for k in a["state"][i]:
                assert torch.equal(a["state"][i][k], b["state"][i][k])
        assert sched2.state_dict() == sched.state_dict()
        assert out["half"].dtype == torch.bfloat16 and torch.equal(out["half"], state["half"])
        assert torch.equal(out["rng"]["torch"], state["rng"].value["torch"])
        np_state = out["rng"]["np"]
        assert np_state[0] == "MT19937" and np.array_equal(np_state[1], state["rng"].value["np"][1])
        # Loading in place into a live model's parameters.
        m3, _, _ = build()
        Checkpointer(url, memory=memory).load(target={"model": dict(m3.named_parameters())})
        assert torch.equal(m3[0].weight, model[0].weight)


def test_tensorflow_variables_round_trip(tmp_path, memdir):
    tf = require("tensorflow")
    from checkpoint.frameworks import tf_variables

    def build():
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3)])
        opt = tf.keras.optimizers.Adam(0.1)
        opt.build(model.trainable_variables)
        return model, opt

    model, opt = build()
    x = tf.random.normal((8, 4))
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))
    url = str(tmp_path / "ck")
    with Checkpointer(url) as ck:
        ck.save(2, {"tf": tf_variables(model=model, optimizer=opt), "t": tf.constant([1.0, 2.0])},
                blocking=True)
    model2, opt2 = build()
    out = Checkpointer(url, memory=False).load(target={"tf": tf_variables(model=model2, optimizer=opt2)})
    for a, b in zip(model.variables + opt.variables, model2.variables + opt2.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert isinstance(out["t"], tf.Tensor) and out["t"].numpy().tolist() == [1.0, 2.0]


def test_s3_round_trip_keep_and_corruption(s3_bucket, memdir):
    bucket, options = s3_bucket
    url = f"s3://{bucket}/runs/a"
    with Checkpointer(url, keep=2, storage_options=options) as ck:
        for s in (1, 2, 3):
            ck.save(s, make_state(s))
        ck.wait()
        assert ck.steps() == [2, 3]
    reader = Checkpointer(url, storage_options=options, memory=False)
    assert_state_equal(reader.load(), make_state(3))
    assert reader.last_load.source == "storage"
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    (data,) = [p for p in fs.ls(f"{bucket}/runs/a/step-000000000003") if p.endswith(".safetensors")]
    blob = bytearray(fs.cat_file(data))
    blob[-1] ^= 0xFF
    fs.pipe_file(data, bytes(blob))
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        assert_state_equal(reader.load(), make_state(2))
    # The CLI sees the same thing over S3.
    res = subprocess.run(
        [sys.executable, "-m", "checkpoint", "inspect", url, "-o", f"key={options['key']}",
         "-o", f"secret={options['secret']}",
         "-o", f"client_kwargs.endpoint_url={options['client_kwargs']['endpoint_url']}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "CORRUPT" in res.stdout and " ok" in res.stdout


def test_unreachable_object_store_gives_one_clear_storage_error(memdir):
    with socket.socket() as s:  # an endpoint nobody listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    options = {"key": "k", "secret": "s",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    ck = Checkpointer("s3://bucket/run", storage_options=options, memory=False)
    with pytest.raises(CheckpointStorageError, match=r"^s3://bucket/run: EndpointConnectionError: "
                                                     r"Could not connect") as info:
        ck.load()
    assert "\n" not in str(info.value)
    ck.save(1, {"x": np.ones(2)})
    with pytest.raises(CheckpointWriteError, match="step 1 .* failed"):
        ck.wait()
    ck.close()


def test_cli_inspect_lists_verifies_and_reports_errors(tmp_path, memdir):
    url = str(tmp_path / "ck")
    with Checkpointer(url, keep=3, generation=2) as ck:
        ck.save(5, make_state(5))
        ck.save(6, make_state(6), blocking=True)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "checkpoint", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120)

    res = run("inspect", url, "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["checkpoints"]
    assert [(r["step"], r["generation"], r["status"]) for r in rows] == [(5, 2, "ok"), (6, 2, "ok")]
    sdir = tmp_path / "ck" / "step-000000000006"
    (name,) = [n for n in os.listdir(sdir) if n.endswith(".safetensors")]
    with open(sdir / name, "r+b") as f:
        f.seek(4200)
        b = f.read(1)
        f.seek(4200)
        f.write(bytes([b[0] ^ 0x80]))
    res = run("inspect", url)
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert lines[1].split()[0] == "5" and lines[1].endswith("ok")
    assert lines[2].split()[0] == "6" and lines[2].endswith("CORRUPT")
    assert "checksum mismatch" in res.stdout
    res = run("inspect", "nope://x")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "Protocol not known" in res.stderr and "Traceback" not in res.stderr
    res = run("inspect", str(tmp_path / "nothing"))
    assert res.returncode == 1 and "no checkpoints at" in res.stdout


def test_import_is_light():
    code = ("import sys, checkpoint; heavy = [m for m in ('torch', 'tensorflow', 's3fs') "
            "if m in sys.modules]; print(heavy)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.strip() == "[]", res.stderr
    assert checkpoint.Checkpointer is Checkpointer


def test_crc32_and_crc32_combine_match_zlib():
    from checkpoint._storage import crc32, crc32_combine

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 1 << 16, dtype=np.uint8).tobytes()
    assert crc32(data) == zlib.crc32(data)  # zlib-ng's where installed: the same values
    assert crc32(data[100:], crc32(data[:100])) == zlib.crc32(data)
    for cut in (0, 1, 7, 4096, 30_000, len(data)):
        a, b = data[:cut], data[cut:]
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)


def test_load_checksums_ranges_in_parallel_and_maps_copy_on_write(tmp_path, memdir, monkeypatch):
    import checkpoint._storage as storage

    monkeypatch.setattr(storage, "_CRC_PART_BYTES", 4096)  # split even this small file
    url = str(tmp_path / "ck")
    with Checkpointer(url, keep=3, memory=False) as ck:
        ck.save(1, make_state(1))
        ck.save(2, make_state(2), blocking=True)
    sdir = tmp_path / "ck" / "step-000000000002"
    (name,) = [n for n in os.listdir(sdir) if n.endswith(".safetensors")]
    assert os.path.getsize(sdir / name) >= 3 * 4096  # checksummed as several ranges
    reader = Checkpointer(url, memory=False)
    got = reader.load()
    assert_state_equal(got, make_state(2))
    # Loaded arrays are writable; writing them changes neither the file nor another load.
    got["weights"]["w"][:] = 7
    assert reader.verify(2) == []
    assert_state_equal(Checkpointer(url, memory=False).load(), make_state(2))
    # Saving the same step again writes a new file: arrays loaded before keep their bytes.
    with Checkpointer(url, keep=3, memory=False) as again:
        again.save(2, make_state(5), blocking=True)
    assert_state_equal(got["weights"]["b"], make_state(2)["weights"]["b"])
    assert_state_equal(Checkpointer(url, memory=False).load()["weights"], make_state(5)["weights"])
    # A flipped byte in the last range is caught like one in the first.
    for offset in (os.path.getsize(sdir / name) - 1, 4096 + 5):
        with open(sdir / name, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x10]))
        with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
            Checkpointer(url, memory=False).load(step=2)
        with open(sdir / name, "r+b") as f:
            f.seek(offset)
            f.write(byte)
    assert Checkpointer(url, memory=False).verify(2) == []


def test_memory_tier_maps_the_snapshot_and_a_later_save_never_changes_loaded_tensors(tmp_path,
                                                                                     memdir):
    import gc

    from checkpoint import _memory

    url = str(tmp_path / "ck")
    ck = Checkpointer(url, run_id="job1")
    ck.save(1, make_state(1), blocking=True)
    got = ck.load()
    assert ck.last_load.source == "memory"
    got["weights"]["w"][0, 0] = 123.0  # writable, and private to this load
    again = Checkpointer(url, run_id="job1")  # a second reader maps it too (shared lock)
    assert_state_equal(again.load()["weights"]["w"], make_state(1)["weights"]["w"])
    assert again.last_load.source == "memory"
    slot = os.path.join(ck._memory_dir, "slot.bin")
    held = os.stat(slot).st_ino
    ck.save(2, make_state(2), blocking=True)  # the loaded arrays hold the old slot file
    assert os.stat(slot).st_ino != held
    want = make_state(1)
    want["weights"]["w"][0, 0] = 123.0
    assert_state_equal(got, want)
    assert_state_equal(ck.load(), make_state(2))
    assert ck.last_load.source == "memory"
    del got
    gc.collect()
    reused = os.stat(slot).st_ino
    ck.save(3, make_state(3), blocking=True)  # nobody maps it now: filled in place again
    assert os.stat(slot).st_ino == reused
    # While a writer fills the slot (lock held, no description yet), readers use storage.
    writer = _memory.Slot(ck._memory_dir)
    writer.reserve(10)
    assert _memory.read_snapshot(ck._memory_dir) is None
    writer.close()
    assert_state_equal(ck.load(), make_state(3))
    assert ck.last_load.source == "storage"
    ck.close()
