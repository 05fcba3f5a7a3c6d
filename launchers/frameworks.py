"""Framework adapters by name, and ``--framework auto``: which one a script needs.

An adapter (:class:`elastic.agent.FrameworkAdapter`) adds what a framework needs beyond
torchrun's environment: Horovod a per-round Gloo rendezvous server and ``HOROVOD_*``,
TensorFlow a ``TF_CONFIG``. Adapters are registered by name (as store backends are), so a
third party can add one with :func:`register_adapter` without editing this package.

Detection reads the script's import lines only (no import, no execution): Horovod wins over
TensorFlow, which wins over PyTorch; anything else, or anything that cannot be read (``-m``,
``--no-python``), gets PyTorch's environment, which is harmless for the others.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

from elastic.errors import ConfigError
from elastic.registry import Registry

__all__ = ["FRAMEWORKS", "ADAPTERS", "register_adapter", "create_adapter", "detect_framework",
           "resolve_framework", "framework_imports", "standby_preload"]

ADAPTERS: Registry = Registry("framework")
ADAPTERS.register("torch", "launchers.torch:TorchAdapter")
ADAPTERS.register("horovod", "launchers.horovod:HorovodAdapter")
ADAPTERS.register("tensorflow", "launchers.tensorflow:TensorFlowAdapter")

FRAMEWORKS = ("torch", "horovod", "tensorflow")
_ALIASES = {"pytorch": "torch", "ddp": "torch", "tf": "tensorflow", "keras": "tensorflow", "hvd": "horovod"}

# Top-level ``import x`` / ``from x import`` lines, and names inside ``import a, b``.
_IMPORT_LINE = re.compile(r"^[ \t]*(?:from[ \t]+([\w.]+)[ \t]+import\b|import[ \t]+([\w., \t]+?)(?:[ \t]+as\b.*)?$)",
                          re.M)
_READ_BYTES = 1 << 20


def register_adapter(name: str, target, *, overwrite: bool = False) -> None:
    """Add an adapter: ``target`` is a class/factory or a ``"module:attr"`` path."""
    ADAPTERS.register(name, target, overwrite=overwrite)


def framework_imports(source: str) -> Tuple[str, ...]:
    """Dotted module names the source imports, in order (``import a.b as c, d`` -> a.b, d)."""
    names = []
    for m in _IMPORT_LINE.finditer(source):
        if m.group(1):
            names.append(m.group(1))
        else:
            for part in m.group(2).split(","):
                name = part.strip().split()[0] if part.strip() else ""
                if name:
                    names.append(name)
    return tuple(names)


def _read(script: Optional[str]) -> str:
    if not script:
        return ""
    try:
        with open(script, encoding="utf-8", errors="replace") as f:
            return f.read(_READ_BYTES)
    except OSError:
        return ""


def standby_preload(script: Optional[str]) -> Tuple[str, ...]:
    """What warm standbys should import ahead of time for ``script``: its frameworks, with
    Horovod's framework module and TensorFlow also when imported through Keras or our helpers."""
    names = framework_imports(_read(script))
    out = []
    for name in names:
        top = name.split(".")[0]
        if top == "torch":
            out.append("torch")
        elif top in ("tensorflow", "keras") or name.startswith("launchers.tensorflow"):
            out.append("tensorflow")
        elif name.startswith(("horovod.torch", "horovod.tensorflow")):
            out.append(".".join(name.split(".")[:2]))
    return tuple(dict.fromkeys(out))


def detect_framework(script: Optional[str]) -> str:
    """``horovod``, ``tensorflow`` or ``torch`` from what ``script`` imports (default torch)."""
    source = _read(script)
    if not source:
        return "torch"
    tops = set()
    for name in framework_imports(source):
        parts = name.split(".")
        tops.add(parts[0])
        if parts[0] == "launchers" and len(parts) > 1:
            tops.add(parts[1])  # launchers.horovod / launchers.tensorflow helpers
    # ``from launchers import horovod`` names the helper in the imported names, not the module.
    for m in re.finditer(r"^[ \t]*from[ \t]+launchers[ \t]+import[ \t]+([\w, \t]+)", source, re.M):
        tops.update(p.strip().split()[0] for p in m.group(1).split(",") if p.strip())
    if "horovod" in tops:
        return "horovod"
    if "tensorflow" in tops or "keras" in tops:
        return "tensorflow"
    return "torch"


def resolve_framework(value: Optional[str], script: Optional[str]) -> str:
    """The framework for ``--framework VALUE`` (``auto``/None: detected from ``script``)."""
    name = (value or "auto").strip().lower()
    name = _ALIASES.get(name, name)
    if name == "auto":
        return detect_framework(script)
    if name not in ADAPTERS.names():
        raise ConfigError(f"--framework {value!r}: expected auto, {', '.join(ADAPTERS.names())}")
    return name


def create_adapter(name: str, **kwargs):
    """A fresh adapter instance of the framework ``name``."""
    return ADAPTERS.get(_ALIASES.get(name, name))(**kwargs)
