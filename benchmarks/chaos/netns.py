"""Hosts made of Linux network namespaces on this machine, for the chaos harness (issue 16).

Topology (every name carries the cluster's ``tag``, so parallel runs never collide)::

    netns <tag>-sw     the switch: bridge <tag>-br, one port <tag>-<host>s per host, the nft
                       table ``bridge <tag>`` (partitions and packet loss); no address, no route
    netns <tag>-<host> one per host: lo and eth0 (10.213.<octet>.<11+i>/24), NO default route,
                       IPv6 off; reached only through the switch

The root namespace has no interface on the subnet and never sends to it: every process of an
experiment (and every probe, such as etcd's readiness check) runs inside a host; a guard table
``ip <tag>`` in the root namespace drops and counts anything it would send there anyway
(:meth:`Cluster.root_guard_packets`, 0). Before anything
starts, :meth:`Cluster.check_routes` verifies from each host (``ip route get`` to every peer,
no default route in any table, only lo and eth0) and from the switch that no packet can leave
the namespace set, and refuses (:class:`UnsafeTopology`) otherwise.

A host is more than a network namespace: one long-lived holder process per host, started through
``ip netns exec`` + ``unshare --mount --uts --ipc --propagation private``, gives it its own
hostname, a fresh tmpfs on ``/tmp`` and ``/dev/shm``, an ``/etc/hosts`` naming every host and an
``/etc/resolv.conf`` pointing at the host's own loopback;
:meth:`Cluster.spawn` enters those namespaces with ``nsenter`` and puts the process into the
host's cgroups (v1 ``freezer`` and ``cpu``: ``/sys/fs/cgroup/<ctrl>/elastic-chaos/<tag>/<host>``), which is how
:meth:`Cluster.pids`, a power-off (freeze, SIGKILL, thaw) and a CPU quota find every process of a
host. A power-off kills the holder too, so the host's ``/tmp`` and ``/dev/shm`` are lost as a
machine's memory would be; :meth:`Cluster.power_on` starts a fresh one.

The work directory (default ``/var/tmp/elastic-chaos-<tag>-*``, never under ``/tmp``) is seen by
every host at the same path, like a shared NFS mount: logs, checkpoints and etcd's data go there.

:meth:`Cluster.close` (also on ``__exit__`` and at interpreter exit) kills every process of every
host and removes every namespace, link, nft table, qdisc and cgroup it made, by name, even after a
failure; :func:`cleanup_stale` removes what a crashed run left (an owner file under
``/run/elastic-chaos`` says which run is still alive, so a live parallel run is never touched):

    python -m benchmarks.chaos.netns list            # runs that left namespaces here
    python -m benchmarks.chaos.netns cleanup [TAG]   # remove those whose owner is dead
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["NamespacesUnavailable", "UnsafeTopology", "HostDown", "Host", "Cluster", "require_namespaces",
           "cleanup_stale", "runs", "cgroup_dir", "PREFIX", "ETCD_PORT"]

PREFIX = "ec"  # every default tag starts with it: cleanup_stale(PREFIX) finds every crashed run
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("freezer", "cpu")
CGROUP_PARENT = "elastic-chaos"  # /sys/fs/cgroup/<ctrl>/elastic-chaos/<tag>/<host>
OWNERS = Path("/run/elastic-chaos")
ETCD_PORT = 2379
ETCD_BIN = "/usr/bin/etcd"
REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
TOOLS = ("ip", "nft", "tc", "nsenter", "unshare", "mount")
_TAG_RE = re.compile(r"[a-z][a-z0-9]{1,9}")
_HOST_RE = re.compile(r"[a-z][a-z0-9]{0,3}")
_IFNAMSIZ = 15


class NamespacesUnavailable(RuntimeError):
    """Not root, no ``ip netns``, no nft, no cgroup v1 freezer/cpu...: ``str(e)`` is the reason."""


class UnsafeTopology(RuntimeError):
    """A route or an interface would let a packet leave the namespace set: nothing is started."""


class HostDown(RuntimeError):
    """The host is powered off (see :meth:`Cluster.power_on`)."""


@dataclass(frozen=True)
class Host:
    name: str   # "h1"
    netns: str  # "<tag>-h1"
    addr: str   # "10.213.7.11"


# --------------------------------------------------------------------------------------- helpers
def _sh(argv: Sequence[str], *, check: bool = True, input: Optional[str] = None,
        timeout: float = 30.0) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def _nft(netns: str, script: str, *, check: bool = True) -> subprocess.CompletedProcess:
    return _sh(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=script, check=check)


def _read_pids(path: Path) -> List[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _start_time(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _netns_list() -> List[str]:
    proc = _sh(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _netns_pids(netns: str) -> List[int]:
    proc = _sh(["ip", "netns", "pids", netns], check=False)
    return [int(x) for x in proc.stdout.split() if x.isdigit()]


_PROBE: Dict[str, Optional[str]] = {}


def require_namespaces() -> None:
    """Raise :class:`NamespacesUnavailable` with the reason unless this process can build hosts:
    root, ``ip``/``nft``/``tc``/``nsenter``/``unshare``, the cgroup v1 freezer and cpu
    controllers, and a network namespace that can be made and removed (checked once)."""
    if "reason" not in _PROBE:
        _PROBE["reason"] = _probe()
    if _PROBE["reason"]:
        raise NamespacesUnavailable(_PROBE["reason"])


def _probe() -> Optional[str]:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables, cgroups)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install iproute2 nftables util-linux)"
    for ctrl in CONTROLLERS:
        d = CGROUP_ROOT / ctrl
        if not (d / "cgroup.procs").exists() or not os.access(d, os.W_OK):
            return f"no writable cgroup v1 {ctrl} controller at {d}"
    name = f"{PREFIX}probe{os.getpid()}"
    try:
        made = _sh(["ip", "netns", "add", name], check=False)
        if made.returncode != 0:
            return f"ip netns add failed: {made.stderr.strip()}"
        nft = _sh(["ip", "netns", "exec", name, "nft", "list", "tables"], check=False)
        if nft.returncode != 0:
            return f"nft does not run in a namespace: {nft.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"network namespaces unavailable: {exc}"
    finally:
        _sh(["ip", "netns", "del", name], check=False)
    return None


# --------------------------------------------------------------------------------------- cluster
_LIVE: "weakref.WeakSet[Cluster]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for cluster in list(_LIVE):
        try:
            cluster.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class Cluster:
    """Hosts in network namespaces behind one switch; a context manager.

    ``hosts``: host names (1-4 lowercase letters/digits, "h1".."h5" by default); ``etcd_host``
    adds a host named "etcd"; ``tag``: the prefix of every name this cluster makes (default
    ``PREFIX`` + 6 random hex digits); ``workdir``: the directory every host sees (default a new
    one under /var/tmp, removed by close() unless ``keep_workdir``); ``subnet_octet``: the X of
    10.213.X.0/24 (default derived from the tag).
    """

    def __init__(self, hosts: Sequence[str] = ("h1", "h2", "h3", "h4", "h5"), *, etcd_host: bool = False,
                 tag: Optional[str] = None, workdir: Optional[Path] = None, subnet_octet: Optional[int] = None,
                 keep_workdir: Optional[bool] = None) -> None:
        require_namespaces()
        self.tag = tag or PREFIX + secrets.token_hex(3)
        if not _TAG_RE.fullmatch(self.tag):
            raise ValueError(f"tag {self.tag!r}: 2-10 lowercase letters and digits, a letter first")
        names = list(hosts) + (["etcd"] if etcd_host else [])
        if len(set(names)) != len(names) or "sw" in names:
            raise ValueError(f"host names must be unique and not 'sw': {names}")
        for n in names:
            if not (_HOST_RE.fullmatch(n) or n == "etcd") or len(f"{self.tag}-{n}s") > _IFNAMSIZ:
                raise ValueError(f"host name {n!r}: 1-4 lowercase letters/digits (interface names are "
                                 f"limited to {_IFNAMSIZ} characters with tag {self.tag!r})")
        if len(names) > 200:
            raise ValueError("at most 200 hosts")
        octet = subnet_octet if subnet_octet is not None else \
            1 + int(hashlib.sha256(self.tag.encode()).hexdigest(), 16) % 254
        if not 1 <= octet <= 254:
            raise ValueError(f"subnet_octet {octet}: 1..254")
        self.subnet = f"10.213.{octet}.0/24"
        self.hosts: Dict[str, Host] = {
            n: Host(n, f"{self.tag}-{n}", f"10.213.{octet}.{11 + i}") for i, n in enumerate(names)}
        self.switch = f"{self.tag}-sw"
        self.bridge = f"{self.tag}-br"
        self.nft_table = self.tag
        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"elastic-chaos-{self.tag}-", dir="/var/tmp"))
            self._made_workdir = True
            self._own_workdir = not keep_workdir
        else:
            self.workdir = Path(workdir).resolve()
            self._made_workdir = False
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._own_workdir = bool(keep_workdir is False)
        for private in ("/tmp", "/dev/shm"):
            if self.workdir == Path(private) or Path(private) in self.workdir.parents:
                raise ValueError(f"workdir {self.workdir} lies under {private}, which every host has its own "
                                 "of: pick a directory all hosts share (default: under /var/tmp)")
        os.chmod(self.workdir, 0o755)
        self._lock = threading.RLock()
        self._closed = False
        self._made_ns: List[str] = []
        self._holders: Dict[str, subprocess.Popen] = {}
        self._procs: Dict[str, List[subprocess.Popen]] = {n: [] for n in names}
        self._off: set = set()
        self._degraded: set = set()
        self._etcd: Optional[subprocess.Popen] = None
        self._etcd_url: Optional[str] = None
        self._nspawned = 0
        self._claim_tag()
        _LIVE.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ names
    def addr(self, name: str) -> str:
        return self._host(name).addr

    def _host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in this cluster (hosts: {', '.join(self.hosts)})") from None

    def port_name(self, name: str) -> str:
        """The host's port on the switch (the veth end in the switch namespace)."""
        return f"{self.tag}-{self._host(name).name}s"

    def cgroup(self, name: str, ctrl: str = "freezer") -> Path:
        return cgroup_dir(ctrl, self.tag) / self._host(name).name

    @property
    def hosts_file(self) -> Path:
        return self.workdir / ".hosts"

    @property
    def resolv_file(self) -> Path:
        return self.workdir / ".resolv.conf"

    # ------------------------------------------------------------------ build
    def _claim_tag(self) -> None:
        """Take the tag with an owner file made O_EXCL (so two runs never share names, and a
        teardown never touches another run's), after checking nothing of it is left here."""
        leftovers = [ns for ns in _netns_list() if ns.rsplit("-", 1)[0] == self.tag]
        leftovers += [str(cgroup_dir(c, self.tag)) for c in CONTROLLERS if cgroup_dir(c, self.tag).exists()]
        OWNERS.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(OWNERS / f"{self.tag}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            leftovers.append(str(OWNERS / f"{self.tag}.json"))
            fd = -1
        if leftovers:
            if fd >= 0:
                os.close(fd)
                os.unlink(OWNERS / f"{self.tag}.json")
            state = "in use by a live run" if _owner_alive(self.tag) else \
                "left by a run that died (python -m benchmarks.chaos.netns cleanup TAG)"
            self._closed = True  # nothing here is ours to tear down
            if self._made_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            raise ValueError(f"tag {self.tag} is {state}: {', '.join(leftovers)}")
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "start": _start_time(os.getpid()), "workdir": str(self.workdir)}, f)

    def _build(self) -> None:
        # A guard in the root namespace: drop (and count) anything it would send to the subnet.
        # The root has no interface there and never sends there; this makes sure of it.
        _sh(["nft", "-f", "-"], input=f"""table ip {self.nft_table} {{
  chain guard {{ type filter hook output priority -350; policy accept;
    ip daddr {self.subnet} counter drop comment "elastic-chaos: the root namespace never sends to the hosts"
  }}
}}
""")
        self._add_netns(self.switch)
        _sh(["ip", "-n", self.switch, "link", "set", "lo", "up"])
        _sh(["ip", "-n", self.switch, "link", "add", self.bridge, "type", "bridge"])
        _sh(["ip", "-n", self.switch, "link", "set", self.bridge, "up"])
        _nft(self.switch, f"""table bridge {self.nft_table} {{
  set cut {{ type ifname; }}
  chain forward {{ type filter hook forward priority 0; policy accept;
    iifname @cut drop
    oifname @cut drop
  }}
}}
""")
        for host in self.hosts.values():
            self._add_netns(host.netns)
            port = self.port_name(host.name)
            _sh(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                 "netns", host.netns])
            _sh(["ip", "-n", self.switch, "link", "set", port, "master", self.bridge, "up"])
            _sh(["ip", "-n", host.netns, "link", "set", "lo", "up"])
            _sh(["ip", "-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0"])
            _sh(["ip", "-n", host.netns, "link", "set", "eth0", "up"])
            for ctrl in CONTROLLERS:
                _mkdir_cgroup(self.cgroup(host.name, ctrl))
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{h.addr} {h.name}" for h in self.hosts.values()]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        os.chmod(self.hosts_file, 0o644)
        # DNS, if anything asks it, goes to the host's own loopback (nothing listens there):
        # never to the machine's resolver, which no host could reach anyway
        self.resolv_file.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        os.chmod(self.resolv_file, 0o644)
        self.check_routes()
        for name in self.hosts:
            self._start_holder(name)

    def _add_netns(self, netns: str) -> None:
        _sh(["ip", "netns", "add", netns])
        self._made_ns.append(netns)
        for key in ("all", "default"):  # no IPv6 at all: no link-local chatter, no v6 route to check
            _sh(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1"],
                check=False)

    def root_guard_packets(self) -> int:
        """Packets the root namespace tried to send to the subnet (dropped by the guard): 0."""
        out = _sh(["nft", "list", "chain", "ip", self.nft_table, "guard"]).stdout
        m = re.search(r"counter packets (\d+)", out)
        if m is None:
            raise UnsafeTopology(f"the root namespace's guard table ip {self.nft_table} is missing")
        return int(m.group(1))

    def check_routes(self) -> None:
        """Refuse (:class:`UnsafeTopology`) unless every host reaches every peer directly on eth0,
        has no default route (v4 or v6, any table) and no interface but lo and eth0, the switch
        has no address, no route and no forwarding, and the root namespace holds nothing of the
        subnet. Only asks the kernel (``ip route get``); sends nothing."""
        net = self.subnet.rsplit(".", 1)[0] + "."
        problems = []
        for h in self.hosts.values():
            links = _sh(["ip", "-n", h.netns, "-o", "link", "show"]).stdout
            names = {ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines() if ln.strip()}
            if names - {"lo", "eth0"}:
                problems.append(f"{h.name}: unexpected interfaces {sorted(names - {'lo', 'eth0'})}")
            for fam in ("-4", "-6"):
                routes = _sh(["ip", "-n", h.netns, fam, "route", "show", "table", "all"]).stdout
                for line in routes.splitlines():
                    if line.startswith("default") or " via " in f" {line} ":
                        problems.append(f"{h.name}: route {line.strip()!r}")
            main = _sh(["ip", "-n", h.netns, "-4", "route", "show"]).stdout
            for line in main.splitlines():
                if not line.startswith(self.subnet + " dev eth0"):
                    problems.append(f"{h.name}: unexpected route {line.strip()!r}")
            for peer in self.hosts.values():
                if peer.name == h.name:
                    continue
                got = _sh(["ip", "-n", h.netns, "route", "get", peer.addr], check=False)
                out = got.stdout.split()
                direct = (got.returncode == 0 and "via" not in out and "dev" in out
                          and out[out.index("dev") + 1:][:1] == ["eth0"])
                if not direct:
                    why = got.stdout.strip() or got.stderr.strip()
                    problems.append(f"{h.name} -> {peer.name} ({peer.addr}): {why}")
            outside = _sh(["ip", "-n", h.netns, "route", "get", "192.0.2.1"], check=False)  # TEST-NET-1
            if outside.returncode == 0:
                problems.append(f"{h.name}: an address outside the subnet is routable: {outside.stdout.strip()}")
        sw_routes = _sh(["ip", "-n", self.switch, "-4", "route", "show", "table", "main"]).stdout.strip()
        if sw_routes:
            problems.append(f"switch: has routes {sw_routes!r}")
        sw_addrs = _sh(["ip", "-n", self.switch, "-4", "-o", "addr", "show"]).stdout
        if any(" inet " in f" {ln} " and " lo " not in f" {ln} " for ln in sw_addrs.splitlines()):
            problems.append("switch: has an address")
        fwd = _sh(["ip", "netns", "exec", self.switch, "sysctl", "-n", "net.ipv4.ip_forward"], check=False)
        if fwd.stdout.strip() not in ("", "0"):
            problems.append("switch: IPv4 forwarding is on")
        root_addrs = _sh(["ip", "-4", "-o", "addr", "show"]).stdout
        if net in root_addrs:
            problems.append(f"root namespace holds an address in {self.subnet}")
        root_links = _sh(["ip", "-o", "link", "show"]).stdout
        if f" {self.tag}-" in root_links:
            problems.append(f"root namespace holds a link named {self.tag}-*")
        try:
            self.root_guard_packets()
        except (UnsafeTopology, RuntimeError) as exc:
            problems.append(str(exc))
        if problems:
            raise UnsafeTopology("refusing to run: " + "; ".join(problems))

    # ------------------------------------------------------------------ holders (per-host mount/uts/ipc)
    def _start_holder(self, name: str) -> None:
        host = self._host(name)
        inner = (f"echo {name} > /proc/sys/kernel/hostname && "
                 "mount -t tmpfs -o mode=1777 tmpfs /tmp && "
                 "mount -t tmpfs -o mode=1777 tmpfs /dev/shm && "
                 f"mount --bind {self.hosts_file} /etc/hosts && mount --bind {self.resolv_file} /etc/resolv.conf && "
                 "echo READY && exec sleep infinity")
        argv = ["/bin/sh", "-c", 'echo $$ > "$1" && echo $$ > "$2" && shift 2 && exec "$@"', "holder",
                str(self.cgroup(name, "freezer") / "cgroup.procs"), str(self.cgroup(name, "cpu") / "cgroup.procs"),
                "ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--ipc", "--propagation",
                "private", "/bin/sh", "-c", inner]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd="/", start_new_session=True)
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20.0)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"READY":
            _kill(proc.pid)
            err = proc.stderr.read().decode(errors="replace").strip() if proc.poll() is not None else ""
            proc.wait(timeout=10)
            raise RuntimeError(f"host {name}: could not start its namespaces holder: {err or 'no answer in 20s'}")
        proc.stdout.close()
        proc.stderr.close()
        self._holders[name] = proc

    def is_on(self, name: str) -> bool:
        holder = self._holders.get(self._host(name).name)
        return holder is not None and holder.poll() is None and name not in self._off

    # ------------------------------------------------------------------ processes
    def spawn(self, name: str, argv: Sequence[str], *, env: Optional[dict] = None, cwd: Optional[os.PathLike] = None,
              log_path: Optional[os.PathLike] = None, stdout=None, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        """Run ``argv`` on host ``name``: in its netns, mount/uts/ipc namespaces (its hostname,
        /tmp, /dev/shm, /etc/hosts) and cgroups. ``env`` is merged onto ``os.environ`` (the venv's
        bin stays on PATH); ``cwd`` defaults to the workdir; stdout and stderr go to ``log_path``
        (default ``<workdir>/logs/<host>-<n>-<prog>.log``) unless ``stdout`` (a file or PIPE) is
        given. The process leads its own session; its pid is the program's own."""
        host = self._host(name)
        with self._lock:
            if self._closed:
                raise RuntimeError("cluster is closed")
            holder = self._holders.get(name)
            if name in self._off or holder is None or holder.poll() is not None:
                raise HostDown(f"host {name} is powered off")
            self._nspawned += 1
            n = self._nspawned
        self._reap(name)  # forget the host's processes that have ended (Popen keeps their exit codes)
        full_env = {**os.environ, **(env or {})}
        path = full_env.get("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin").split(os.pathsep)
        if str(VENV_BIN) not in path and VENV_BIN.is_dir():
            path.insert(0, str(VENV_BIN))
        full_env["PATH"] = os.pathsep.join(path)
        full_env["HOSTNAME"] = host.name
        wd = str(cwd) if cwd is not None else str(self.workdir)
        out = stdout
        opened = None
        if out is None:
            if log_path is None:
                (self.workdir / "logs").mkdir(exist_ok=True)
                prog = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(str(argv[0])))[:40]
                log_path = self.workdir / "logs" / f"{name}-{n}-{prog}.log"
            opened = out = open(log_path, "ab")
        wrapper = ["/bin/sh", "-c", 'echo $$ > "$1" && echo $$ > "$2" && shift 2 && exec "$@"', "spawn",
                   str(self.cgroup(name, "freezer") / "cgroup.procs"), str(self.cgroup(name, "cpu") / "cgroup.procs"),
                   "nsenter", "-t", str(holder.pid), "-m", "-u", "-i", "-n", f"--wdns={wd}", "--",
                   *[str(a) for a in argv]]
        try:
            proc = subprocess.Popen(wrapper, env=full_env, cwd="/", stdin=stdin, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if opened is not None:
                opened.close()
        with self._lock:
            self._procs[name].append(proc)
        procs = self.cgroup(name, "cpu") / "cgroup.procs"  # written after the freezer's
        deadline = time.monotonic() + 10.0
        while proc.pid not in _read_pids(procs) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)  # the wrapper puts itself into both cgroups before it execs
        return proc

    def run(self, name: str, argv: Sequence[str], *, timeout_s: float = 60.0, env: Optional[dict] = None,
            cwd: Optional[os.PathLike] = None) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``name`` to completion; output captured (text, stderr in stdout).
        Killed and ``subprocess.TimeoutExpired`` raised after ``timeout_s``."""
        proc = self.spawn(name, argv, env=env, cwd=cwd, stdout=subprocess.PIPE)
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc.pid)
            proc.communicate()
            raise
        return subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(errors="replace"), "")

    def pids(self, name: str) -> List[int]:
        """Every live process of the host (from its freezer cgroup), not counting the host's
        namespaces holder."""
        holder = self._holders.get(self._host(name).name)
        skip = holder.pid if holder is not None else -1
        return sorted(p for p in _read_pids(self.cgroup(name) / "cgroup.procs") if p != skip and _alive(p))

    def _reap(self, name: Optional[str] = None) -> None:
        with self._lock:
            for n, procs in self._procs.items():
                if name is None or n == name:
                    self._procs[n] = [p for p in procs if p.poll() is None]

    # ------------------------------------------------------------------ freezer / power
    def freeze(self, name: str, timeout_s: float = 10.0) -> None:
        self._freezer_state(name, "FROZEN", timeout_s)

    def thaw(self, name: str, timeout_s: float = 10.0) -> None:
        self._freezer_state(name, "THAWED", timeout_s)

    def _freezer_state(self, name: str, state: str, timeout_s: float) -> None:
        f = self.cgroup(name) / "freezer.state"
        deadline = time.monotonic() + timeout_s
        while True:
            f.write_text(state)
            if f.read_text().strip() == state:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {name}: freezer stuck at {f.read_text().strip()} (wanted {state})")
            time.sleep(0.01)

    def link_down(self, name: str) -> None:
        _sh(["ip", "-n", self.switch, "link", "set", self.port_name(name), "down"])

    def link_up(self, name: str) -> None:
        _sh(["ip", "-n", self.switch, "link", "set", self.port_name(name), "up"])

    def kill_all(self, name: str, timeout_s: float = 10.0) -> List[int]:
        """SIGKILL every process of the host (the holder included) and wait until its cgroup is
        empty; returns the pids killed."""
        cg = self.cgroup(name) / "cgroup.procs"
        host = self._host(name)
        killed: List[int] = []
        deadline = time.monotonic() + timeout_s
        while True:
            pids = [p for p in _read_pids(cg) if _alive(p)]
            pids += [p for p in _netns_pids(host.netns) if _alive(p) and p not in pids]
            if not pids:
                break
            for p in pids:
                _kill(p)
                if p not in killed:
                    killed.append(p)
            if (self.cgroup(name) / "freezer.state").read_text().strip() != "THAWED":
                self.thaw(name)
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {name}: processes {pids} survive SIGKILL")
            time.sleep(0.02)
        with self._lock:
            procs = list(self._procs[name])
            holder = self._holders.pop(name, None)
        for proc in procs + ([holder] if holder else []):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._reap(name)
        return killed

    def power_off(self, name: str) -> List[int]:
        """Link down, freeze the host's cgroup (every process stops at once, mid-write), SIGKILL
        them all, thaw so the kills land, wait until none is left. The host's /tmp and /dev/shm
        are gone. Returns the pids killed (the holder's excluded)."""
        with self._lock:
            holder = self._holders.get(name)
            self._off.add(self._host(name).name)
        self.link_down(name)
        self.freeze(name)
        killed = self.kill_all(name)
        self.thaw(name)
        return [p for p in killed if holder is None or p != holder.pid]

    def power_on(self, name: str) -> None:
        """Link up and a fresh holder (a new hostname, empty /tmp and /dev/shm): the host can
        take processes again (a rejoin is the caller's: start an agent on it)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("cluster is closed")
        self.thaw(name)
        self.link_up(name)
        self.check_routes()
        holder = self._holders.get(name)
        if holder is None or holder.poll() is not None:
            self._start_holder(name)
        with self._lock:
            self._off.discard(name)

    # ------------------------------------------------------------------ etcd
    def start_etcd(self, port: int = ETCD_PORT) -> str:
        """etcd (``/usr/bin/etcd``) on the "etcd" host, data under ``<workdir>/etcd-data``;
        waits until it answers /health (asked from inside the etcd host); returns its URL."""
        if "etcd" not in self.hosts:
            raise ValueError("this cluster has no etcd host (Cluster(..., etcd_host=True))")
        if not os.path.exists(ETCD_BIN):
            raise NamespacesUnavailable(f"{ETCD_BIN} not found (apt-get install etcd-server)")
        if self._etcd is not None and self._etcd.poll() is None:
            assert self._etcd_url is not None
            return self._etcd_url
        addr = self.addr("etcd")
        url = f"http://{addr}:{port}"
        peer = "http://127.0.0.1:2380"
        data = self.workdir / "etcd-data"
        argv = [ETCD_BIN, "--name", "etcd", "--data-dir", str(data),
                "--listen-client-urls", f"{url},http://127.0.0.1:{port}", "--advertise-client-urls", url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"etcd={peer}", "--initial-cluster-state", "new"]
        self._etcd = self.spawn("etcd", argv, log_path=self.workdir / "etcd.log")
        self._etcd_argv_port = port
        probe = ("import sys, time, urllib.request\n"
                 "end = time.time() + 30\n"
                 "while time.time() < end:\n"
                 "    try:\n"
                 f"        if b'true' in urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=1).read():\n"
                 "            sys.exit(0)\n"
                 "    except Exception:\n"
                 "        pass\n"
                 "    time.sleep(0.1)\n"
                 "sys.exit(1)\n")
        res = self.run("etcd", [sys.executable, "-c", probe], timeout_s=40)
        if res.returncode != 0 or self._etcd.poll() is not None:
            tail = (self.workdir / "etcd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"etcd did not become healthy on the etcd host:\n{tail}")
        self._etcd_url = url
        return url

    def stop_etcd(self, sig: int = signal.SIGKILL) -> None:
        proc = self._etcd
        if proc is None:
            return
        _kill(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill(proc.pid)
            proc.wait(timeout=10)

    def restart_etcd(self) -> None:
        """Start etcd again on the same data dir (after stop_etcd)."""
        self.stop_etcd()
        self.start_etcd(getattr(self, "_etcd_argv_port", ETCD_PORT))

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Kill every process of every host; remove every qdisc, nft table, link, namespace and
        cgroup this cluster made, by name. Idempotent; errors are collected and raised once at
        the end (after everything was tried)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        errors: List[str] = []
        for name in self.hosts:
            try:
                if self.cgroup(name).exists():
                    self.kill_all(name)
            except Exception as exc:  # noqa: BLE001 - keep tearing down
                errors.append(f"kill {name}: {exc}")
        errors += _teardown(self.tag, list(self.hosts), self._made_ns)
        for f in (self.hosts_file, self.resolv_file):
            try:
                f.unlink()
            except OSError:
                pass
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        _LIVE.discard(self)
        if errors:
            raise RuntimeError(f"cluster {self.tag}: teardown left problems: " + "; ".join(errors))

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 - never hide the exception that ended the block
            if exc_type is None:
                raise
            import logging

            logging.getLogger(__name__).warning("%s", err)

    def __repr__(self) -> str:
        return f"Cluster(tag={self.tag!r}, hosts={list(self.hosts)}, subnet={self.subnet!r})"


def _teardown(tag: str, hosts: Sequence[str], netns: Sequence[str]) -> List[str]:
    """Remove everything named after ``tag``: qdiscs on its hosts' links, its nft table, veths,
    bridge, namespaces (after killing what still runs in them), cgroups, owner file."""
    errors: List[str] = []
    switch = f"{tag}-sw"
    present = set(_netns_list())
    for ns in netns:
        if ns in present:
            for p in _netns_pids(ns):
                _kill(p)
    if switch in present:
        for h in hosts:
            _sh(["ip", "netns", "exec", switch, "tc", "qdisc", "del", "dev", f"{tag}-{h}s", "root"], check=False)
            if f"{tag}-{h}" in present:
                _sh(["ip", "netns", "exec", f"{tag}-{h}", "tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
        _sh(["ip", "netns", "exec", switch, "nft", "delete", "table", "bridge", tag], check=False)
        for h in hosts:
            _sh(["ip", "-n", switch, "link", "del", f"{tag}-{h}s"], check=False)
        _sh(["ip", "-n", switch, "link", "del", f"{tag}-br"], check=False)
    for ns in netns:
        if ns in present:
            got = _sh(["ip", "netns", "del", ns], check=False)
            if got.returncode != 0:
                errors.append(f"ip netns del {ns}: {got.stderr.strip()}")
    _sh(["nft", "delete", "table", "ip", tag], check=False)  # the root namespace's guard
    for ctrl in CONTROLLERS:
        base = cgroup_dir(ctrl, tag)
        if not base.exists():
            continue
        for sub in [d for d in base.iterdir() if d.is_dir()] + [base]:
            err = _rmdir_cgroup(sub)
            if err:
                errors.append(err)
        try:
            base.parent.rmdir()  # the shared parent, once no run uses it
        except OSError:
            pass
    try:
        (OWNERS / f"{tag}.json").unlink()
    except OSError:
        pass
    return errors


def cgroup_dir(ctrl: str, tag: str) -> Path:
    """The cgroup (v1 controller ``ctrl``) holding the hosts of the run ``tag``."""
    return CGROUP_ROOT / ctrl / CGROUP_PARENT / tag


def _mkdir_cgroup(d: Path) -> None:
    for _ in range(50):  # another run may remove the shared parent between our two mkdirs
        try:
            d.mkdir(parents=True, exist_ok=True)
            return
        except FileNotFoundError:
            time.sleep(0.01)
    d.mkdir(parents=True, exist_ok=True)


def _rmdir_cgroup(d: Path) -> Optional[str]:
    deadline = time.monotonic() + 10.0
    while True:
        if (d / "freezer.state").exists():
            try:
                (d / "freezer.state").write_text("THAWED")
            except OSError:
                pass
        for p in _read_pids(d / "cgroup.procs"):
            _kill(p)
        try:
            d.rmdir()
            return None
        except FileNotFoundError:
            return None
        except OSError as exc:
            if time.monotonic() > deadline:
                return f"rmdir {d}: {exc}"
            time.sleep(0.05)


def _owner_alive(tag: str) -> bool:
    try:
        info = json.loads((OWNERS / f"{tag}.json").read_text())
    except (OSError, ValueError):
        return False
    pid = int(info.get("pid", -1))
    return pid > 0 and _alive(pid) and _start_time(pid) == info.get("start")


def cleanup_stale(prefix: str = PREFIX, *, include_live: bool = False) -> List[str]:
    """Remove what crashed runs left whose tag starts with ``prefix``: processes, namespaces,
    links, nft tables, qdiscs, cgroups. A run whose owner process is still alive is left alone
    unless ``include_live``. Returns the tags removed."""
    tags: set = set()
    present = _netns_list()
    for ns in present:  # a run's switch namespace names it
        if ns.startswith(prefix) and ns.endswith("-sw"):
            tags.add(ns[:-3])
    for ctrl in CONTROLLERS:
        base = CGROUP_ROOT / ctrl / CGROUP_PARENT
        if base.is_dir():
            tags.update(d.name for d in base.iterdir() if d.is_dir() and d.name.startswith(prefix))
    if OWNERS.is_dir():
        tags.update(f.stem for f in OWNERS.glob(f"{prefix}*.json"))
    done = []
    for tag in sorted(tags):
        if not _TAG_RE.fullmatch(tag) or (not include_live and _owner_alive(tag)):
            continue
        nss = [ns for ns in present if ns.rsplit("-", 1)[0] == tag]
        hosts = [ns.rsplit("-", 1)[1] for ns in nss if not ns.endswith("-sw")]
        for ctrl in CONTROLLERS:  # kill what runs in its cgroups first (a holder keeps mounts alive)
            base = cgroup_dir(ctrl, tag)
            if base.is_dir():
                for sub in base.iterdir():
                    if sub.is_dir():
                        if (sub / "freezer.state").exists():
                            (sub / "freezer.state").write_text("THAWED")
                        for p in _read_pids(sub / "cgroup.procs"):
                            _kill(p)
        _teardown(tag, hosts, [f"{tag}-sw"] + [f"{tag}-{h}" for h in hosts])
        for line in _sh(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
            if name.startswith(f"{tag}-"):
                _sh(["ip", "link", "del", name], check=False)
        tables = _sh(["nft", "list", "tables"], check=False).stdout.split("\n")
        for t in tables:
            parts = t.split()
            if len(parts) == 3 and parts[2] == tag:
                _sh(["nft", "delete", "table", parts[1], tag], check=False)
        done.append(tag)
    return done


def runs(prefix: str = PREFIX) -> List[dict]:
    """The runs whose tag starts with ``prefix`` that left a trace here: tag, owner pid, whether
    the owner is alive, workdir, namespaces."""
    present = _netns_list()
    out = []
    tags = {ns[:-3] for ns in present if ns.startswith(prefix) and ns.endswith("-sw")}
    if OWNERS.is_dir():
        tags.update(f.stem for f in OWNERS.glob(f"{prefix}*.json"))
    for tag in sorted(tags):
        try:
            info = json.loads((OWNERS / f"{tag}.json").read_text())
        except (OSError, ValueError):
            info = {}
        out.append({"tag": tag, "owner_pid": info.get("pid"), "alive": _owner_alive(tag),
                    "workdir": info.get("workdir"), "netns": [ns for ns in present if ns.rsplit("-", 1)[0] == tag]})
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.chaos.netns",
                                description="List or remove what chaos-harness runs left on this machine.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="runs with namespaces or owner files here")
    ls.add_argument("prefix", nargs="?", default=PREFIX)
    cl = sub.add_parser("cleanup", help="remove the leftovers of runs whose owner is dead")
    cl.add_argument("prefix", nargs="?", default=PREFIX)
    cl.add_argument("--include-live", action="store_true", help="also runs whose owner process still lives")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for r in runs(args.prefix):
            print(f"{r['tag']}  owner {r['owner_pid']} {'alive' if r['alive'] else 'dead'}  "
                  f"{len(r['netns'])} namespaces  {r['workdir'] or ''}")
        return 0
    try:
        require_namespaces()
    except NamespacesUnavailable as exc:
        print(f"cannot clean up: {exc}", file=sys.stderr)
        return 2
    removed = cleanup_stale(args.prefix, include_live=args.include_live)
    print(f"removed {len(removed)} run(s): {' '.join(removed)}" if removed else "nothing to remove")
    return 0


if __name__ == "__main__":
    sys.exit(main())
