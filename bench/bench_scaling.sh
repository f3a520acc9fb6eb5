#!/usr/bin/env bash
# A scaling-law fit on TinyTales: corpus -> tokenizer -> shards -> `tinylm scaling` (5 sizes x 4 budgets
# by WSD branching, recipes/scaling-tinytales.yaml) -> the fit of L(N, D) = E + A/N^alpha + B/D^beta.
# Prints alpha, beta and the tokens per parameter at the compute-optimal point beside Chinchilla's ~20
# (Hoffmann et al. 2022) and MiniCPM's ~192 (Hu et al. 2024), and E beside the corpus's entropy floor.
#
#   bash bench/bench_scaling.sh [--stories N] [--vocab V] [--threads T] [--out DIR] [--recipe FILE] [-- SCALING OPTIONS]
#
# Defaults: 20000 stories, vocabulary 2048, 1 thread, out runs/bench-scaling, the recipe above. One thread:
# on this shared 2-core machine under load a 64x2 model trained at ~900 tokens/s with 2 threads and at
# 4-7K with 1 (the same bits); the recipe's time estimate assumes 1. Options after `--`
# go to `tinylm scaling` (e.g. a tiny ladder: -- --ladder.widths '[64,128]' --ladder.depths '[2]'
# --ladder.tokens '[40000,80000]'). Rerunning resumes: finished runs are skipped, the fit is redone.
set -euo pipefail
STORIES=20000
VOCAB=2048
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=runs/bench-scaling
RECIPE="$(dirname "$0")/../recipes/scaling-tinytales.yaml"
while [ $# -gt 0 ]; do
  case "$1" in
    --stories) STORIES=$2; shift 2 ;;
    --vocab) VOCAB=$2; shift 2 ;;
    --threads) export OMP_NUM_THREADS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --recipe) RECIPE=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
start=$(date +%s)
[ -f "$OUT/tinytales.txt" ] || tinylm data tinytales --stories "$STORIES" --out "$OUT/tinytales.txt"
[ -d "$OUT/tokenizer" ] || tinylm tokenizer train "$OUT/tinytales.txt" --vocab-size "$VOCAB" --out "$OUT/tokenizer"
[ -d "$OUT/data" ] || tinylm data prepare "$OUT/tinytales.txt" --tokenizer "$OUT/tokenizer" --out "$OUT/data" \
  --val-fraction 0.02 --no-progress
data_s=$(( $(date +%s) - start ))
echo "$ OMP_NUM_THREADS=$OMP_NUM_THREADS tinylm scaling --config $RECIPE --data $OUT/data --out $OUT/ladder $*"
tinylm scaling --config "$RECIPE" --data "$OUT/data" --out "$OUT/ladder" "$@"
total_s=$(( $(date +%s) - start ))
python - "$OUT" "$STORIES" "$data_s" "$total_s" <<'PY'
import json, math, sys
from pathlib import Path

from tinylm.data import tinytales

out, stories, data_s, total_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
results = [json.loads(line) for line in (out / "ladder" / "results.jsonl").read_text().splitlines()]
meta = json.loads((out / "data" / "meta.json").read_text())
val = meta["splits"]["val"]
bytes_per_token = val["bytes"] / sum(s["tokens"] for s in val["shards"])
floor = tinytales.corpus_stats(min(stories, 5000), 0)["bits_per_byte"] * bytes_per_token * math.log(2)
sizes = sorted({r["params"] for r in results})
print(f"\n## Scaling-law fit on TinyTales ({len(sizes)} sizes x {len(results) // max(1, len(sizes))} budgets, "
      f"{len(results)} runs; data {data_s} s, whole script {total_s / 60:.1f} min)")
print(f"N (non-embedding): {', '.join(f'{n / 1e6:.2f}M' for n in sizes)}; "
      f"D: {', '.join(f'{d / 1e6:.3g}M' for d in sorted({r['tokens'] for r in results}))} tokens")
fit_path = out / "ladder" / "fit.json"
if not fit_path.is_file():
    print("no fit (fewer runs than the law's 5 parameters)")
    sys.exit(0)
fit = json.loads(fit_path.read_text())
law = fit["law"]
tpp = fit["tokens_per_param_at_ladder_max_flops"]
tpp = "none (an exponent <= 0)" if tpp is None else f"{tpp:.1f} (at C = {fit['ladder_max_flops']:.3g} FLOPs)"
print("| figure | this ladder | Chinchilla (Hoffmann et al. 2022) | MiniCPM (Hu et al. 2024) |")
print("|---|---|---|---|")
print(f"| alpha (N exponent) | {law['alpha']:.3f} | 0.34 | - |")
print(f"| beta (D exponent) | {law['beta']:.3f} | 0.28 | - |")
print(f"| tokens per parameter at the optimum | {tpp} | ~20 | ~192 |")
print(f"| E (irreducible loss, nats/token) | {law['E']:.3f} (corpus entropy floor <= {floor:.3f}) | 1.69 | - |")
print(f"fit: L(N, D) = {law['E']:.4f} + {law['A']:.4g}/N^{law['alpha']:.4f} + {law['B']:.4g}/D^{law['beta']:.4f}; "
      f"{fit['runs']} runs, best of {fit['starts']} L-BFGS starts ({fit['converged']} converged)")
if fit["frontier"]:  # D/N at the optimum moves with C unless alpha == beta
    print("D_opt / N_opt across compute: " + ", ".join(f"{p['tokens_per_param']:.1f} at {p['flops']:.2g}"
                                                      for p in fit["frontier"]))
PY
