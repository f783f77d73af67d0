# Two entry points: `make serve` (install, then serve the bundled model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch's CPU build comes from PyTorch's own wheel index (PyPI's Linux wheels pull GBs of CUDA).
# Empty: skip the index (torch then comes from pip's usual sources, e.g. a local wheel or PyPI).
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH := $(shell grep -m1 '^torch==' constraints.txt)

.PHONY: help install serve test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch alone first (no dependencies, so only torch is looked up on the CPU index); if that index is
# unreachable, the next line installs torch from pip's other sources, under the same pin.
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --no-deps "$(TORCH)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) \
	  || echo "make: $(TORCH) not installed from $(TORCH_INDEX_URL); pip's other sources are tried next" >&2
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

help:
	@echo "make serve    install, then serve the bundled model on http://127.0.0.1:8000"
	@echo "make test     install, then run the tests"
	@echo "make test-fast  the unit and contract tests: no server, no command in a process of its own (under a minute)"
	@echo "make install  create $(VENV) and install the project into it"
	@echo "make clean    remove $(VENV) and pytest's cache"
	@echo "benchmarks:   $(BIN)/python -m benchmarks.<name> (benchmarks/README.md lists them)"

install: $(STAMP)

# exec: the server replaces the shell, so a signal reaches it directly and its exit status is make's
serve: install
	exec $(BIN)/charlstm serve

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not http and not cli and not tools"

clean:
	rm -rf $(VENV) .pytest_cache
