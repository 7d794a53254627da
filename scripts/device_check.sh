#!/usr/bin/env bash
# The GPU device check (agent_spo/bench/device.py), as one command for a lent GPU machine.
#
# That machine has its own torch and transformers (no vLLM, no network), so the project's
# source runs from this checkout through PYTHONPATH, nothing is installed. The report goes
# to $OUT/device.json (or ./device-report.json without $OUT), one JSON line per part to
# stdout as it finishes. Well inside 8 minutes on one H100/H200. Extra arguments go to the
# check, e.g. `scripts/device_check.sh --seq-tokens 4096`; on a CPU, `--tiny`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/device.json"
[ -n "${OUT:-}" ] || out="device-report.json"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" -m agent_spo.bench.device --out "$out" "$@"
