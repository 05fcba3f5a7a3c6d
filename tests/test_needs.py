"""tests/needs.py: a test whose module or tool is missing skips locally and fails under CI."""
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))

NEEDY = '''
import pytest
from needs import needs, require, require_tool

@needs("no_such_module_for_needs_test", why="an extra")
def test_marker():
    pass

def test_require():
    require("no_such_module_for_needs_test")

def test_tool():
    require_tool("no-such-tool-for-needs-test")

def test_present():
    assert require("json").dumps(1) == "1"
'''


def run_needy(tmp_path, ci):
    (tmp_path / "test_needy.py").write_text(NEEDY)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = TESTS + os.pathsep + env.get("PYTHONPATH", "")
    if ci is not None:
        env["CI"] = ci
    # tests/conftest.py as a plugin: its pytest_runtest_setup reads the `needs` marker
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
                           "-q", "-rfs", "-n", "0", "--rootdir", str(tmp_path), "test_needy.py"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_missing_pieces_skip_outside_ci(tmp_path):
    res = run_needy(tmp_path, None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed, 3 skipped" in res.stdout, res.stdout
    assert "no_such_module_for_needs_test" in res.stdout and "make setup" in res.stdout


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_pieces_fail_under_ci_and_are_named(tmp_path, ci):
    res = run_needy(tmp_path, ci)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "2 failed, 1 passed, 1 error" in res.stdout, res.stdout  # the marker fails at set-up
    assert "missing under CI: no_such_module_for_needs_test" in res.stdout
    assert "missing under CI: no-such-tool-for-needs-test" in res.stdout
    assert "installed by make setup / the test extra" in res.stdout
