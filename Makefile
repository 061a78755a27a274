# The README's two commands: `make demo` and `make test`. Each sets itself up from scratch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Pin torch first so no later requirement can pull a multi-GB CUDA build; override for a GPU box.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-tl39 test-tl2 notebooks processes conformance matrix bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,demos,lora]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python demos/run_demo.py

test: $(STAMP)
	$(BIN)/python -m pytest

# The suite again in a second venv with TransformerLens 3.9, where HookedTransformer and TransformerBridge
# sit side by side (tl_backward/core/hooked.py); TL_SPEC selects another 3.x release.
TL39     := .venv-tl39
TL_SPEC  ?= transformer_lens==3.9.*
$(TL39)/bin/python:
	$(PYTHON) -m venv $(TL39)

$(TL39)/.installed: pyproject.toml | $(TL39)/bin/python
	$(TL39)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(TL39)/bin/pip install --quiet "$(TL_SPEC)" -e ".[dev,demos,lora]"
	touch $@

test-tl39: $(TL39)/.installed
	$(TL39)/bin/python -m pytest
	$(TL39)/bin/python -m pytest -m notebooks -k hooked_transformer

# The suite on TransformerLens 2.x (HookedTransformer only: the bridge tests skip, tests/conftest.py);
# TL2_SPEC selects another 2.x release. The constraints file keeps torch at TORCH_SPEC whatever 2.x asks
# for, and pyarrow < 26: TransformerLens 2.16+ pins numpy < 2, which pyarrow >= 26 (via datasets) cannot import.
TL2      := .venv-tl2
TL2_SPEC ?= transformer_lens==2.18.*
$(TL2)/bin/python:
	$(PYTHON) -m venv $(TL2)

$(TL2)/.installed: pyproject.toml | $(TL2)/bin/python
	printf '%s\n' "$(TORCH_SPEC)" "pyarrow<26" > $(TL2)/constraints.txt
	$(TL2)/bin/pip install --quiet -c $(TL2)/constraints.txt "$(TORCH_SPEC)"
	$(TL2)/bin/pip install --quiet -c $(TL2)/constraints.txt "$(TL2_SPEC)" -e ".[dev,demos,lora]"
	touch $@

test-tl2: $(TL2)/.installed
	$(TL2)/bin/python -m pytest
	$(TL2)/bin/python -m pytest -m notebooks -k hooked_transformer

notebooks: $(STAMP)
	$(BIN)/python -m pytest -m notebooks

processes: $(STAMP)
	$(BIN)/python -m pytest -m processes

# Every family x feature cell of the support matrix (tests/conformance), outside make test's budget.
conformance: $(STAMP)
	$(BIN)/python -m pytest -m conformance

# Re-run the matrix and rewrite README.md's generated support-matrix block (and its saved JSON).
matrix: $(STAMP)
	$(BIN)/python -m tests.conformance.matrix

bench: $(STAMP)
	status=0; for f in benchmarks/bench_*.py; do echo "== $$f"; $(BIN)/python $$f || status=1; done; exit $$status

# Every analysis on a model split over two GPUs (or on one GPU) vs the CPU; prints "skipped: no CUDA" elsewhere.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(TL39) $(TL2) build *.egg-info demos/out
