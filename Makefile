# Two commands for a newcomer: `make run` and `make test`. Both create .venv/,
# install the pinned torch wheels and this project (building the C++/CUDA
# extension), then run the main job or the whole test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
EXT_SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: run test test-fast bench gpu-check install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch comes first and pinned: the extension is built against it without build
# isolation. Everything else is pyproject.toml's (the library's dependencies and
# the train, dev and export extras), so no dependency is listed here a second time.
$(VENV)/.deps: $(VENV)/bin/python pyproject.toml
	$(PIP) install --quiet "setuptools>=64" wheel
	$(PIP) install --quiet $(TORCH_PINS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(EXT_SOURCES)
	$(PIP) install --quiet --no-build-isolation -e ".[train,dev,export]" $(TORCH_PINS)
	touch $@

install: $(VENV)/.built

run: install
	$(PY) evaluate.py

test: install
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

# Everything but the tests marked slow (multi-process DDP, the 500-image evaluation,
# the benchmark harness): about a minute.
test-fast: install
	$(PY) -m pytest -q -m "not slow" -n 2 $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.family
	$(PY) -m benchmarks.nms
	$(PY) -m benchmarks.yolo

# On a machine with a CUDA GPU: the CUDA tests, then the GPU benchmark
# (benchmarks/results/gpu_<device>.json).
gpu-check: install
	$(PY) -m pytest -q -m cuda tests/
	$(PY) -m benchmarks.gpu

clean:
	rm -rf build *.egg-info ssd_post/*.so $(VENV)/.built
