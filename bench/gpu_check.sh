#!/usr/bin/env bash
# The GPU figures BENCHMARKS.md and simulations/README.md need, on a CUDA machine with fedlora
# installed, in parts that each fit a short loan of a GPU. Each step has a time limit, so a
# failing one does not hold up the rest, and every step's figures are kept as they come.
#
#     bash bench/gpu_check.sh [OUT] [PART ...]     # default OUT: runs/gpu-check, PART: all
#
#   rows    the bench/gpu.py rows BENCHMARKS.md lists as not measured yet: the default model
#           with 4 and 8 clients sharing, random:llama-1b with 2 and 8, random:llama-8b (4-bit)
#           with 2 (and 8 where the GPU holds eight 13 GiB clients), an 8B base in bf16 with one
#           client (about 8 minutes, most of it building the random bases once)
#   tests   the GPU tests and the default federation (`fedlora simulate`) timed on the GPU
#           (about 3 minutes)
#   table   bench/gpu.py's whole table on the three bases, 1, 2, 4 and 8 clients
#   study   simulations/private_wordnet.py on the GPU for STUDY_S seconds (default 480): it is
#           resumable, so finished cells are kept and the next call goes on from them; the
#           results folder is copied into OUT
#   all     rows, tests, study
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-check}
shift || true
PARTS=${*:-all}
[ "$PARTS" = all ] && PARTS="rows tests study"
for part in $PARTS; do
    case $part in rows | tests | table | study) ;;
    *) echo "bench/gpu_check.sh: unknown part '$part'; choose from rows, tests, table, study, all" >&2
        exit 2 ;;
    esac
done
mkdir -p "$OUT"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
step() { echo "== [$(($(date +%s) - T0)) s] $*"; }
bench() { # NAME TIMEOUT ARGS...: one bench/gpu.py command, its table on stdout, JSON in OUT
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python bench/gpu.py "$@" --json "$OUT/bench-$name.json" 2> "$OUT/bench-$name.err"
}
build_bases() { # the random bases, once, in the fedlora cache (CPU and disk only)
    python -c "from fedlora.architectures import random_model_dir as r; r('random:llama-1b'); \
r('random:llama-8b')" > "$OUT/build.log" 2>&1
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers, peft, flwr; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, \
'flwr', flwr.__version__)" | tee -a "$OUT/gpu.txt"
GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
GIB=$((GIB / 1024))

for part in $PARTS; do
    case $part in
    rows)
        build_bases &
        BUILD=$!
        step "rows: the default model, 4 and 8 clients sharing"
        bench default-48 240 --models SmolLM2-135M-Instruct --clients 4 8
        wait "$BUILD"
        step "rows: random:llama-1b, 2 and 8 clients sharing"
        bench 1b-28 240 --models random:llama-1b --clients 2 8
        EIGHT=2
        [ "$GIB" -ge 120 ] && EIGHT="2 8" # eight 4-bit 8B clients need about 108 GiB
        step "rows: random:llama-8b (4-bit), clients $EIGHT sharing"
        bench 8b-4bit 300 --models random:llama-8b --steps 5 --clients $EIGHT
        step "rows: an 8B base in bf16, one client"
        bench 8b-bf16 180 --models random:llama-8b --steps 5 --clients 1 \
            --set model.quantization=none
        ;;
    tests)
        step "tests: the GPU tests"
        timeout 300 python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tail -20 \
            | tee "$OUT/pytest-gpu.txt"
        step "tests: the default federation on the GPU (fedlora simulate, model.device auto)"
        start=$(date +%s)
        timeout 300 fedlora simulate --out "$OUT/federation" > "$OUT/federation.txt" 2>&1
        echo "exit $?, wall $(($(date +%s) - start)) s" | tee -a "$OUT/federation.txt"
        tail -12 "$OUT/federation.txt"
        ;;
    table)
        build_bases
        step "table: the three bases, 1, 2, 4 and 8 clients"
        bench default 600 --models SmolLM2-135M-Instruct
        bench 1b 900 --models random:llama-1b
        bench 8b 1200 --models random:llama-8b --steps 5
        ;;
    study)
        step "study: simulations/private_wordnet.py for ${STUDY_S:-480} s (resumable)"
        timeout "${STUDY_S:-480}" python simulations/private_wordnet.py --seeds 0,1 \
            > "$OUT/study.txt" 2>&1
        echo "exit $? (124: the time limit; finished cells are kept)" | tee -a "$OUT/study.txt"
        python simulations/private_wordnet.py --report-only | tail -15
        cp -r simulations/results/private-wordnet "$OUT/"
        ;;
    esac
done
step "done: $OUT"
