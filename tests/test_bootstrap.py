""".ci/bootstrap.sh stops, loudly, when Horovod is not built with both frameworks.

The real script runs in a scratch copy of the repository whose `.venv/bin/python` is a stand-in
that records each call and plays the part asked of it (pip succeeds; building Horovod with
TensorFlow fails; or the installed Horovod lacks its TensorFlow half). Nothing is installed.
"""
import os
import stat
import subprocess
import tarfile


from needs import missing

from paths import REPO  # noqa: E402

# $FAKE_MODE: "no-tf-half" (Horovod imports, its TensorFlow half does not) or "build-fails"
# (no Horovod installed, no cached wheel, the wheel build fails).
FAKE_PYTHON = r'''#!/usr/bin/env bash
printf '%s|%s\n' "$*" "WITH_TF=${HOROVOD_WITH_TENSORFLOW:-} WITHOUT_TF=${HOROVOD_WITHOUT_TENSORFLOW:-}" >> "$FAKE_CALLS"
case "$*" in
  "-c import horovod") [ "$FAKE_MODE" = no-tf-half ]; exit ;;
  *"import horovod.torch, horovod.tensorflow"*)
    [ "$FAKE_MODE" = no-tf-half ] && { echo "ImportError: horovod/tensorflow/mpi_lib: no such file" >&2; exit 1; }
    exit 0 ;;
  "-m pip download"*) cp "$FAKE_SDIST" "${@: -2:1}/"; exit 0 ;;
  "-m pip wheel"*) echo "CMake Error: TensorFlow half" ; exit 1 ;;
esac
exit 0
'''


def scratch_repo(tmp_path, mode):
    if not os.access("/usr/bin/cmake", os.X_OK):  # else the script would apt-get it
        missing("/usr/bin/cmake (Debian's cmake)", "make setup installs it")
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    for name in (".ci/bootstrap.sh", ".ci/constraints.txt", "setup.py"):
        (root / name).write_bytes(open(os.path.join(REPO, name), "rb").read())
    py = root / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(FAKE_PYTHON)
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    tools = tmp_path / "tools"  # an `etcd` on PATH, so the script does not apt-get one
    tools.mkdir()
    (tools / "etcd").write_text("#!/bin/sh\nexit 0\n")
    (tools / "etcd").chmod(0o755)
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    sdist_tree = tmp_path / "sdist" / "horovod-0.28.1"
    for sub in ("", "horovod/torch", "horovod/tensorflow"):
        (sdist_tree / sub).mkdir(parents=True, exist_ok=True)
        (sdist_tree / sub / "CMakeLists.txt").write_text("set(CMAKE_CXX_STANDARD 14)\nxla_mpi_ops.cc\n")
    sdist = tmp_path / "horovod-0.28.1.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(sdist_tree, arcname="horovod-0.28.1")
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "ELASTIC_RUN_CACHE": str(cache),
           "FAKE_MODE": mode, "FAKE_CALLS": str(tmp_path / "calls"), "FAKE_SDIST": str(sdist)}
    return root, cache, env


def run_bootstrap(root, env):
    return subprocess.run(["bash", str(root / ".ci" / "bootstrap.sh")], capture_output=True, text=True,
                          timeout=60, env=env)


def test_a_horovod_build_without_tensorflow_stops_the_setup(tmp_path):
    root, cache, env = scratch_repo(tmp_path, "build-fails")
    res = run_bootstrap(root, env)
    assert res.returncode == 1, res.stderr
    assert "ERROR: Horovod 0.28.1 failed to build with TensorFlow and PyTorch" in res.stderr
    assert f"ERROR: build log: {cache}/horovod-build.log" in res.stderr
    builds = [line for line in open(tmp_path / "calls") if line.startswith("-m pip wheel")]
    assert len(builds) == 1 and builds[0].rstrip().endswith("WITH_TF=1 WITHOUT_TF="), builds  # no PyTorch-only retry
    assert not (root / ".venv" / ".stamp").exists()  # the next `make setup` tries again


def test_an_installed_horovod_without_its_tensorflow_half_stops_the_setup(tmp_path):
    root, cache, env = scratch_repo(tmp_path, "no-tf-half")
    wheel = cache / "wheels" / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"a PyTorch-only wheel from an older setup")
    res = run_bootstrap(root, env)
    assert res.returncode == 1, res.stderr
    assert "ERROR: the installed Horovod lacks a framework" in res.stderr
    assert "horovod/tensorflow/mpi_lib: no such file" in res.stderr
    assert f"ERROR: build log: {cache}/horovod-build.log" in res.stderr
    assert not wheel.exists()  # the next `make setup` builds afresh
    calls = open(tmp_path / "calls").read()
    assert "-m pip uninstall -q -y horovod" in calls and "-e .[all,test]" not in calls
    assert not (root / ".venv" / ".stamp").exists()


def test_an_up_to_date_venv_returns_at_once(tmp_path):
    """The stamp logic is untouched: with the stamp current nothing runs."""
    root, cache, env = scratch_repo(tmp_path, "no-tf-half")
    stamp = subprocess.run("cat .ci/bootstrap.sh .ci/constraints.txt setup.py | sha256sum | cut -d' ' -f1",
                           shell=True, cwd=root, capture_output=True, text=True, check=True).stdout
    (root / ".venv" / ".stamp").write_text(stamp)
    res = run_bootstrap(root, env)
    assert res.returncode == 0, res.stderr
    assert "environment up to date" in res.stderr
    assert not (tmp_path / "calls").exists()  # the venv's python was never called
