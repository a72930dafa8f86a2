#!/usr/bin/env bash
# Everything BENCHMARKS.md's GPU section needs, in one command on a CUDA machine with fedlora
# installed: the GPU tests, the throughput and memory benchmark of the three bases (default
# model, random:llama-1b, random:llama-8b in 4-bit, and an 8B bf16 single client), and the
# default federation (`fedlora simulate`) timed on the GPU. Writes logs and JSON into OUT.
#
#     bash bench/gpu_check.sh [OUT]          # default OUT: runs/gpu-check
#
# The random bases are built into the fedlora cache once (about 2.5 GB and 16 GB on disk) in
# the background while the tests run; each step has a time limit, so a failing one does not
# hold up the rest, and every step's figures are kept as they come.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
step() { echo "== [$(($(date +%s) - T0)) s] $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers, peft, flwr; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, \
'flwr', flwr.__version__)" | tee -a "$OUT/gpu.txt"

# the random bases, once, in the background (CPU and disk only)
python -c "from fedlora.architectures import random_model_dir as r; r('random:llama-1b'); \
r('random:llama-8b')" > "$OUT/build.log" 2>&1 &
BUILD=$!

step "GPU tests"
timeout 600 python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -20 \
  | tee "$OUT/pytest-gpu.txt"

step "the default federation on the GPU (fedlora simulate, model.device auto)"
start=$(date +%s)
timeout 900 fedlora simulate --out "$OUT/federation" > "$OUT/federation.txt" 2>&1
echo "exit $?, wall $(($(date +%s) - start)) s" | tee -a "$OUT/federation.txt"
tail -12 "$OUT/federation.txt"

step "throughput and memory: the default model"
timeout 600 python bench/gpu.py --models SmolLM2-135M-Instruct --json "$OUT/bench-default.json" \
  2> "$OUT/bench-default.err"

wait "$BUILD"
step "throughput and memory: random:llama-1b, random:llama-8b (4-bit)"
timeout 900 python bench/gpu.py --models random:llama-1b --json "$OUT/bench-1b.json" \
  2> "$OUT/bench-1b.err"
timeout 1200 python bench/gpu.py --models random:llama-8b --steps 5 \
  --json "$OUT/bench-8b.json" 2> "$OUT/bench-8b.err"

step "an 8B base in bf16, one client"
timeout 600 python bench/gpu.py --models random:llama-8b --steps 5 --clients 1 \
  --set model.quantization=none --json "$OUT/bench-8b-bf16.json" 2> "$OUT/bench-8b-bf16.err"
step "done: $OUT"
