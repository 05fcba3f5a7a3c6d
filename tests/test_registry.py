"""Backends and framework adapters found by name: in code, and through installed entry points."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from elastic.errors import ConfigError
from elastic.registry import Registry


def _install_plugin(root, group: str, name: str) -> None:
    """A distribution on ``root`` (as pip would leave it) that declares ``name`` in ``group``."""
    (root / "plugin_pkg.py").write_text("def factory(**conf):\n    return ('plugin', conf)\n")
    dist = root / "plugin_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = plugin_pkg:factory\n")


def test_registered_names_are_imported_lazily_and_unknown_ones_are_a_config_error():
    reg = Registry("widget")
    reg.register("json", "json:dumps")
    assert reg.get("json")({"a": 1}) == '{"a": 1}'
    with pytest.raises(ConfigError, match="unknown widget 'nope'; known: json"):
        reg.get("nope")
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("json", "json:loads")


@pytest.mark.parametrize("module, registry, group", [
    ("elastic.store", "backends", "elastic_run.stores"),
    ("launchers.frameworks", "ADAPTERS", "elastic_run.frameworks"),
])
def test_an_installed_entry_point_adds_a_backend(tmp_path, module, registry, group):
    """A third-party distribution's entry point is found by name, without editing our code; a
    name we register ourselves is not shadowed by one."""
    _install_plugin(tmp_path, group, "thirdparty")
    (tmp_path / "plugin_pkg-1.0.dist-info" / "entry_points.txt").write_text(
        f"[{group}]\nthirdparty = plugin_pkg:factory\ntorch = plugin_pkg:factory\n"
        f"embedded = plugin_pkg:factory\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from {module} import {registry} as reg
        print(reg.get("thirdparty")(x=1))
        print("thirdparty" in reg.names())
        builtin = "embedded" if "store" in {module!r} else "torch"
        print(reg.get(builtin).__module__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == "('plugin', {'x': 1})"
    assert lines[1] == "True"
    assert lines[2] != "plugin_pkg"
