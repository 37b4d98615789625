# make test   bootstrap .venv (torch + build/test requirements), build epmoe._C, run pytest
# make demo   same bootstrap and build, then `epmoe demo`
# make bench  same bootstrap and build, then `epmoe bench` (every benchmark script, JSON + summary in build/bench)
# Variables: PYTHON (interpreter for the venv), VENV, TORCH_SPEC (e.g. torch==2.13.0 for the CPU-only build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
PY := $(VENV)/bin/python
BUILD_DIR ?= build/cmake
# torch guesses the CUDA home from the nvcc on PATH, which may be a wrapper: point it at the real toolkit.
export CUDA_HOME ?= $(shell for d in /usr/local/cuda /opt/cuda; do [ -x $$d/bin/nvcc ] && readlink -f $$d && break; done)
export EPMOE_BUILD_DIR := $(abspath $(BUILD_DIR))

.PHONY: test demo bench build lint clean

$(VENV)/.deps: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23"
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# First build through pip (editable install, so `import epmoe` and the `epmoe` command work anywhere);
# afterwards the CMake build folder is reused directly, which is a no-op when nothing changed.
$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml
	# -v: the CMake summary and ptxas resource usage of every kernel belong in the build log
	$(PY) -m pip install -v --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.installed
	cmake --build $(BUILD_DIR)

test: build
	$(PY) -m pytest -q

demo: build
	$(VENV)/bin/epmoe demo

bench: build
	$(VENV)/bin/epmoe bench --out build/bench

lint: $(VENV)/.deps
	$(PY) -m ruff check python tests benchmarks

clean:
	rm -rf build python/epmoe/_C*.so
