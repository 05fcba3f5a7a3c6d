"""A ~90-second chaos smoke on network-namespace hosts (needs root): elastic-run on h1..h4 under
a worker SIGKILL, a 20 s partition and a host power-off; every fault is recovered from, every
sample of every complete epoch is trained on exactly once, the ranks agree, and the cut-off host
publishes no checkpoint. No timing is asserted (benchmarks/goodput.py measures them)."""
from __future__ import annotations

import sys

import pytest

from paths import REPO

if REPO not in sys.path:
    sys.path.insert(0, REPO)

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(480)]


def test_elastic_run_recovers_from_kill_partition_and_power_off():
    from benchmarks.chaos import netns

    try:
        netns.require_namespaces()
    except netns.NamespacesUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    import benchmarks.goodput as driver
    from benchmarks.chaos import faults, workload
    from benchmarks.chaos import goodput as gp
    from benchmarks.chaos.steplog import read_dir

    schedule = [faults.ScheduledFault(8.0, "kill_worker", "h2", 0.0),
                faults.ScheduledFault(25.0, "partition", "h4", 20.0),  # healed at 45 s: h4 rejoins
                faults.ScheduledFault(65.0, "power_off", "h3", 0.0)]
    with netns.Cluster() as cluster:
        root = str(cluster.workdir)
        token = driver.prepare(root)
        _, start = driver.harness_faults(cluster, (), 0, 0.0, 0.0, schedule=schedule)
        job, records = driver.run_chaos(cluster, root, "elastic-run", start, 80.0, 20.0, 0.1, "embedded", token)
        recs = read_dir(job.log_dir)
        fig = gp.analyze(recs, records, job.t_launch, num_samples=workload.NUM_SAMPLES,
                         steps_per_epoch=workload.STEPS_PER_EPOCH, manifests=driver.manifests(job), t_stop=job.t_stop,
                         global_batch=workload.GLOBAL_BATCH)
        loads, line = driver.checkpoint_loads(job, cluster)
    kinds = [r.kind for r in records]
    assert kinds == ["kill_worker", "partition", "power_off"], records
    assert all("failed" not in r.detail for r in records), records
    for f in fig.faults:
        assert f.recovered, f
        assert f.reformations >= 1, f
    assert fig.audit.duplicated_samples == 0, fig.audit
    assert fig.audit.missing_samples == 0, fig.audit
    assert fig.audit.missing_steps == 0, fig.audit
    assert fig.checksum_mismatches == 0
    assert fig.partitioned_publishes == 0
    assert fig.stale_publishes == 0
    assert loads, line
