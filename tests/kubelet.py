"""A kubelet, a training operator and an HPA on one machine, for the manifests of examples/kubernetes.

No Kubernetes server can run here, so this runs what a cluster would run, for real, with local
processes: each pod's container is an ``elastic-run`` process (through the multi-process harness,
so none outlives a test), with the kubelet's sequence:

- start: the container's env (literal values, ``secretKeyRef`` from the Secrets given, a missing
  Secret refused in one line as the kubelet's ``CreateContainerConfigError``, ``fieldRef`` to the
  pod's name), ``$(VAR)`` expansion in command and args, the working directory;
- probes: readiness and liveness (``exec`` or ``httpGet``) at the manifest's initialDelaySeconds,
  periodSeconds, timeoutSeconds and failureThreshold; a liveness failure kills the container and
  the restartPolicy restarts it, as a container that exits non-zero under OnFailure is;
- deletion: the ``preStop`` hook (bounded by the grace), then SIGTERM to the container's first
  process, then SIGKILL to all of its processes when terminationGracePeriodSeconds (less the
  hook's time, at least 2 s) has passed.

What differs from a cluster, and how it is simulated: every pod shares this machine's loopback
instead of having its own network namespace, so each declared containerPort of a pod gets a free
loopback port of its own and the env values that name it (``"8080"``) are rewritten to it; the
cluster DNS is a table: ``POD-NAME:PORT`` (or ``HOSTNAME.SUBDOMAIN:PORT``) in an env value
becomes ``127.0.0.1:<that pod's port>``. The image is this repository (``workingDir`` -> the
repository root) and each volume is a temporary folder (a mountPath in args or env -> it). Since
every pod's rendezvous endpoint is then a loopback address, each of them would host the store if
it bound first; in a cluster only the pod that owns the endpoint's hostname does. So the
operator here starts the first pod and waits until its liveness probe passes (its store is up)
before it starts the others; in a cluster the others wait for it themselves.

The operator's part follows kubeflow/training-operator (pkg/controller.v1/pytorch/elastic.go,
envvar.go): pods ``NAME-worker-I``, ``PET_RDZV_ENDPOINT=NAME-worker-0:<port pytorchjob-port>``,
``PET_RDZV_BACKEND`` (default c10d), ``PET_NNODES=MIN:MAX``, ``PET_MAX_RESTARTS``,
``PET_NPROC_PER_NODE``, ``PET_RDZV_ID``, ``PET_RDZV_CONF``, ``PYTHONUNBUFFERED``; replicas from the
scale subresource ``.spec.pytorchReplicaSpecs.Worker.replicas``, which an HPA sets within
minReplicas..maxReplicas; pods whose index is at or above the replicas are deleted.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from paths import BIN, REPO
from services import free_port

IMAGE_WORKDIR = "/workspace"  # where the example image holds the repository
MIN_GRACE_S = 2.0  # the kubelet's minimumGracePeriodInSeconds after a preStop hook


class PodStartError(Exception):
    """The kubelet refused to start a container (one line, as ``kubectl describe pod`` shows)."""


def load(path: str) -> List[Dict[str, Any]]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def strict(model: str, data: Dict[str, Any]):
    """Deserialize ``data`` into the official client's model ``model`` (e.g. ``V1PodTemplateSpec``)
    and serialize it back: any field the model does not know, or a wrong type, is an error
    (the client's ``from_dict`` alone drops unknown fields silently)."""
    from kubernetes import client

    obj = getattr(client, model).from_dict(copy.deepcopy(data))
    back = client.ApiClient().sanitize_for_serialization(obj)
    if back != data:
        raise AssertionError(f"{model}: fields the model does not keep: {_diff(data, back)}")
    return obj


def _diff(a: Any, b: Any, path: str = "") -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in b:
                out.append(f"{path}.{k} (unknown)")
            elif k not in a:
                out.append(f"{path}.{k} (added)")
            else:
                out += _diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


# -- the controllers: what pods a PyTorchJob or a JobSet asks for ---------------------------------
@dataclass
class PodSpec:
    name: str
    template: Dict[str, Any]  # the pod template (metadata, spec)
    extra_env: List[Dict[str, Any]] = field(default_factory=list)  # the operator's, appended
    dns_names: Tuple[str, ...] = ()


def pytorchjob_env(job: Dict[str, Any]) -> List[Dict[str, str]]:
    """The env the training operator appends to each container of an elastic PyTorchJob."""
    spec, name = job["spec"], job["metadata"]["name"]
    policy = spec.get("elasticPolicy")
    env = [{"name": "PYTHONUNBUFFERED", "value": "0"}]
    if policy is None:
        return env
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    port = policy.get("rdzvPort")
    if port is None:
        port = next(p["containerPort"] for c in worker["template"]["spec"]["containers"] if c["name"] == "pytorch"
                    for p in c.get("ports", []) if p.get("name") == "pytorchjob-port")
    env.append({"name": "PET_RDZV_ENDPOINT", "value": f"{policy.get('rdzvHost', f'{name}-worker-0')}:{port}"})
    env.append({"name": "PET_RDZV_BACKEND", "value": policy.get("rdzvBackend", "c10d")})
    if policy.get("minReplicas") is None and policy.get("maxReplicas") is None:
        env.append({"name": "PET_NNODES", "value": str(worker["replicas"])})
    else:
        env.append({"name": "PET_NNODES", "value": f"{policy['minReplicas']}:{policy['maxReplicas']}"})
    if policy.get("maxRestarts") is not None:
        env.append({"name": "PET_MAX_RESTARTS", "value": str(policy["maxRestarts"])})
    if policy.get("nProcPerNode") is not None:
        env.append({"name": "PET_NPROC_PER_NODE", "value": str(policy["nProcPerNode"])})
    if policy.get("rdzvId") is not None:
        env.append({"name": "PET_RDZV_ID", "value": policy["rdzvId"]})
    if policy.get("rdzvConf"):
        env.append({"name": "PET_RDZV_CONF", "value": ",".join(f"{c['key']}={c['value']}" for c in policy["rdzvConf"])})
    if policy.get("standalone"):
        env.append({"name": "PET_STANDALONE", "value": ""})
    return env


def pytorchjob_pods(job: Dict[str, Any]) -> List[PodSpec]:
    name, worker = job["metadata"]["name"], job["spec"]["pytorchReplicaSpecs"]["Worker"]
    env = pytorchjob_env(job)
    return [PodSpec(f"{name}-worker-{i}", worker["template"], env, (f"{name}-worker-{i}",))
            for i in range(worker["replicas"])]


def hpa_scale(job: Dict[str, Any], desired: int) -> int:
    """What the HPA the operator creates does: write the scale subresource, within min..max."""
    policy = job["spec"]["elasticPolicy"]
    replicas = max(policy["minReplicas"], min(policy["maxReplicas"], desired))
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = replicas
    return replicas


def jobset_pods(js: Dict[str, Any]) -> List[PodSpec]:
    """One pod per (replicated job, job index, pod index), named and reachable as JobSet does."""
    name, spec = js["metadata"]["name"], js["spec"]
    sub = spec.get("network", {}).get("subdomain", name)
    pods = []
    for rj in spec["replicatedJobs"]:
        for j in range(rj.get("replicas", 1)):
            for k in range(rj["template"]["spec"].get("parallelism", 1)):
                host = f"{name}-{rj['name']}-{j}-{k}"
                pods.append(PodSpec(host, rj["template"]["spec"]["template"], [], (host, f"{host}.{sub}")))
    return pods


# -- the kubelet -----------------------------------------------------------------------------------
@dataclass
class Termination:
    hook_rc: Optional[int]  # the preStop hook's exit code (None: no hook, or it timed out)
    hook_output: str
    exit_code: Optional[int]  # the container's (negative: a signal)
    sigkilled: bool  # the grace ran out and the kubelet SIGKILLed it


class Pod:
    def __init__(self, kubelet: "Kubelet", spec: PodSpec) -> None:
        self.kubelet, self.spec, self.name = kubelet, spec, spec.name
        self.podspec = spec.template["spec"]
        (self.container,) = self.podspec["containers"]  # the examples run one container per pod
        self.ports = {p["containerPort"]: free_port() for p in self.container.get("ports", [])}
        self.named_ports = {p["name"]: p["containerPort"] for p in self.container.get("ports", []) if "name" in p}
        self.volumes = {}
        for v in self.podspec.get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            self.volumes[v["name"]] = kubelet.volume(claim or f"{self.name}-{v['name']}")
        self.restarts = 0
        self.ready = False
        self.events: List[str] = []
        self.terminating = False
        self.proc_name = ""
        self.env: Dict[str, str] = {}
        self.cwd = REPO
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # the pod's view of its env, paths and ports -----------------------------------------------
    def _path(self, value: str) -> str:
        mounts = {m["mountPath"].rstrip("/"): self.volumes[m["name"]] for m in self.container.get("volumeMounts", [])}
        mounts[IMAGE_WORKDIR] = REPO
        for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == mount or value.startswith(mount + "/"):
                return local + value[len(mount):]
        return value

    def _value(self, value: str) -> str:
        value = self._path(value)
        if value.isdigit() and int(value) in self.ports:
            return str(self.ports[int(value)])
        host, sep, port = value.rpartition(":")
        if sep and port.isdigit() and host in self.kubelet.dns:
            return f"127.0.0.1:{self.kubelet.dns[host].ports[int(port)]}"
        return value

    def resolve_env(self) -> Dict[str, str]:
        env: Dict[str, str] = {"HOSTNAME": self.name}
        for item in list(self.container.get("env", [])) + list(self.spec.extra_env):
            if "value" in item:
                env[item["name"]] = self._value(_expand(item["value"], env))
                continue
            ref = item.get("valueFrom", {})
            if "secretKeyRef" in ref:
                sel = ref["secretKeyRef"]
                secret = self.kubelet.secrets.get(sel["name"])
                if secret is None or sel["key"] not in secret:
                    if sel.get("optional"):
                        continue
                    what = (f'secret "{sel["name"]}" not found' if secret is None
                            else f'couldn\'t find key {sel["key"]} in Secret default/{sel["name"]}')
                    raise PodStartError(f"{self.name}: CreateContainerConfigError: {what}")
                env[item["name"]] = secret[sel["key"]]
            elif "fieldRef" in ref:
                field_path = ref["fieldRef"]["fieldPath"]
                env[item["name"]] = {"metadata.name": self.name, "metadata.namespace": "default",
                                     "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}[field_path]
            else:
                raise PodStartError(f"{self.name}: unsupported env source {sorted(ref)}")
        return env

    def argv(self) -> List[str]:
        cmd = [_expand(a, self.env) for a in self.container.get("command", []) + self.container.get("args", [])]
        return [self._path(a) for a in cmd]

    # the container's life --------------------------------------------------------------------
    def start(self) -> None:
        self.env = self.resolve_env()
        self.cwd = self._path(self.container.get("workingDir", IMAGE_WORKDIR))
        self._start_container()
        self._thread = threading.Thread(target=self._probe_loop, name=f"kubelet-{self.name}", daemon=True)
        self._thread.start()

    def _start_container(self) -> None:
        self.proc_name = self.name if not self.restarts else f"{self.name}#restart{self.restarts}"
        env = {**self.env, "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}
        self.kubelet.procs.start(self.proc_name, ["env", "-C", self.cwd, *self.argv()], env=env)
        self.events.append(f"started {self.proc_name}")

    @property
    def process(self) -> subprocess.Popen:
        return self.kubelet.procs[self.proc_name]

    def output(self) -> str:
        return self.kubelet.procs.output(self.proc_name)

    def run_handler(self, handler: Dict[str, Any], timeout_s: float) -> Tuple[Optional[int], str]:
        """An exec or httpGet handler (probe or hook), run as the kubelet would for this pod."""
        if "exec" in handler:
            env = {**os.environ, **self.env, "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
                   "PYTHONPATH": REPO}
            try:
                done = subprocess.run(["env", "-C", self.cwd, *handler["exec"]["command"]], env=env,
                                      capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return None, "timed out"
            return done.returncode, (done.stdout + done.stderr).strip()
        if "httpGet" in handler:
            get = handler["httpGet"]
            port = get["port"]
            port = self.named_ports[port] if isinstance(port, str) else port
            url = f"http://127.0.0.1:{self.ports[port]}{get.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=timeout_s) as resp:
                    code = resp.status
            except OSError as exc:
                code = getattr(exc, "code", None)
                if code is None:
                    return 1, str(exc)
            return (0 if 200 <= code < 400 else 1), str(code)
        raise PodStartError(f"{self.name}: unsupported handler {sorted(handler)}")

    def probe(self, kind: str) -> Tuple[Optional[int], str]:
        p = self.container[kind]
        return self.run_handler(p, float(p.get("timeoutSeconds", 1)))

    def _probe_loop(self) -> None:
        started = time.monotonic()
        state = {}
        for kind in ("readinessProbe", "livenessProbe"):
            p = self.container.get(kind)
            if p is not None:
                state[kind] = {"next": started + p.get("initialDelaySeconds", 0), "fails": 0}
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for kind, st in state.items():
                if now < st["next"] or (kind == "livenessProbe" and self.terminating):
                    continue
                p = self.container[kind]
                st["next"] = now + p.get("periodSeconds", 10)
                if self.process.poll() is not None:
                    continue
                rc, out = self.probe(kind)
                st["fails"] = 0 if rc == 0 else st["fails"] + 1
                if kind == "readinessProbe":
                    if rc == 0:
                        self.ready = True
                    elif st["fails"] >= p.get("failureThreshold", 3):
                        self.ready = False
                elif st["fails"] >= p.get("failureThreshold", 3) and not self.terminating:
                    self.events.append(f"liveness failed: {out}; killing the container")
                    self._kill_container()
                    st["fails"] = 0
            if self.process.poll() is not None and not self.terminating and not self._stop.is_set():
                code = self.process.returncode
                policy = self.podspec.get("restartPolicy", "Always")
                self.events.append(f"container exited {code}")
                if policy == "Always" or (policy == "OnFailure" and code != 0):
                    self.restarts += 1
                    self.ready = False
                    self._start_container()
                else:
                    return

    def _kill_container(self) -> None:
        self._stop_container(float(self.podspec.get("terminationGracePeriodSeconds", 30)))

    def _stop_container(self, grace_s: float) -> Tuple[Optional[int], bool]:
        proc = self.process
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # to the container's first process
        try:
            proc.wait(timeout=grace_s)
            return proc.returncode, False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # everything in the container
            proc.wait(timeout=30)
            return proc.returncode, True

    def delete(self) -> Termination:
        """Graceful deletion, the kubelet's killContainer: preStop, SIGTERM, SIGKILL at the grace."""
        self.terminating = True
        grace_s = float(self.podspec.get("terminationGracePeriodSeconds", 30))
        hook = self.container.get("lifecycle", {}).get("preStop")
        hook_rc, hook_out = None, ""
        if hook is not None and self.process.poll() is None:
            t0 = time.monotonic()
            hook_rc, hook_out = self.run_handler(hook, grace_s)
            grace_s = max(MIN_GRACE_S, grace_s - (time.monotonic() - t0))
            self.events.append(f"preStop exited {hook_rc}: {hook_out}")
        code, killed = self._stop_container(grace_s)
        self.events.append(f"terminated: exit {code}{' (SIGKILL after the grace)' if killed else ''}")
        self._stop.set()
        self.ready = False
        return Termination(hook_rc, hook_out, code, killed)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def _expand(value: str, env: Dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables replaced, $$ is a literal $."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


class Kubelet:
    """Runs pods (``PodSpec``) as local processes through ``procs`` (tests/harness.py)."""

    def __init__(self, procs, secrets: Optional[Dict[str, Dict[str, str]]] = None) -> None:
        self.procs = procs
        self.secrets = dict(secrets or {})
        self.pods: Dict[str, Pod] = {}
        self.dns: Dict[str, Pod] = {}
        self._tmp = tempfile.mkdtemp(prefix="kubelet-volumes-")

    def volume(self, name: str) -> str:
        path = os.path.join(self._tmp, name)
        os.makedirs(path, exist_ok=True)
        return path

    def create(self, spec: PodSpec) -> Pod:
        """The pod object (its ports and DNS names exist before its container starts)."""
        pod = Pod(self, spec)
        self.pods[spec.name] = pod
        for name in spec.dns_names:
            self.dns[name] = pod
        return pod

    def wait_until(self, what: str, check, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")

    def close(self) -> None:
        for pod in self.pods.values():
            pod.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


class Operator:
    """The training operator's reconcile loop for one PyTorchJob, on a :class:`Kubelet`."""

    def __init__(self, kubelet: Kubelet, job: Dict[str, Any]) -> None:
        self.kubelet, self.job = kubelet, job

    def reconcile(self, first_ready_timeout_s: float = 120) -> Dict[str, Termination]:
        """Create the missing pods and delete those at or above the replicas (highest first)."""
        want = {p.name: p for p in pytorchjob_pods(self.job)}
        for spec in want.values():
            if spec.name not in self.kubelet.pods:
                self.kubelet.create(spec)
        first = self.kubelet.pods[f"{self.job['metadata']['name']}-worker-0"]
        if not first.proc_name:  # see the module's docstring: the store's host starts first
            first.start()
            self.kubelet.wait_until(f"{first.name}'s liveness probe",
                                    lambda: first.probe("livenessProbe")[0] == 0, first_ready_timeout_s)
        for name in want:
            pod = self.kubelet.pods[name]
            if not pod.proc_name:
                pod.start()
        gone = {}
        for name in sorted((n for n, p in self.kubelet.pods.items() if n not in want and not p.terminating),
                           key=lambda n: -int(n.rsplit("-", 1)[1])):
            gone[name] = self.kubelet.pods[name].delete()
        return gone
