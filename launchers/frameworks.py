"""Framework adapters by name, and ``--framework auto``: which one a script needs.

An adapter (:class:`elastic.agent.FrameworkAdapter`) adds what a framework needs beyond
torchrun's environment: Horovod a per-round Gloo rendezvous server and ``HOROVOD_*``,
TensorFlow a ``TF_CONFIG``. Adapters are registered by name (as store backends are), so a
third party can add one with :func:`register_adapter` without editing this package.

Detection reads the script's import statements with :mod:`ast` (no import, no execution;
imports inside functions and ``if`` blocks count, docstrings and comments do not): Horovod wins
over TensorFlow, which wins over PyTorch; anything else, or anything that cannot be read or
parsed (``-m``, ``--no-python``, a syntax error), gets PyTorch's environment, which is
harmless for the others. The same reading, through the same table, says what the warm
standbys import ahead of time (:func:`script_frameworks` gives both).
"""
from __future__ import annotations

import ast
import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from elastic.errors import ConfigError
from elastic.registry import Registry

__all__ = ["FRAMEWORKS", "ADAPTERS", "register_adapter", "create_adapter", "detect_framework",
           "resolve_framework", "framework_imports", "standby_preload", "ScriptFrameworks",
           "script_frameworks", "frameworks_of"]

log = logging.getLogger("elastic.launcher")

ADAPTERS: Registry = Registry("framework", entry_point_group="elastic_run.frameworks")
ADAPTERS.register("torch", "launchers.torch:TorchAdapter")
ADAPTERS.register("horovod", "launchers.horovod:HorovodAdapter")
ADAPTERS.register("tensorflow", "launchers.tensorflow:TensorFlowAdapter")

FRAMEWORKS = ("torch", "horovod", "tensorflow")
_ALIASES = {"pytorch": "torch", "ddp": "torch", "tf": "tensorflow", "keras": "tensorflow", "hvd": "horovod"}

def register_adapter(name: str, target, *, overwrite: bool = False) -> None:
    """Add an adapter: ``target`` is a class/factory or a ``"module:attr"`` path."""
    ADAPTERS.register(name, target, overwrite=overwrite)


def _parse(source: str, where: str = "the script") -> Optional[ast.AST]:
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError) as exc:  # ValueError: a NUL byte
        log.warning("cannot parse %s (%s); --framework auto assumes torch", where, exc)
        return None


def _imports(tree: Optional[ast.AST]) -> Tuple[str, ...]:
    names: List[str] = []
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
            # ``from horovod import torch`` imports the module horovod.torch
            names.extend(f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*")
    return tuple(dict.fromkeys(names))


def framework_imports(source: str) -> Tuple[str, ...]:
    """Dotted module names the source's import statements name, anywhere in the code
    (``import a.b as c, d`` -> a.b, d; ``from a import b`` -> a, a.b); () if it does not parse."""
    return _imports(_parse(source))


def _read(script: Optional[str]) -> str:
    if not script:
        return ""
    try:
        with open(script, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _script_tree(script: Optional[str], warn: bool) -> Optional[ast.AST]:
    source = _read(script)
    if not source:
        return None
    if warn:
        return _parse(source, script or "the script")
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError):
        return None


@dataclass(frozen=True)
class ScriptFrameworks:
    """What a script's imports say: the adapter it needs, and what its warm standbys import
    ahead of time (the agent's fork server takes only the fork-safe ones)."""

    framework: str = "torch"
    preload: Tuple[str, ...] = ()


# The one table both answers come from, most specific first: an import of the module or of
# anything below it means (framework, preload; None: nothing to preload for it). Horovod's
# framework halves are preloaded as such; our helpers mean their framework.
_IMPORT_RULES: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("horovod.torch", "horovod", "horovod.torch"),
    ("horovod.tensorflow", "horovod", "horovod.tensorflow"),
    ("horovod", "horovod", None),
    ("launchers.horovod", "horovod", None),
    ("tensorflow", "tensorflow", "tensorflow"),
    ("keras", "tensorflow", "tensorflow"),
    ("launchers.tensorflow", "tensorflow", "tensorflow"),
    ("checkpoint.keras", "tensorflow", "tensorflow"),
    ("torch", "torch", "torch"),
)
_PRECEDENCE = ("horovod", "tensorflow", "torch")  # Horovod runs on the other two


def _rule(name: str) -> Optional[Tuple[str, Optional[str]]]:
    for module, framework, preload in _IMPORT_RULES:
        if name == module or name.startswith(module + "."):
            return framework, preload
    return None


def frameworks_of(names: Sequence[str]) -> ScriptFrameworks:
    """:class:`ScriptFrameworks` for dotted module names imported (as :func:`framework_imports`
    gives them); anything unknown is PyTorch's, with nothing to preload."""
    found = [r for r in (_rule(n) for n in names) if r is not None]
    frameworks = {framework for framework, _ in found}
    framework = next((f for f in _PRECEDENCE if f in frameworks), "torch")
    return ScriptFrameworks(framework, tuple(dict.fromkeys(p for _, p in found if p)))


def script_frameworks(script: Optional[str], *, warn: bool = True) -> ScriptFrameworks:
    """What ``script``'s import statements say (``--framework auto`` and the standby preload):
    one reading of the file, one table. Unreadable or unparsable (``warn``: say so): PyTorch's,
    nothing to preload."""
    return frameworks_of(_imports(_script_tree(script, warn)))


def standby_preload(script: Optional[str]) -> Tuple[str, ...]:
    """What warm standbys should import ahead of time for ``script``: its frameworks, with
    Horovod's framework module and TensorFlow also when imported through Keras or our helpers."""
    return script_frameworks(script, warn=False).preload


def detect_framework(script: Optional[str]) -> str:
    """``horovod``, ``tensorflow`` or ``torch`` from what ``script`` imports (default torch)."""
    return script_frameworks(script).framework


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
