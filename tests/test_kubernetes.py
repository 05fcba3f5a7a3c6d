"""examples/kubernetes: the manifests through the official ``kubernetes`` client's models and
elastic-run's own parser, and the pods they describe run by a kubelet simulator (tests/kubelet.py)
as local processes: probes, a missing Secret, an HPA scale-down 3 -> 2 that drains one pod
(preStop, SIGTERM, exit 75 before the grace's SIGKILL) while the other pods keep running with
the same worker processes and no restart charged (training-operator #1509, fixed)."""
import glob
import os
import re
import subprocess
import sys

import pytest

from kubelet import (IMAGE_WORKDIR, Kubelet, Operator, PodStartError, hpa_scale, jobset_pods, load,
                     pytorchjob_env, pytorchjob_pods, strict)
from needs import needs
from paths import ELASTIC_RUN, REPO

pytestmark = needs("kubernetes", why="the official Kubernetes client, the test extra")

EXAMPLES = os.path.join(REPO, "examples", "kubernetes")
MANIFESTS = sorted(glob.glob(os.path.join(EXAMPLES, "*.yaml")))
TOKEN = {"elastic-rdzv": {"token": "k8s-test-token-0123456789"}}

# The structure of the two CRDs that the examples rely on, as their Go types define it
# (kubeflow/training-operator pkg/apis/kubeflow.org/v1: PyTorchJobSpec, ElasticPolicy, ReplicaSpec;
# kubernetes-sigs/jobset api/jobset/v1alpha2: JobSetSpec, ReplicatedJob, Network, SuccessPolicy,
# FailurePolicy). The pod and Job templates inside them are checked with the client's own models.
PYTORCHJOB_SPEC = {"runPolicy", "elasticPolicy", "pytorchReplicaSpecs", "nprocPerNode"}
ELASTIC_POLICY = {"minReplicas", "maxReplicas", "rdzvBackend", "rdzvPort", "rdzvHost", "rdzvId", "rdzvConf",
                  "standalone", "nProcPerNode", "maxRestarts", "metrics"}
REPLICA_SPEC = {"replicas", "template", "restartPolicy"}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
JOBSET_SPEC = {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
               "coordinator", "managedBy", "ttlSecondsAfterFinished"}
REPLICATED_JOB = {"name", "groupName", "template", "replicas", "dependsOn"}


def docs(kind):
    return [d for path in MANIFESTS for d in load(path) if d.get("kind") == kind]


def pod_templates():
    """(where, pod template, the env a controller adds) of every manifest's pods."""
    out = []
    for job in docs("PyTorchJob"):
        spec = pytorchjob_pods(job)[0]
        out.append((f"PyTorchJob/{job['metadata']['name']}", spec.template, spec.extra_env))
    for js in docs("JobSet"):
        spec = jobset_pods(js)[0]
        out.append((f"JobSet/{js['metadata']['name']}", spec.template, spec.extra_env))
    return out


