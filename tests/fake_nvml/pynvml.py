"""A stand-in for nvidia-ml-py's ``pynvml`` on machines without a GPU (tests only).

Implements the subset of the pynvml API that ``profiler.sampler.NvmlSampler`` uses, with the
same names, units (milliwatts, millijoules, MHz, bytes), result objects and error classes, so
the real sampler code runs against it. Put this directory first on ``sys.path``/PYTHONPATH.

Behaviour is steered by environment variables read at ``nvmlInit``:
``FAKE_NVML_DEVICES`` (device count, default 1), ``FAKE_NVML_INIT_ERROR`` (an NVML error code
that ``nvmlInit`` raises, e.g. 9 = driver not loaded), ``FAKE_NVML_NO_ENERGY=1`` (the energy
counter raises NotSupported, as on boards without one), ``FAKE_NVML_CPU_AFFINITY`` (the
CPUs of each device's NUMA node, ``;`` between devices, sysfs list syntax: ``0;1`` puts GPU 0
on CPU 0 and GPU 1 on CPU 1; default every CPU), ``FAKE_NVML_SOCKET_AFFINITY`` (the same per
socket; default the union of the node sets).
"""
import os
import threading
import time

FAKE = True

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2

NVML_AFFINITY_SCOPE_NODE = 0
NVML_AFFINITY_SCOPE_SOCKET = 1

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12

nvmlClocksThrottleReasonGpuIdle = 0x1
nvmlClocksThrottleReasonApplicationsClocksSetting = 0x2
nvmlClocksThrottleReasonSwPowerCap = 0x4
nvmlClocksThrottleReasonHwSlowdown = 0x8
nvmlClocksThrottleReasonSwThermalSlowdown = 0x20
nvmlClocksThrottleReasonNone = 0x0

_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
}


class NVMLError(Exception):
    """As pynvml: ``NVMLError(code)`` constructs the subclass registered for ``code``."""

    _valClassMapping = {}

    def __new__(cls, value):
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, *args):
        super().__init__(*args)

    def __str__(self):
        return _STRINGS.get(self.value, f"NVML Error with code {self.value}")


def _error_class(name, code):
    cls = type(f"NVMLError_{name}", (NVMLError,), {"__new__": lambda c, *a: NVMLError.__new__(c, code)})
    NVMLError._valClassMapping[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_DriverNotLoaded = _error_class("DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)


class c_nvmlUtilization_t:
    def __init__(self, gpu, memory):
        self.gpu = gpu
        self.memory = memory


class c_nvmlMemory_t:
    def __init__(self, total, free, used):
        self.total = total
        self.free = free
        self.used = used


class _Device:
    def __init__(self, index):
        self.index = index
        self.reads = 0
        self.t0 = time.monotonic()


_lock = threading.Lock()
_state = {"init": 0, "devices": [], "no_energy": False}
calls = {}  # function name -> number of calls, for tests


def _count(name):
    calls[name] = calls.get(name, 0) + 1


def _check_init():
    if _state["init"] <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def _device(handle):
    _check_init()
    if not isinstance(handle, _Device):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return handle


def nvmlInit():
    _count("nvmlInit")
    code = os.environ.get("FAKE_NVML_INIT_ERROR")
    if code:
        raise NVMLError(int(code))
    with _lock:
        if _state["init"] == 0:
            n = int(os.environ.get("FAKE_NVML_DEVICES", "1"))
            _state["devices"] = [_Device(i) for i in range(n)]
            _state["no_energy"] = os.environ.get("FAKE_NVML_NO_ENERGY") == "1"
        _state["init"] += 1


def nvmlShutdown():
    _count("nvmlShutdown")
    with _lock:
        _check_init()
        _state["init"] -= 1


def nvmlDeviceGetCount():
    _check_init()
    return len(_state["devices"])


def nvmlDeviceGetHandleByIndex(index):
    _count("nvmlDeviceGetHandleByIndex")
    _check_init()
    if not 0 <= index < len(_state["devices"]):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _state["devices"][index]


def nvmlDeviceGetName(handle):
    return f"Fake GPU {_device(handle).index}"


def nvmlDeviceGetUtilizationRates(handle):
    _count("nvmlDeviceGetUtilizationRates")
    dev = _device(handle)
    dev.reads += 1
    # Alternates 60/80 % so window averages are checkable: the mean of any even run is 70.
    return c_nvmlUtilization_t(60 if dev.reads % 2 else 80, 30 + dev.index)


def nvmlDeviceGetMemoryInfo(handle):
    _device(handle)
    total = 80 * 1024 ** 3
    used = 10 * 1024 ** 3
    return c_nvmlMemory_t(total, total - used, used)


def nvmlDeviceGetPowerUsage(handle):
    _device(handle)
    return 250_000  # milliwatts


def nvmlDeviceGetTotalEnergyConsumption(handle):
    dev = _device(handle)
    if _state["no_energy"]:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    return int(1_000_000 + (time.monotonic() - dev.t0) * 250_000)  # millijoules at 250 W


def nvmlDeviceGetClockInfo(handle, clock_type):
    _device(handle)
    if clock_type not in (NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM, NVML_CLOCK_MEM):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return {NVML_CLOCK_SM: 1410, NVML_CLOCK_GRAPHICS: 1410, NVML_CLOCK_MEM: 1593}[clock_type]


def nvmlDeviceGetCurrentClocksThrottleReasons(handle):
    dev = _device(handle)
    # Power capping on odd reads, idle on even ones: the window OR is 0x5.
    return nvmlClocksThrottleReasonSwPowerCap if dev.reads % 2 else nvmlClocksThrottleReasonGpuIdle


nvmlDeviceGetCurrentClocksEventReasons = nvmlDeviceGetCurrentClocksThrottleReasons


def nvmlDeviceGetTemperature(handle, sensor):
    _device(handle)
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return 65


def _cpu_sets(var, count, default):
    text = os.environ.get(var)
    if not text:
        return [default] * count
    sets = []
    for part in text.split(";"):
        cpus = set()
        for item in filter(None, (p.strip() for p in part.split(","))):
            lo, _, hi = item.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        sets.append(cpus)
    return (sets + [sets[-1]] * count)[:count]


def _mask(cpus, size):
    """As NVML: ``size`` unsigned longs (64 bits each here), CPU n = bit n % 64 of word n // 64."""
    words = [0] * size
    for cpu in cpus:
        if cpu // 64 < size:
            words[cpu // 64] |= 1 << (cpu % 64)
    return words


def nvmlDeviceGetCpuAffinityWithinScope(handle, cpuSetSize, scope):
    _count("nvmlDeviceGetCpuAffinityWithinScope")
    dev = _device(handle)
    count = len(_state["devices"])
    nodes = _cpu_sets("FAKE_NVML_CPU_AFFINITY", count, set(range(os.cpu_count() or 1)))
    if scope == NVML_AFFINITY_SCOPE_NODE:
        return _mask(nodes[dev.index], cpuSetSize)
    if scope == NVML_AFFINITY_SCOPE_SOCKET:
        union = set().union(*nodes)
        return _mask(_cpu_sets("FAKE_NVML_SOCKET_AFFINITY", count, union)[dev.index], cpuSetSize)
    raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)


def nvmlDeviceGetCpuAffinity(handle, cpuSetSize):
    return nvmlDeviceGetCpuAffinityWithinScope(handle, cpuSetSize, NVML_AFFINITY_SCOPE_NODE)


def nvmlErrorString(result):
    return _STRINGS.get(result, f"Unknown Error {result}")
