# elastic-run: `make demo` runs the main job, `make test` runs the tests; both bootstrap .venv.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -n auto

.PHONY: setup lint test test-slow chaos demo demo-simple bench clean

setup:
	@bash .ci/bootstrap.sh

# ruff (ruff.toml) over everything, mypy (mypy.ini) over the five packages; CI runs it first.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

test: setup
	$(PYTEST) -m "not slow and not gpu" tests

test-slow: setup
	$(PYTEST) -m slow tests

# Multi-host chaos on network-namespace hosts (root): the smoke tests, then the goodput benchmark.
chaos: setup
	$(PY) -m benchmarks.chaos.netns cleanup
	$(PY) -m pytest -m chaos tests/chaos
	$(PY) benchmarks/goodput.py

# The elastic story (examples/elastic_demo.py): two nodes train; a worker is killed, a node is
# drained through the control plane, a third joins; each event, the pause it caused, the accuracy.
demo: setup
	@$(PY) examples/elastic_demo.py

# One node, two workers, nothing changes: the plain torchrun-style example.
demo-simple: setup
	@ckpt=$$(mktemp -d) && trap 'rm -rf $$ckpt' EXIT && \
	$(VENV)/bin/elastic-run --standalone --nproc-per-node 2 --max-restarts 3 \
		examples/torch_ddp.py --ckpt-dir $$ckpt

bench: setup
	@for b in benchmarks/[a-z]*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# A separate venv for benchmarks/dataload.py's MosaicML Streaming side: its pins (numpy<2.2,
# transformers<5, ...) clash with ours. Only what its reader imports is installed; its
# torchvision-based `streaming.vision` is not (PyPI's torchvision needs CUDA torch).
BENCH_VENV := .bench-venv
bench-env:
	@[ -x $(BENCH_VENV)/bin/python ] || python3 -m venv $(BENCH_VENV)
	@echo '*' > $(BENCH_VENV)/.gitignore
	$(BENCH_VENV)/bin/pip install -q -c .ci/constraints.txt --no-deps mosaicml-streaming==0.13.0
	$(BENCH_VENV)/bin/pip install -q -c .ci/constraints.txt 'numpy<2.2' torch==2.13.0 \
	  'transformers<5' 'xxhash<4' boto3 filelock typing_extensions catalogue zstd tqdm \
	  python-snappy brotli pillow psutil
