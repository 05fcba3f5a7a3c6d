"""The five packages import without any optional extra, cheaply, and name missing extras."""
import subprocess
import sys
import textwrap
import venv

import pytest

from paths import REPO  # noqa: E402
PACKAGES = ["elastic", "launchers", "checkpoint", "dataload", "profiler"]
HEAVY = ["torch", "tensorflow", "horovod", "pyetcd", "s3fs", "pynvml", "pyarrow",
         "prometheus_client", "matplotlib", "tensorboard", "boto3", "botocore"]

# Runs in a child: makes every optional module unimportable, as in a venv without extras.
BLOCKER = textwrap.dedent(f"""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in {HEAVY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
    sys.meta_path.insert(0, Block())
""")


def run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_packages_import_without_extras_and_load_nothing_heavy():
    res = run_child(f"""
        import {', '.join(PACKAGES)}
        loaded = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
        print('LOADED', loaded)
    """)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout


def test_missing_extra_names_the_extra():
    res = run_child("""
        from elastic.lazy import require
        from elastic.errors import MissingExtraError, ElasticError
        for module, extra in [('torch', 'torch'), ('tensorflow', 'tf'), ('pyetcd', 'etcd'),
                              ('s3fs', 's3'), ('pynvml', 'gpu'), ('horovod.torch', 'horovod')]:
            try:
                require(module, 'a test')
            except MissingExtraError as e:
                assert isinstance(e, ElasticError) and isinstance(e, ImportError)
                assert f"elastic-run[{extra}]" in str(e), str(e)
            else:
                raise SystemExit(f'{module} imported despite the block')
        print('OK')
    """)
    assert res.returncode == 0, res.stderr
    assert "OK" in res.stdout


def test_require_reraises_errors_that_are_not_a_missing_extra(tmp_path):
    (tmp_path / "broken_mod.py").write_text("import no_such_inner_module_xyz\n")
    sys.path.insert(0, str(tmp_path))
    try:
        from elastic.lazy import require
        from elastic.errors import MissingExtraError
        with pytest.raises(ModuleNotFoundError) as info:
            require("broken_mod")
        assert not isinstance(info.value, MissingExtraError)
    finally:
        sys.path.remove(str(tmp_path))


def test_error_hierarchy_is_rooted_in_elastic_error():
    from elastic.errors import ConfigError, ElasticError, UserError
    from checkpoint.errors import CheckpointError
    from dataload.errors import DataLoadError
    from profiler.errors import ProfilerError
    from launchers.errors import LauncherError

    for cls in (UserError, ConfigError, CheckpointError, DataLoadError, ProfilerError, LauncherError):
        assert issubclass(cls, ElasticError)


def test_registry_loads_lazily_and_names_missing_extra():
    from elastic.errors import ConfigError, MissingExtraError
    from elastic.registry import Registry

    reg = Registry("store backend")
    reg.register("json", "json:dumps")
    reg.register("ghost", "no_such_backend_module_xyz:Thing", extra="etcd")
    assert reg.get("json")({"a": 1}) == '{"a": 1}'
    with pytest.raises(MissingExtraError, match=r"elastic-run\[etcd\]"):
        reg.get("ghost")
    with pytest.raises(ConfigError, match="unknown store backend 'nope'; known: ghost, json"):
        reg.get("nope")
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("json", "json:loads")


def test_world_from_env():
    from elastic import World
    from elastic.errors import ConfigError

    w = World.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                        "GROUP_RANK": "1", "ELASTIC_GENERATION": "7", "TORCHELASTIC_RUN_ID": "job"})
    assert (w.rank, w.world_size, w.local_rank, w.node_rank, w.num_nodes, w.generation, w.run_id) == \
        (3, 4, 1, 1, 2, 7, "job")
    assert World.from_env({}) == World()
    with pytest.raises(ConfigError, match="RANK must be an integer"):
        World.from_env({"RANK": "x"})
    with pytest.raises(ConfigError, match="rank 4 of 4"):
        World.from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_import_in_a_fresh_venv_with_only_the_base_dependencies(tmp_path):
    """A real venv: base requirements only, no torch/tf/horovod/etcd/s3fs."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    install = subprocess.run([py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                              "numpy", "fsspec", "psutil", "safetensors"],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    res = subprocess.run([py, "-c", "import elastic, launchers, checkpoint, dataload, profiler; "
                          "import importlib.util as u; "
                          "print('HEAVY', [m for m in ('torch', 'tensorflow', 'horovod', 'pyetcd', 's3fs') "
                          "if u.find_spec(m)])"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout
