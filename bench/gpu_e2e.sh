#!/usr/bin/env bash
# bastion supervising real vLLM on the GPU machine, end to end (see bench/gpu_e2e.py).
# On the device, after the parts are copied (../shared/gpu/README.md):
#   source .gpu/pN/device_setup.sh && bash bench/gpu_e2e.sh [--skip kill|overhead|drain]
set -euo pipefail
cd "$(dirname "$0")/.."
# The driver also needs the openai SDK, which the GPU recipe ships with vLLM; bastion itself runs on
# APP_PYTHONPATH alone (gpu_e2e.py sets it for the processes it starts).
export PYTHONPATH=${APP_PYTHONPATH:?source device_setup.sh first}:$VLLM_PYTHONPATH
OUT=${OUT:-/tmp/bastion-e2e}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv > "$OUT/gpu-before.csv" || true
python3 -c 'import vllm, sys; print("vllm", vllm.__version__)' 2>/dev/null | tee "$OUT/versions.txt" || true
PYTHONPATH=$VLLM_PYTHONPATH python3 -c 'import vllm; print("vllm", vllm.__version__)' >> "$OUT/versions.txt" 2>/dev/null || true
python3 bench/gpu_e2e.py --out "$OUT" "$@"
nvidia-smi --query-gpu=memory.used --format=csv > "$OUT/gpu-after.csv" || true
