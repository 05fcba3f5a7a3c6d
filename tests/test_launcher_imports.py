"""``--framework auto`` and the standby preload read real import statements (``ast``), not text."""
import pytest

from launchers.frameworks import detect_framework, framework_imports, standby_preload, uses_horovod_elastic


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


@pytest.mark.parametrize("source, expected", [
    ("import horovod.torch as hvd\n@hvd.elastic.run\ndef train(state):\n    pass\n", True),
    ("import horovod.torch as hvd\nstate = hvd.elastic.TorchState(model, optimizer, epoch=0)\n", True),
    ("import horovod.tensorflow.keras as hvd\nstate = hvd.elastic.KerasState(model, batch=0)\n", True),
    ("import horovod.tensorflow.keras as hvd\nstate = hvd.elastic.TensorFlowKerasState(model)\n", True),
    ("import horovod.tensorflow as hvd\nstate = hvd.elastic.TensorFlowState(variables)\n", True),
    ("from horovod.torch import elastic\n@elastic.run\ndef train(state):\n    pass\n", True),
    ("from horovod.torch import elastic as el\ns = el.ObjectState(epoch=0)\n", True),
    ("import horovod.torch.elastic\nhorovod.torch.elastic.run(train)\n", True),
    ("from horovod.torch.elastic import run, TorchState\n@run\ndef train(state):\n    pass\n", True),
    ("from horovod import torch as hvd\nhvd.elastic.run(train)\n", True),
    ("def main():\n    import horovod.torch as hvd\n    hvd.elastic.run(train)(hvd.elastic.TorchState(m))\n", True),
    # not Horovod's elastic API:
    ("import horovod.torch as hvd\nhvd.init()\nhvd.DistributedOptimizer(opt)\n", False),
    ("import elastic\n@elastic.run\ndef train(state):\n    pass\n", False),  # ours, not Horovod's
    ("import horovod.torch as hvd\nimport elastic\nelastic.run(train)\n", False),
    ('"""Use hvd.elastic.run with import horovod.torch as hvd."""\nimport torch\n', False),
    ("import horovod.torch as hvd\nhvd.elastic.State\n", False),
    ("import horovod.torch as hvd\ndef broken(:\n", False),
])
def test_uses_horovod_elastic(tmp_path, source, expected):
    assert uses_horovod_elastic(script(tmp_path, source)) is expected


def test_uses_horovod_elastic_on_what_cannot_be_read():
    assert uses_horovod_elastic(None) is False
    assert uses_horovod_elastic("/no/such/train.py") is False
