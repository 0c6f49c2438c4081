# Two commands on a fresh machine: `make train` (set up, then train on the demo data) and `make test`.
# Everything runs in a virtual environment inside the checkout (.venv).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# Used only on machines without an NVIDIA GPU, and only when the venv has no torch yet.
TORCH_CPU_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=
# Test processes (pytest-xdist): most tests wait on a subprocess importing torch, so two share two cores well.
TEST_WORKERS ?= 2

.PHONY: help setup setup-dev train test lint format bench clean

help:
	@echo "make train   set up .venv and train SegResNet on the built-in demo data (ARGS='key=value ...')"
	@echo "make test    set up .venv and run the test suite"
	@echo "make lint    ruff check + format check;  make format  apply ruff format"
	@echo "make bench   seglight against the reference lab, side by side: one table (benchmarks/run.py)"

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

# torch first, chosen for this machine: a torch already in the venv is left alone; with an NVIDIA GPU,
# PyPI's default (CUDA) build; otherwise the CPU build, so no multi-GB CUDA download lands on a CPU-only box.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "seglight: keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "seglight: NVIDIA GPU found: installing PyTorch's CUDA build"; \
		$(PY) -m pip install "torch>=2.2"; \
	else \
		echo "seglight: no NVIDIA GPU found: installing PyTorch's CPU build (torch==$(TORCH_CPU_VERSION))"; \
		if $(PY) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=5)" 2>/dev/null; then \
			$(PY) -m pip install "torch==$(TORCH_CPU_VERSION)" --extra-index-url "$(TORCH_CPU_INDEX)"; \
		else \
			echo "seglight: $(TORCH_CPU_INDEX) is not reachable: torch==$(TORCH_CPU_VERSION) from the default index"; \
			$(PY) -m pip install "torch==$(TORCH_CPU_VERSION)"; \
		fi; \
	fi
	$(PY) -m pip install -e .
	touch $@

# The test tools (pytest, ruff, moto, nbclient, ...) only where tests or lint run.
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -e ".[dev]"
	touch $@

train: setup
	$(PY) -m seglight.train experiment=demo $(ARGS)

test: setup-dev
	$(PY) -m pytest -n $(TEST_WORKERS) $(ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup-dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# One table of side-by-side ratios, also written to benchmarks/results/<machine>.json (ARGS="--repeats 5").
bench: setup
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist *.egg-info
