"""``--numa-binding``: which CPUs each local worker is bound to, as torchrun's modes choose them.

Local rank ``i`` uses GPU ``i``. NVML tells which CPUs are near that GPU
(``nvmlDeviceGetCpuAffinityWithinScope``: its NUMA node, or its socket); the mode narrows that
down the way ``torch.numa.binding`` does:

``node``          every CPU of the GPU's NUMA node
``socket``        every CPU of the GPU's socket
``exclusive``     the node's physical cores split evenly among the GPUs on that node (lower
                  GPU indices get the remainder), with their hyperthread siblings
``core-complex``  one group of cores sharing the last-level cache, a different one per GPU of
                  the node where there are enough

Always intersected with the CPUs this process may use (a cgroup or ``taskset`` wins). Core and
cache groups come from ``/sys/devices/system/cpu``; where it is missing each CPU counts alone.
The agent applies the result to each worker with ``sched_setaffinity``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

from elastic.errors import ConfigError

__all__ = ["MODES", "cpu_affinity", "bind_cpus", "parse_cpu_list", "format_cpu_list"]

MODES = ("node", "socket", "exclusive", "core-complex")
_SCOPE_NODE, _SCOPE_SOCKET = 0, 1  # NVML_AFFINITY_SCOPE_NODE / _SOCKET
_SYS_CPU = "/sys/devices/system/cpu"


def parse_cpu_list(text: str) -> Set[int]:
    """``"0-2,4"`` (sysfs / ``taskset -c`` syntax) -> {0, 1, 2, 4}."""
    out: Set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def format_cpu_list(cpus: Iterable[int]) -> str:
    """{0, 1, 2, 4} -> ``"0-2,4"``."""
    runs: List[List[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _mask_to_cpus(words: Sequence[int]) -> Set[int]:
    """NVML's affinity bitmask (64-bit words, CPU 0 = bit 0 of word 0) -> CPU indices."""
    return {w * 64 + b for w, word in enumerate(words) for b in range(64) if int(word) >> b & 1}


def _sysfs_group(cpu: int, relative: Callable[[int], str]) -> FrozenSet[int]:
    try:
        with open(os.path.join(_SYS_CPU, f"cpu{cpu}", relative(cpu))) as f:
            return frozenset(parse_cpu_list(f.read()))
    except (OSError, ValueError):
        return frozenset({cpu})


def _core_of(cpu: int) -> FrozenSet[int]:
    """The logical CPUs sharing ``cpu``'s physical core (hyperthread siblings)."""
    return _sysfs_group(cpu, lambda c: "topology/thread_siblings_list")


def _cache_of(cpu: int) -> FrozenSet[int]:
    """The logical CPUs sharing ``cpu``'s highest-level data/unified cache (a core complex)."""
    base = os.path.join(_SYS_CPU, f"cpu{cpu}", "cache")
    best, shared = -1, frozenset({cpu})
    try:
        entries = os.listdir(base)
    except OSError:
        return shared
    for entry in entries:
        if not (entry.startswith("index") and entry[5:].isdecimal()):
            continue
        try:
            with open(os.path.join(base, entry, "type")) as f:
                if f.read().strip() not in ("Unified", "Data"):
                    continue
            with open(os.path.join(base, entry, "level")) as f:
                level = int(f.read())
            if level > best:
                with open(os.path.join(base, entry, "shared_cpu_list")) as f:
                    best, shared = level, frozenset(parse_cpu_list(f.read()))
        except (OSError, ValueError):
            continue
    return shared


