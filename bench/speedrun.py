"""Speedrun: quality at a time budget and time to a target, for the default recipe and each option.

Corpora (prepared once under --work): TinyTales (the quickstart's --stories corpus and --vocab-size BPE)
and real English, CPython's reference documentation (`pydoc_data.topics`, cut into ~2,000-character
documents as bench_distill does; 5% held out).

Ablations (`--variants`): each trains the quickstart recipe (or --recipe) for --minutes of wall-clock
(`run.minutes`: the steps planned and re-planned by train.budget) with one option on, against the default:
  default, muon (optim.name muon), adamw (optim.name adamw), qk_norm, untied (model.tie_embeddings false),
  z_loss (optim.z_loss 1e-4), softcap (model.logit_softcap 30), batch_warmup (data.batch_warmup_tokens
  --ramp-tokens), all (every one but adamw).
Runs are `tinylm pretrain` subprocesses, --repeats of each (seeds 0, 1, ...), variants interleaved so that a
shared machine's load falls on all of them; every figure is the median over repeats with its [min, max].
Figures per run:
  - val bits per byte of the final model (tinylm.evals.perplexity.evaluate, the quickstart report's figure);
  - TinyTales: the share of valid sentences and of stories with consistent names and pronouns among
    --samples stories of the final model (tinylm.evals.tinytales.sample_tinytales, the quickstart's);
  - time to target: the first val pass (every --eval-every steps) at or below --target-bpb, as seconds
    into the run (metrics.jsonl time_s) and tokens;
  - TinyTales: the tokens at which consistency first passes 50%, from --samples stories of each
    checkpoint (every --ckpt-every steps; the first one at or above 50% counts), a story counting only
    when the validator parses at least half its sentences (an unparsable one is vacuously consistent).

Sweep (`--sweep`, real text): the final val bits per byte of every --batch x --lr x --minutes-list, and
for each budget the automatic recipe (train.rules.auto_recipe, as `tinylm quickstart --data` uses it)
against the best point of the sweep: the rule's goal is to be within 2% of it.

    python bench/speedrun.py --corpus tinytales pydoc --minutes 10 --repeats 3
    python bench/speedrun.py --corpus tinytales --variants default muon --minutes 10 --repeats 5 --target-bpb 0.15
    python bench/speedrun.py --sweep --minutes-list 2 5 20 --batch 2048 4096 8192 16384 --lr 1e-3 2e-3 4e-3 8e-3
    python bench/speedrun.py --minutes 0.2 --repeats 1 --stories 600 --vocab-size 300 --samples 2 \\
        --recipe tiny.yaml --variants default muon            # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_distill import pydoc_documents  # noqa: E402

from tinylm.core.devices import measure_peak_flops  # noqa: E402
from tinylm.core.recipe import load_config  # noqa: E402
from tinylm.data.tokenizer import Tokenizer  # noqa: E402
from tinylm.formats import checkpoint  # noqa: E402
from tinylm.stages.quickstart import RECIPE  # noqa: E402
from tinylm.train.config import TrainConfig  # noqa: E402
from tinylm.train.loop import new_model_config  # noqa: E402
from tinylm.train.metrics import read_metrics  # noqa: E402
from tinylm.train.rules import auto_recipe, expected_tokens_per_s  # noqa: E402

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "muon": {"optim.name": "muon"},
    "adamw": {"optim.name": "adamw"},  # against a --recipe whose default is Muon
    "qk_norm": {"model.qk_norm": "true"},
    "untied": {"model.tie_embeddings": "false"},
    "z_loss": {"optim.z_loss": 1e-4},  # PaLM's coefficient
    "softcap": {"model.logit_softcap": 30.0},  # modded-nanogpt's cap
    "batch_warmup": {},  # data.batch_warmup_tokens: --ramp-tokens
}


# ----- corpora ----------------------------------------------------------------------------------------------

def prepare_corpus(name: str, work: Path, stories: int, vocab_size: int) -> Path:
    """The data dir of a corpus, made once: its text, a BPE trained on it, shards."""
    from tinylm.data import tinytales
    from tinylm.data.prepare import PrepareConfig, prepare
    from tinylm.data.vocab import train_tokenizer_on

    base = work / f"{name}-{stories if name == 'tinytales' else 'all'}-v{vocab_size}"
    data = base / "data"
    if data.exists():
        return data
    base.mkdir(parents=True, exist_ok=True)
    if name == "tinytales":
        text = base / "tinytales.txt"
        tinytales.write_corpus(text, stories, seed=0, overwrite=True)
        val = 0.01  # the quickstart's
    else:
        text = base / "pydoc.jsonl"
        text.write_text("".join(json.dumps({"text": d}) + "\n" for d in pydoc_documents()))
        val = 0.05
    train_tokenizer_on([str(text)], vocab_size, base / "tokenizer", overwrite=True)
    prepare(PrepareConfig(inputs=[str(text)], tokenizer=str(base / "tokenizer"), out=str(data), seed=0,
                          val_fraction=val, overwrite=True, progress=False))
    return data


def bytes_per_token(data: Path, split: str = "val") -> float:
    meta = json.loads((data / "meta.json").read_text())["splits"][split]
    return meta["bytes"] / meta["tokens"]


# ----- one run ------------------------------------------------------------------------------------------------

def train(data: Path, out: Path, recipe: Path, minutes: float, seed: int, overrides: dict[str, object],
          args: argparse.Namespace) -> float:
    """`tinylm pretrain` for `minutes` in a subprocess; returns its wall-clock seconds."""
    shutil.rmtree(out, ignore_errors=True)
    words = [sys.executable, "-m", "tinylm", "pretrain", "--config", str(recipe), "--data.dir", str(data),
             "--run.out", str(out), "--run.minutes", str(minutes), "--schedule.steps", "none",
             "--schedule.tokens", "none", "--run.seed", str(seed), "--data.seed", str(seed), "--run.resume", "never",
             "--run.eval_every", str(args.eval_every), "--run.ckpt_every", str(args.ckpt_every),
             "--run.keep_last", "100000", "--run.progress", "false"]
    for key, value in overrides.items():
        words += [f"--{key}", str(value)]
    t0 = time.perf_counter()
    subprocess.run(words, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def judge(data: Path, out: Path, corpus: str, args: argparse.Namespace) -> dict[str, Any]:
    """The run's figures: final bits per byte, TinyTales scores, time and tokens to targets."""
    from tinylm.evals.perplexity import evaluate
    from tinylm.evals.tinytales import sample_tinytales

    final = checkpoint.load(out / "final")
    figures: dict[str, Any] = {"bpb": evaluate(final.model, data, split="val")["bits_per_byte"]}
    scale = bytes_per_token(data) * math.log(2)  # val nats/token -> bits/byte
    curve = [r for r in read_metrics(out / "metrics.jsonl") if r.get("val_loss") is not None]
    hit = next((r for r in curve if r["val_loss"] / scale <= args.target_bpb), None)
    figures["time_to_target"] = None if hit is None else hit["time_s"]
    figures["tokens_to_target"] = None if hit is None else hit["tokens"]
    figures["tokens"] = final.meta["tokens"]
    if corpus == "tinytales":
        stories = sample_tinytales(final.model, final.tokenizer, args.samples, seed=0)
        figures.update(valid=stories["valid_fraction"], consistent=stories["consistent_fraction"],
                       consistent_valid=stories["consistent_valid_fraction"])
        figures["tokens_to_consistent"] = tokens_to_consistency(out, args.samples)
    return figures


