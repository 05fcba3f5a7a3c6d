"""What the two chaos workloads share: the data, the model, the step's shape and the checksum.

The data is synthetic and deterministic: ``NUM_SAMPLES`` samples of ``FEATURES`` floats, a label
from a fixed random linear map, and an ``id`` column (the sample's index) that the step log
records. A global batch of ``GLOBAL_BATCH`` (60: divisible by every world size 1..6, so each
rank takes ``GLOBAL_BATCH // world`` samples and an epoch is ``STEPS_PER_EPOCH`` steps at any
world size, with no padding and no tail).
"""
from __future__ import annotations

import os
import sys
import time
import zlib

import numpy as np

NUM_SAMPLES = 3000
FEATURES = 32
CLASSES = 10
GLOBAL_BATCH = 60
STEPS_PER_EPOCH = NUM_SAMPLES // GLOBAL_BATCH
DATA_SEED = 1234
MODEL_SEED = 0

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_repo_to_path() -> None:
    """Make ``benchmarks.chaos`` and the product's packages importable from a worker script."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


def arrays() -> dict:
    """The dataset's columns: ``x`` float32 (N, F), ``y`` int64 (N,), ``id`` int64 (N,)."""
    rng = np.random.default_rng(DATA_SEED)
    x = rng.standard_normal((NUM_SAMPLES, FEATURES)).astype(np.float32)
    w = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
    y = np.argmax(x @ w, axis=1).astype(np.int64)
    return {"x": x, "y": y, "id": np.arange(NUM_SAMPLES, dtype=np.int64)}


def write_dataset(url: str) -> None:
    """Write the dataset as ``dataload`` shards at ``url`` (10 shards), once."""
    import dataload

    if os.path.exists(os.path.join(url, "index.json")):
        return
    dataload.write_shards(arrays(), url, samples_per_shard=NUM_SAMPLES // 10)


def build_model():
    import torch
    import torch.nn as nn

    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(nn.Linear(FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, CLASSES))


def build_optimizer(model):
    import torch

    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def param_checksum(model) -> str:
    """CRC32 (hex) of every parameter's bytes in order: equal across ranks of a DDP job."""
    crc = 0
    for p in model.parameters():
        crc = zlib.crc32(p.detach().contiguous().numpy().tobytes(), crc)
    return f"{crc:08x}"


def per_rank_batch(world_size: int) -> int:
    if GLOBAL_BATCH % world_size:
        raise SystemExit(f"the global batch {GLOBAL_BATCH} does not split over {world_size} ranks")
    return GLOBAL_BATCH // world_size


class Pacer:
    """Makes a step last about ``step_s``: before the step's real work (a few ms here, plus the
    all-reduce) it sleeps ``step_s`` minus what the last step's work took, at least half of it.
    The sleep stands for compute, so a step costs about the same on a loaded 2-core machine,
    and a step's line is written right after its optimizer step (nothing runs in between that a
    SIGKILL could land in with the step done but not logged)."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.work_s = 0.0

    def compute(self) -> None:
        time.sleep(max(self.step_s / 2, self.step_s - self.work_s))
        self._t = time.time()

    def done(self) -> float:
        now = time.time()
        self.work_s = now - self._t
        return now


def generation() -> int:
    """This round's generation: elastic-run's, else torchrun's restart count."""
    for var in ("ELASTIC_GENERATION", "TORCHELASTIC_RESTART_COUNT"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0