def bind_cpus(mode: str, gpu: int, node_cpus: Sequence[Set[int]], socket_cpus: Sequence[Set[int]],
              allowed: Set[int], core_of: Callable[[int], FrozenSet[int]] = _core_of,
              cache_of: Callable[[int], FrozenSet[int]] = _cache_of) -> Set[int]:
    """The CPUs for the worker on GPU ``gpu`` (a pure function of the topology it is given).

    ``node_cpus[g]`` / ``socket_cpus[g]``: the CPUs of GPU ``g``'s NUMA node / socket.
    GPUs whose node CPU sets are equal share a node.
    """
    if mode not in MODES:
        raise ConfigError(f"--numa-binding {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "socket":
        return set(socket_cpus[gpu]) & allowed
    node = set(node_cpus[gpu]) & allowed
    if mode == "node":
        return node
    peers = [g for g in range(len(node_cpus)) if set(node_cpus[g]) == set(node_cpus[gpu])]
    index = peers.index(gpu)
    if mode == "exclusive":
        groups = _group(node, core_of)
        per, extra = divmod(len(groups), len(peers))
        if per < 1:
            raise ConfigError(f"--numa-binding exclusive: GPU {gpu}'s NUMA node has {len(groups)} "
                              f"physical core(s) for {len(peers)} GPUs")
        start = index * per + min(index, extra)
        end = start + per + (1 if index < extra else 0)
        return {cpu for group in groups[start:end] for cpu in group}
    # core-complex: fullest cache groups first, then by lowest CPU, as torch orders them
    groups = sorted(_group(node, cache_of), key=lambda g: (-len(g), min(g)))
    return set(groups[index % len(groups)]) if groups else set()


def _group(cpus: Set[int], key: Callable[[int], FrozenSet[int]]) -> List[Set[int]]:
    """``cpus`` grouped by ``key`` (core or cache), in order of each group's lowest CPU."""
    groups: Dict[int, Set[int]] = {}
    for cpu in sorted(cpus):
        groups.setdefault(min(key(cpu) or {cpu}), set()).add(cpu)
    return [groups[k] for k in sorted(groups)]


def _nvml_topology(nproc: int) -> Tuple[List[Set[int]], List[Set[int]]]:
    """Per GPU: the CPUs of its NUMA node and of its socket, from NVML."""
    need = "--numa-binding needs NVIDIA GPUs (NVML)"
    try:
        import pynvml
    except ImportError:
        raise ConfigError(f"{need}: pynvml is not installed (pip install 'elastic-run[gpu]')") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise ConfigError(f"{need}: NVML is not available here ({exc})") from None
    try:
        count = pynvml.nvmlDeviceGetCount()
        if nproc > count:
            raise ConfigError(f"{need}: local rank {count} has no GPU ({count} GPU(s) here, "
                              f"--nproc-per-node {nproc})")
        words = (os.cpu_count() or 1) // 64 + 1
        nodes, sockets = [], []
        for gpu in range(count):
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
            within = getattr(pynvml, "nvmlDeviceGetCpuAffinityWithinScope", None)
            if within is not None:
                nodes.append(_mask_to_cpus(within(handle, words, _SCOPE_NODE)))
                sockets.append(_mask_to_cpus(within(handle, words, _SCOPE_SOCKET)))
            else:  # drivers before R470: one "ideal" affinity, the node's CPUs
                cpus = _mask_to_cpus(pynvml.nvmlDeviceGetCpuAffinity(handle, words))
                nodes.append(cpus)
                sockets.append(cpus)
        return nodes, sockets
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{need}: reading the GPUs' CPU affinity failed ({exc})") from None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def cpu_affinity(mode: Optional[str], nproc: int) -> Optional[Tuple[Tuple[int, ...], ...]]:
    """Per local rank ``0..nproc-1``: the CPUs to bind it to under ``mode`` (None: no binding)."""
    if mode is None:
        return None
    if mode not in MODES:
        raise ConfigError(f"--numa-binding {mode!r}: expected one of {', '.join(MODES)}")
    nodes, sockets = _nvml_topology(nproc)
    allowed = set(os.sched_getaffinity(0))
    out = []
    for rank in range(nproc):
        cpus = bind_cpus(mode, rank, nodes, sockets, allowed)
        if not cpus:
            raise ConfigError(f"--numa-binding {mode}: no CPU this process may use is near GPU {rank}")
        out.append(tuple(sorted(cpus)))
    return tuple(out)
