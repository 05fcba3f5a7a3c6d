# elastic-run: `make demo` runs the main job, `make test` runs the tests; both bootstrap .venv.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -n auto

.PHONY: setup test test-slow demo bench clean

setup:
	@bash .ci/bootstrap.sh

test: setup
	$(PYTEST) -m "not slow and not gpu" tests

test-slow: setup
	$(PYTEST) -m slow tests

demo: setup
	@echo "make demo will run an elastic DDP job on scikit-learn's digits under elastic-run;"
	@echo "it arrives with the runtime (rendezvous, agent, launcher). Meanwhile: make test."

bench: setup
	@for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
