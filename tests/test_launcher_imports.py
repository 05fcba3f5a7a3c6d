"""``--framework auto`` and the standby preload read real import statements (``ast``), not text."""
import pytest

from launchers.frameworks import detect_framework, framework_imports, standby_preload


def script(tmp_path, source):
    path = tmp_path / "train.py"
    path.write_text(source)
    return str(path)


def test_a_docstring_that_mentions_horovod_does_not_make_a_torch_script_horovod(tmp_path):
    source = ('"""Train a model.\n\nUnlike the old version, this does not\nimport horovod.torch as hvd\n'
              'from horovod import tensorflow\n"""\nimport torch\nHELP = """\nimport tensorflow as tf\n"""\n')
    path = script(tmp_path, source)
    assert detect_framework(path) == "torch"
    assert standby_preload(path) == ("torch",)
    assert framework_imports(source) == ("torch",)


@pytest.mark.parametrize("source, expected", [
    ("import torch\ndef main():\n    import horovod.torch as hvd\n", "horovod"),
    ("import torch\nif USE_TF:\n    import tensorflow as tf\n", "tensorflow"),
    ("try:\n    import keras\nexcept ImportError:\n    keras = None\n", "tensorflow"),
    ("class T:\n    def f(self):\n        from horovod.tensorflow import keras as hvd\n", "horovod"),
    ("import torch\nx = 'import tensorflow'\n", "torch"),
    ("from . import tensorflow\nimport torch\n", "torch"),  # a relative import is the user's own module
])
def test_imports_anywhere_in_the_code_count(tmp_path, source, expected):
    assert detect_framework(script(tmp_path, source)) == expected


def test_a_script_that_does_not_parse_falls_back_to_torch_with_a_warning(tmp_path, caplog):
    path = script(tmp_path, "import horovod.torch as hvd\ndef broken(:\n")
    with caplog.at_level("WARNING", logger="elastic.launcher"):
        assert detect_framework(path) == "torch"
    assert "cannot parse" in caplog.text and "assumes torch" in caplog.text
    assert standby_preload(path) == ()


@pytest.mark.parametrize("source, framework, preload", [
    ("from checkpoint.keras import ElasticCheckpoint\n", "tensorflow", ("tensorflow",)),  # the callbacks' home
    ("import launchers.tensorflow as ltf\nfrom checkpoint.keras import TrainingCheckpoint\n", "tensorflow",
     ("tensorflow",)),
    ("from launchers.horovod import init\nimport torch\n", "horovod", ("torch",)),
    ("import horovod.tensorflow.keras as hvd\nimport keras\nimport numpy\n", "horovod",
     ("horovod.tensorflow", "tensorflow")),
    ("from horovod import torch as hvd\n", "horovod", ("horovod.torch",)),
    ("import horovod\n", "horovod", ()),
    ("import checkpoint\nimport launchers.cli\n", "torch", ()),  # our other packages say nothing
    ("import torchvision\nimport kerasx\n", "torch", ()),  # a name's prefix is not its package
])
def test_detection_and_preload_come_from_one_reading(tmp_path, source, framework, preload):
    from launchers.frameworks import ScriptFrameworks, frameworks_of, script_frameworks

    path = script(tmp_path, source)
    assert script_frameworks(path) == ScriptFrameworks(framework, preload)
    assert (detect_framework(path), standby_preload(path)) == (framework, preload)
    assert frameworks_of(framework_imports(source)) == ScriptFrameworks(framework, preload)


def test_every_rule_names_a_known_framework_and_a_preload_the_agent_knows():
    from elastic.agent.forkserver import FORK_SAFE_PRELOADS
    from launchers.frameworks import _IMPORT_RULES, FRAMEWORKS

    preloads = {p for _, _, p in _IMPORT_RULES if p}
    assert {f for _, f, _ in _IMPORT_RULES} == set(FRAMEWORKS)
    assert preloads == {"torch", "tensorflow", "horovod.torch", "horovod.tensorflow"}
    assert FORK_SAFE_PRELOADS <= preloads  # the fork server's choice is made among these names