def test_every_manifest_loads_with_the_official_models():
    from kubernetes import client

    assert {os.path.basename(p) for p in MANIFESTS} >= {"pytorchjob.yaml", "jobset.yaml"}
    (job,) = docs("PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert set(job["spec"]) <= PYTORCHJOB_SPEC
    policy = job["spec"]["elasticPolicy"]
    assert set(policy) <= ELASTIC_POLICY
    assert 1 <= policy["minReplicas"] <= policy["maxReplicas"] and policy["rdzvBackend"] in ("c10d", "etcd", "etcd-v2")
    for metric in policy.get("metrics", []):
        strict("V2MetricSpec", metric)  # what the operator puts in the HPA it creates
    (worker,) = job["spec"]["pytorchReplicaSpecs"].values()  # elastic: workers only, no Master
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Worker"} and set(worker) <= REPLICA_SPEC
    assert worker["restartPolicy"] in RESTART_POLICIES
    assert policy["minReplicas"] <= worker["replicas"] <= policy["maxReplicas"]
    pod = strict("V1PodTemplateSpec", worker["template"])
    assert [c.name for c in pod.spec.containers] == ["pytorch"]  # the operator's container name
    assert any(p.name == "pytorchjob-port" for p in pod.spec.containers[0].ports)  # -> PET_RDZV_ENDPOINT

    (js,) = docs("JobSet")
    assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert set(js["spec"]) <= JOBSET_SPEC
    for rj in js["spec"]["replicatedJobs"]:
        assert set(rj) <= REPLICATED_JOB
        strict("V1JobTemplateSpec", rj["template"])
    assert set(js["spec"]["successPolicy"]) <= {"operator", "targetReplicatedJobs"}
    assert {r["name"] for r in js["spec"]["replicatedJobs"]} >= set(js["spec"]["successPolicy"]["targetReplicatedJobs"])

    with pytest.raises(AssertionError, match="commnd"):  # the strict load does see a misspelt field
        strict("V1Container", {"name": "x", "commnd": ["elastic-run"]})
    assert client.V1Container  # the model the containers were loaded into


@pytest.mark.parametrize("where,template,extra_env", pod_templates(), ids=[t[0] for t in pod_templates()])
def test_what_each_pod_runs_is_an_elastic_run_command_line(where, template, extra_env, monkeypatch):
    """The container's command, parsed by elastic-run's own parser with the env the pod gets
    (the operator's PET_* and the manifest's), is a valid LaunchConfig of the job asked for."""
    from launchers.cli import build_parser, config_from_args

    (c,) = template["spec"]["containers"]
    env = {}
    for item in c.get("env", []) + extra_env:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert (item["name"], ref["name"], ref["key"]) == ("ELASTIC_RDZV_TOKEN", "elastic-rdzv", "token")
            assert not ref.get("optional")  # no Secret: the kubelet refuses to start the pod
            env[item["name"]] = "from-the-secret"
    for name in [k for k in os.environ if k.startswith("PET_") or k.startswith("ELASTIC_RDZV_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    argv = c["command"] + c.get("args", [])
    assert argv[0] == "elastic-run"
    assert c["workingDir"] == IMAGE_WORKDIR
    monkeypatch.chdir(REPO)  # the image's /workspace is this repository
    config = config_from_args(build_parser().parse_args(argv[1:]))
    assert (config.min_nodes, config.max_nodes) == (2, 3)
    assert config.rdzv_backend == "embedded" and config.run_id == "job42"
    host, port = config.rdzv_endpoint.rsplit(":", 1)
    assert host in ("job42-worker-0", "job42-node-0-0.job42") and port == "29400"
    assert config.max_restarts == 3 and config.nproc_per_node == 1
    assert config.entrypoint[0] == "examples/kubernetes/train.py" and os.path.isfile(config.entrypoint[0])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert config.control_port == ports["control"] and config.control_host == "127.0.0.1"
    assert int(port) in ports.values()
    # the drain fits in the grace: the preStop deadline and a SIGTERM's (--drain-grace) both end
    # before the kubelet's SIGKILL
    grace = template["spec"]["terminationGracePeriodSeconds"]
    hook = c["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:4] == ["python", "-m", "launchers.kubernetes", "drain"]
    deadline = float(hook[hook.index("--deadline") + 1])
    assert deadline < grace and config.drain_grace_s < grace and "SIGTERM" in config.drain_signals
    assert c["readinessProbe"]["exec"]["command"][-1] == "readyz"
    assert c["livenessProbe"]["exec"]["command"][-1] == "healthz"


def test_the_operator_env_follows_the_training_operator():
    (job,) = docs("PyTorchJob")
    env = {e["name"]: e["value"] for e in pytorchjob_env(job)}
    assert env == {"PYTHONUNBUFFERED": "0", "PET_RDZV_ENDPOINT": "job42-worker-0:29400", "PET_RDZV_BACKEND": "c10d",
                   "PET_NNODES": "2:3", "PET_MAX_RESTARTS": "3", "PET_RDZV_ID": "job42"}


def test_a_missing_token_secret_is_one_line(procs):
    """The kubelet refuses the pod (CreateContainerConfigError); and an agent that gets no token
    for a store off loopback (an optional or empty Secret) exits 2 with one line."""
    (job,) = docs("PyTorchJob")
    kubelet = Kubelet(procs, secrets={})
    try:
        pod = kubelet.create(pytorchjob_pods(job)[1])
        with pytest.raises(PodStartError, match=r'^job42-worker-1: CreateContainerConfigError: secret "elastic-rdzv" '
                                                r'not found$'):
            pod.start()
        kubelet.secrets["elastic-rdzv"] = {"other": "x"}
        with pytest.raises(PodStartError, match="couldn't find key token in Secret default/elastic-rdzv"):
            pod.start()
    finally:
        kubelet.close()
    (c,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "ELASTIC_RDZV_"))}
    env.update({e["name"]: e["value"] for e in pytorchjob_env(job)})
    env.update({e["name"]: e["value"] for e in c["env"] if "value" in e})
    env["PET_RDZV_ENDPOINT"] = "192.0.2.10:29400"  # a pod address (TEST-NET: never contacted, refused first)
    env["PYTHONPATH"] = REPO
    done = subprocess.run([ELASTIC_RUN, *c["command"][1:]], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no token is set" in lines[0] and "ELASTIC_RDZV_TOKEN" in lines[0], done.stderr


def test_probe_and_hook_commands_say_one_line_on_bad_input(monkeypatch):
    monkeypatch.delenv("PET_CONTROL_PORT", raising=False)
    monkeypatch.delenv("ELASTIC_CONTROL_PORT", raising=False)
    run = [sys.executable, "-m", "launchers.kubernetes"]
    env = {k: v for k, v in os.environ.items() if k not in ("PET_CONTROL_PORT", "ELASTIC_CONTROL_PORT")}
    env["PYTHONPATH"] = REPO
    done = subprocess.run(run + ["readyz"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "PET_CONTROL_PORT" in done.stderr
    from services import free_port

    port = str(free_port())  # nobody listens: the probe fails (1), in one line
    done = subprocess.run(run + ["healthz", "--port", port], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0 and "no answer" in done.stderr
    done = subprocess.run(run + ["drain", "--port", port, "--reason", "lunch"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0


def steps(output):
    return [{k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
            for m in re.finditer(r"STEP (step=\d+ rank=\d+ world=\d+ pid=\d+)", output)]


def test_a_scale_down_drains_one_pod_and_the_others_keep_running(procs, tmp_path):
    """PyTorchJob 3 -> 2 through the HPA's scale subresource: the operator deletes worker-2, whose
    preStop hook drains it (it saves its last step and exits 75 inside the grace); worker-0 and
    worker-1 never restart: same worker PIDs, the next step is the drained node's last + 1, the
    pods stay ready, no container restart, no restart of the job's budget."""
    from elastic.control import EXIT_DRAINED, JobController

    (job,) = docs("PyTorchJob")
    stop = tmp_path / "stop"
    (c,) = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    c["command"] = c["command"] + ["--stop-file", str(stop)]  # the test ends the job when it has seen enough
    kubelet = Kubelet(procs, secrets=TOKEN)
    try:
        operator = Operator(kubelet, job)
        operator.reconcile()
        pods = [kubelet.pods[f"job42-worker-{i}"] for i in range(3)]
        for pod in pods:
            kubelet.wait_until(f"{pod.name} at world size 3",
                               lambda pod=pod: any(s["world"] == 3 for s in steps(pod.output())), 180)
        for pod in pods:  # the readiness probe (the manifest's period) passes while it trains
            kubelet.wait_until(f"{pod.name} ready", lambda pod=pod: pod.ready, 60)
        endpoint = kubelet.pods["job42-worker-0"].env["PET_RDZV_ENDPOINT"]
        with JobController.connect(endpoint, run_id="job42", token=TOKEN["elastic-rdzv"]["token"]) as ctl:
            assert ctl.status().num_nodes == 3
            pids = {p.name: {s["pid"] for s in steps(p.output())} for p in pods[:2]}
            seen = {p.name: len(p.output()) for p in pods[:2]}

            assert hpa_scale(job, 2) == 2 and hpa_scale(job, 1) == 2  # the HPA stays within min..max
            gone = operator.reconcile()
            assert list(gone) == ["job42-worker-2"]
            end = gone["job42-worker-2"]
            assert end.hook_rc == 0 and "202" in end.hook_output, end
            assert end.exit_code == EXIT_DRAINED and not end.sigkilled, (end, pods[2].output()[-3000:])

            last_done = max(s["step"] for s in steps(pods[2].output()))
            (saved,) = re.findall(r"SAVED step=(\d+)", pods[2].output())
            assert int(saved) == last_done  # the drained node saved the last step it completed
            for pod in pods[:2]:
                kubelet.wait_until(f"{pod.name} at world size 2",
                                   lambda pod=pod: any(s["world"] == 2 for s in steps(pod.output()[seen[pod.name]:])),
                                   120)
                after = [s for s in steps(pod.output()[seen[pod.name]:]) if s["world"] == 2]
                assert after[0]["step"] == last_done + 1  # no step lost, none repeated
                assert {s["pid"] for s in steps(pod.output())} == pids[pod.name]  # same worker processes
                assert pod.process.poll() is None and pod.restarts == 0
            status = ctl.wait_for(num_nodes=2, timeout_s=60)
            assert status.restarts == 0 and status.world_size == 2
            for pod in pods[:2]:
                assert not any("liveness failed" in e for e in pod.events), pod.events
            for pod in pods:  # shown with a failure (and by -s)
                print(pod.name, pod.events)
            print("drained at step", last_done, "survivors resumed at", after[0]["step"], "saved", saved)
            stop.write_text("")
            results = procs.wait(timeout_s=120, names=["job42-worker-0", "job42-worker-1"])
            assert all(r.returncode == 0 for r in results.values())
            assert "FINAL accuracy=" in pods[0].output()
    finally:
        kubelet.close()
