#!/usr/bin/env bash
# The GPU device check (agent_spo/bench/device.py), as one command for a lent GPU machine.
#
# That machine has its own torch and transformers (no vLLM, no network), so the project's
# source runs from this checkout through PYTHONPATH, nothing is installed. The report goes
# to $OUT/device.json (./device-report.json without $OUT), rewritten after every part, and
# one JSON line per part goes to stdout as it finishes (the last part, FSDP2 on one rank,
# shards the model in place). About 5 minutes on one H100/H200 (estimated: never run);
# cut off after 7. Extra arguments go to the check, e.g. `--seq-tokens 4096`, or `--tiny`
# on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
out="${OUT:+$OUT/device.json}"
out="${out:-device-report.json}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# fail in seconds, not minutes, when the interpreter lacks what the check needs
"$py" -c 'import torch, transformers, tokenizers, numpy; import agent_spo.learner, agent_spo.engines.hf; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
exec timeout 420 "$py" -m agent_spo.bench.device --out "$out" "$@"
