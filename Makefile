# The two front-door commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
# pytest-xdist workers of `make test` (each a TensorFlow process of ~1-2 GB)
TEST_WORKERS ?= 2

.PHONY: help demo test clean

help:
	@echo "make demo   synthetic log -> pipeline -> train -> evaluate -> export -> gRPC server -> queries (DEMO_DIR=$(DEMO_DIR))"
	@echo "make test   the test suite in TEST_WORKERS=$(TEST_WORKERS) processes (0: one process)"
	@echo "make clean  remove $(DEMO_DIR) and pytest's cache"
	@echo "Both demo and test create $(VENV) with requirements.txt when missing; then: source $(VENV)/bin/activate"

# requirements.txt pins wheels (numpy, scipy, matplotlib, ...) that need Python 3.11 or later
PYCHECK = import sys; v = sys.version_info[:2]; sys.exit(0 if v >= (3, 11) else "error: %s is Python %d.%d; requirements.txt needs 3.11 or later: %s" % (sys.argv[1], *v, sys.argv[2]))

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -c '$(PYCHECK)' '$(PYTHON)' 'pass PYTHON=python3.11 (or a later one)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c '$(PYCHECK)' '$(VENV)' 'rm -rf $(VENV), then pass PYTHON=python3.11 (or a later one)'
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m serving.demo --output $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	@if [ -e "$(DEMO_DIR)" ] && [ ! -e "$(DEMO_DIR)/.hiertcn-demo" ]; then \
		echo "$(DEMO_DIR) is not a demo's folder: not removed"; exit 1; fi
	rm -rf "$(DEMO_DIR)" .pytest_cache