def tokens_to_consistency(out: Path, samples: int, goal: float = 0.5) -> int | None:
    """Tokens of the first checkpoint whose sampled stories keep names and pronouns in >= goal of them,
    counting a story only when the validator parses at least half its sentences (sample_tinytales'
    consistent_valid_fraction: an unparsable story is vacuously consistent)."""
    from tinylm.evals.tinytales import sample_tinytales

    ckpts = sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:])) + [out / "final"]
    for ckpt in ckpts:
        loaded = checkpoint.load(ckpt)
        if sample_tinytales(loaded.model, loaded.tokenizer, samples, seed=0)["consistent_valid_fraction"] >= goal:
            return loaded.meta["tokens"]
    return None


# ----- tables -------------------------------------------------------------------------------------------------

def spread(values: list[float | None], fmt: str) -> str:
    """median [min, max] of the values that exist, and how many did not (a target never reached)."""
    got = [v for v in values if v is not None]
    if not got:
        return "never"
    text = fmt.format(statistics.median(got))
    if len(got) > 1:
        text += f" [{fmt.format(min(got))}, {fmt.format(max(got))}]"
    missing = len(values) - len(got)
    return text + (f" ({missing} never)" if missing else "")


def ablation_table(corpus: str, results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    tiny = corpus == "tinytales"
    head = ["variant", "runs", "val bits/byte", f"s to {args.target_bpb} bpb", f"tokens to {args.target_bpb} bpb",
            "tokens trained"]
    if tiny:
        head += ["valid sentences", "consistent stories", "consistent, parsed", "tokens to 50% consistent, parsed"]
    print(f"\n{corpus}, {args.minutes} min a run (medians [min, max] over repeats)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name, runs in results.items():
        row = [name, str(len(runs)), spread([r["bpb"] for r in runs], "{:.4f}"),
               spread([r["time_to_target"] for r in runs], "{:.0f}"),
               spread([r["tokens_to_target"] for r in runs], "{:,.0f}"), spread([r["tokens"] for r in runs], "{:,.0f}")]
        if tiny:
            row += [spread([r["valid"] for r in runs], "{:.1%}"), spread([r["consistent"] for r in runs], "{:.0%}"),
                    spread([r["consistent_valid"] for r in runs], "{:.0%}"),
                    spread([r["tokens_to_consistent"] for r in runs], "{:,.0f}")]
        print("| " + " | ".join(row) + " |", flush=True)


def ablations(args: argparse.Namespace, recipe: Path) -> None:
    for corpus in args.corpus:
        data = prepare_corpus(corpus, args.work, args.stories, args.vocab_size)
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
        for seed in range(args.repeats):
            for variant in args.variants:  # interleaved: the machine's load falls on every variant
                out = args.work / "runs" / f"{corpus}-{variant}-{seed}"
                train(data, out, recipe, args.minutes, seed, overrides(variant, args), args)
                results[variant].append(judge(data, out, corpus, args))
                print(f"{corpus} {variant} seed {seed}: {json.dumps(results[variant][-1])}", file=sys.stderr)
        ablation_table(corpus, results, args)
    print(f"\n    python bench/speedrun.py {' '.join(sys.argv[1:])}\n")


def overrides(variant: str, args: argparse.Namespace) -> dict[str, object]:
    if variant == "all":
        return {k: v for name in VARIANTS if name != "adamw" for k, v in overrides(name, args).items()}
    if variant == "batch_warmup":
        return {"data.batch_warmup_tokens": args.ramp_tokens}
    return dict(VARIANTS[variant])


# ----- the sweep for the automatic recipe ------------------------------------------------------------------

def rule_overrides(data: Path, recipe: Path, minutes: float) -> dict[str, object]:
    """What `tinylm quickstart --data` would choose for this data and budget (train.rules)."""
    cfg = load_config(TrainConfig, recipe, {"data.dir": str(data)})
    tok = Tokenizer.load(data / "tokenizer")
    shape = new_model_config(cfg.model, cfg.data.seq_len, tok.vocab_size, tok)
    flops = shape.flops_per_token(cfg.data.seq_len, training=True)
    peak = cfg.run.peak_flops or measure_peak_flops(torch.device("cpu"))
    train_tokens = json.loads((data / "meta.json").read_text())["splits"]["train"]["tokens"]
    rule = auto_recipe(train_tokens, minutes * 60, expected_tokens_per_s(peak, flops), flops, cfg.data.seq_len)
    rows = rule.batch_tokens // cfg.data.seq_len
    micro = max(m for m in range(1, min(cfg.data.micro_batch, rows) + 1) if rows % m == 0)
    return {**rule.overrides(), "data.micro_batch": micro}


def sweep(args: argparse.Namespace, recipe: Path) -> None:
    data = prepare_corpus("pydoc", args.work, args.stories, args.vocab_size)
    seq_len = load_config(TrainConfig, recipe, {}).data.seq_len
    print("\nreal text (pydoc), final val bits per byte; medians over repeats\n")
    print("| minutes | best sweep point (batch, lr) | its bpb | auto recipe (batch, lr) | its bpb | auto / best - 1 |")
    print("|---|---|---|---|---|---|")
    for minutes in args.minutes_list:
        grid: dict[tuple[int, float], float] = {}
        for batch in args.batch:
            for lr in args.lr:
                rows = batch // seq_len
                extra = {"data.batch_tokens": batch, "optim.lr": lr, "data.micro_batch": math.gcd(rows, 16)}
                grid[(batch, lr)] = median_bpb(data, recipe, minutes, extra, f"sweep-{minutes}-{batch}-{lr}", args)
                print(f"sweep {minutes} min batch {batch} lr {lr}: {grid[(batch, lr)]:.4f}", file=sys.stderr)
        rule = rule_overrides(data, recipe, minutes)
        auto = median_bpb(data, recipe, minutes, rule, f"auto-{minutes}", args)
        (b, lr), best = min(grid.items(), key=lambda kv: kv[1])
        print(f"| {minutes} | {b:,}, {lr:g} | {best:.4f} | {rule['data.batch_tokens']:,}, {rule['optim.lr']:.2e} | "
              f"{auto:.4f} | {auto / best - 1:+.1%} |", flush=True)
    print(f"\n    python bench/speedrun.py {' '.join(sys.argv[1:])}\n")


def median_bpb(data: Path, recipe: Path, minutes: float, extra: dict[str, object], name: str,
               args: argparse.Namespace) -> float:
    from tinylm.evals.perplexity import evaluate

    values = []
    for seed in range(args.repeats):
        out = args.work / "runs" / f"{name}-{seed}"
        train(data, out, recipe, minutes, seed, extra, args)
        values.append(evaluate(checkpoint.load(out / "final").model, data, split="val")["bits_per_byte"])
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/speedrun"), help="corpora and runs")
    ap.add_argument("--corpus", nargs="+", default=["tinytales", "pydoc"], choices=["tinytales", "pydoc"])
    ap.add_argument("--variants", nargs="+", default=[*VARIANTS, "all"], choices=[*VARIANTS, "all"])
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each training run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant (seeds 0, 1, ...)")
    ap.add_argument("--recipe", type=Path, default=Path(str(RECIPE)), help="the default recipe (the quickstart's)")
    ap.add_argument("--stories", type=int, default=30_000, help="TinyTales stories (the quickstart's default)")
    ap.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary of each corpus")
    ap.add_argument("--samples", type=int, default=20, help="stories sampled per model scored")
    ap.add_argument("--target-bpb", type=float, default=0.15, help="time to target: val bits per byte")
    ap.add_argument("--eval-every", type=int, default=50, help="steps between val passes")
    ap.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints scored for consistency")
    ap.add_argument("--ramp-tokens", type=int, default=500_000, help="batch_warmup: data.batch_warmup_tokens")
    ap.add_argument("--sweep", action="store_true", help="batch x lr x budget on real text, against the auto recipe")
    ap.add_argument("--minutes-list", type=float, nargs="+", default=[2.0, 5.0, 20.0])
    ap.add_argument("--batch", type=int, nargs="+", default=[2048, 4096, 8192, 16384], help="batch tokens")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3], help="peak lr")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = args.recipe.resolve()
    if args.sweep:
        sweep(args, recipe)
    else:
        ablations(args, recipe)


if __name__ == "__main__":
    main()
