"""Speedrun: quality at a time budget and time to a target, for the default recipe and each option.

Corpora (prepared once under --work): TinyTales (the quickstart's --stories corpus and --vocab-size BPE)
and real English, CPython's reference documentation (`pydoc_data.topics`, cut into ~2,000-character
documents as bench_distill does; 5% held out).

Ablations (`--variants`): each trains the quickstart recipe (or --recipe) for --minutes of wall-clock
(`run.minutes`: the steps planned and re-planned by train.budget) with one option on, against the default:
  default, muon (optim.name muon), adamw (optim.name adamw, lr 2e-3, decay 0.2: the recipe before Muon), qk_norm,
  untied (model.tie_embeddings false), z_loss (optim.z_loss 1e-4), softcap (model.logit_softcap 30),
  batch_warmup (data.batch_warmup_tokens --ramp-tokens), fp32 (run.dtype float32: on a CPU with AMX, auto trains
  in bf16), all (every one but adamw and fp32).
`--seeds S ...` runs those seeds of each variant instead of --repeats' 0, 1, ... (e.g. the seeds a change is meant
to mend first). `--define NAME KEY=VALUE ...` adds a variant of your own (e.g. `--define lr4 optim.lr=4e-3`). `--tokens T` gives
every run T tokens instead of --minutes (schedule.tokens; the decay ends there): what each variant learns per
token, apart from its speed.
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

`--jobs N` trains N runs at a time, each pinned (taskset) to its share of the cores with as many torch threads,
so that a 2-core machine measures two one-thread runs side by side; every run's figures are kept in
WORK/runs/NAME/figures.json and a rerun of the same command reuses them (an interrupted benchmark resumes).

Sweep (`--sweep`, real text): the final val bits per byte of every --batch x --lr x --minutes-list, and
for each budget the automatic recipe (train.rules.auto_recipe, as `tinylm quickstart --data` uses it)
against the best point of the sweep: the rule's goal is to be within 2% of it. With --keep-best every run
keeps the checkpoint of its lowest val loss (run.keep_best, as `tinylm quickstart --data` does) and is
scored by that checkpoint, the figure a user of a small text gets. --epochs E1 E2 ... adds a third axis: each
grid point also runs capped at E epochs of the data (schedule.tokens; its decay ends there), as the rules
cap a budget that is long for its data (train.rules, rule 5).

    python bench/speedrun.py --corpus tinytales pydoc --minutes 10 --repeats 3
    python bench/speedrun.py --corpus tinytales --variants default muon --minutes 10 --repeats 5 --target-bpb 0.15
    python bench/speedrun.py --sweep --minutes-list 2 5 20 --batch 2048 4096 8192 16384 --lr 1e-3 2e-3 4e-3 8e-3
    python bench/speedrun.py --sweep --minutes-list 2 5 --batch 2048 4096 8192 --lr 3e-3 6e-3 1.2e-2 --jobs 2
    python bench/speedrun.py --sweep --minutes-list 20 --batch 1024 --lr 7.5e-4 1.5e-3 --epochs 8 16.4 33 --keep-best
    python bench/speedrun.py --corpus tinytales --tokens 4500000 --define lr4 optim.lr=4e-3 --variants default lr4 \\
        --repeats 3 --samples 100 --ckpt-every 200
    python bench/speedrun.py --minutes 0.2 --repeats 1 --stories 600 --vocab-size 300 --samples 2 \\
        --recipe tiny.yaml --variants default muon            # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
from tinylm.train import rules  # noqa: E402
from tinylm.train.config import TrainConfig  # noqa: E402
from tinylm.train.loop import new_model_config  # noqa: E402
from tinylm.train.metrics import read_metrics  # noqa: E402
from tinylm.train.rules import auto_recipe, expected_tokens_per_s, micro_batch  # noqa: E402

VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "muon": {"optim.name": "muon"},
    # the quickstart recipe as it was with AdamW: its lr 1.6e-2 is Muon's recipe's for the embedding alone, and 4e-3
    # for every matrix already lost (BENCHMARKS.md, "Muon at a token budget", "Muon's AdamW lr")
    "adamw": {"optim.name": "adamw", "optim.lr": 2e-3, "schedule.decay_fraction": 0.2},
    "qk_norm": {"model.qk_norm": "true"},
    "untied": {"model.tie_embeddings": "false"},
    "z_loss": {"optim.z_loss": 1e-4},  # PaLM's coefficient
    "softcap": {"model.logit_softcap": 30.0},  # modded-nanogpt's cap
    "batch_warmup": {},  # data.batch_warmup_tokens: --ramp-tokens
    "fp32": {"run.dtype": "float32"},  # against auto, bf16 on a CPU with AMX (the default before it)
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

@dataclass
class Run:
    """One training run and what it is judged on."""

    name: str  # its folder under WORK/runs: every setting that changes it is in the name
    corpus: str
    data: Path
    minutes: float | None  # a wall-clock budget, or None: train `tokens`
    seed: int
    overrides: dict[str, object] = field(default_factory=dict)
    tokens: int | None = None  # --tokens: a token budget (schedule.tokens; its decay ends there)


def slot_command(slot: int, args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The prefix and environment of a run in job slot `slot`: with --jobs N > 1 each slot owns
    cpu_count / N cores (taskset) and as many torch threads, so that N runs at a time do not share cores."""
    env = dict(os.environ)
    if args.jobs == 1:
        return [], env
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // args.jobs)
    mine = cores[slot * per:(slot + 1) * per]
    env["OMP_NUM_THREADS"] = str(per)
    return ["taskset", "-c", ",".join(map(str, mine))], env


def execute(runs: list[Run], recipe: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Trains and judges every run, --jobs at a time, in order; a run whose figures.json exists is reused
    (an interrupted benchmark resumes where it stopped)."""
    slots: queue.Queue[int] = queue.Queue()
    for k in range(args.jobs):
        slots.put(k)

    def one(run: Run) -> tuple[str, dict[str, Any]]:
        out = args.work / "runs" / run.name
        done = out / "figures.json"
        lock = out.with_name(run.name + ".lock")  # another command on other cores may be training it
        while not done.exists() and not take(lock):
            time.sleep(10)
        if not done.exists():
            slot = slots.get()
            try:
                prefix, env = slot_command(slot, args)
                train(run.data, out, recipe, run.minutes, run.seed, run.overrides, args, prefix, env, run.tokens)
                subprocess.run([*prefix, sys.executable, __file__, "--judge-run", str(out), "--judge-data",
                                str(run.data), "--corpus", run.corpus, "--samples", str(args.samples),
                                "--target-bpb", str(args.target_bpb)], check=True, env=env)
            finally:
                slots.put(slot)
                lock.unlink()
        figures = json.loads(done.read_text())
        print(f"{run.name}: {json.dumps(figures)}", file=sys.stderr, flush=True)
        return run.name, figures

    (args.work / "runs").mkdir(parents=True, exist_ok=True)
    # runs another command is training now go last, so that this one's cores do not idle waiting for them
    runs = sorted(runs, key=lambda r: (args.work / "runs" / f"{r.name}.lock").exists())
    with ThreadPoolExecutor(args.jobs) as pool:
        return dict(pool.map(one, runs))


def take(lock: Path) -> bool:
    """Creates `lock` holding this process's pid, or returns False while a live process holds it (a lock
    left by a dead one is taken over)."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError, FileNotFoundError):
            lock.unlink(missing_ok=True)
            return take(lock)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def train(data: Path, out: Path, recipe: Path, minutes: float | None, seed: int, overrides: dict[str, object],
          args: argparse.Namespace, prefix: list[str], env: dict[str, str], tokens: int | None = None) -> float:
    """`tinylm pretrain` for `minutes` (or, minutes None, for `tokens`) in a subprocess; returns its wall-clock
    seconds."""
    shutil.rmtree(out, ignore_errors=True)
    words = [*prefix, sys.executable, "-m", "tinylm", "pretrain", "--config", str(recipe), "--data.dir", str(data),
             "--run.out", str(out), "--run.minutes", str(minutes).lower(), "--schedule.steps", "none",
             "--schedule.tokens", str(tokens).lower(), "--run.seed", str(seed), "--data.seed", str(seed),
             "--run.resume", "never",
             "--run.eval_every", str(args.eval_every), "--run.ckpt_every", str(args.ckpt_every),
             "--run.keep_last", "100000", "--run.progress", "false"]
    for key, value in overrides.items():
        words += [f"--{key}", str(value)]
    t0 = time.perf_counter()
    subprocess.run(words, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def judge(data: Path, out: Path, corpus: str, args: argparse.Namespace) -> dict[str, Any]:
    """The run's figures: final bits per byte, TinyTales scores, time and tokens to targets."""
    from tinylm.evals.perplexity import evaluate
    from tinylm.evals.tinytales import sample_tinytales

    final = checkpoint.load(out / "final")
    best = out / "best"  # run.keep_best (--keep-best): the model scored is the lowest-val-loss checkpoint
    scored = checkpoint.load(best) if best.is_dir() else final
    figures: dict[str, Any] = {"bpb": evaluate(scored.model, data, split="val")["bits_per_byte"],
                               "scored_tokens": scored.meta["tokens"]}
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
    budget = f"{args.minutes} min" if args.tokens is None else f"{args.tokens:,} tokens"
    print(f"\n{corpus}, {budget} a run (medians [min, max] over repeats)\n")
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
        budget = f"{args.minutes:g}m" if args.tokens is None else f"{args.tokens / 1e6:g}Mt"
        minutes = args.minutes if args.tokens is None else None
        runs = [Run(f"{corpus}-{variant}-{budget}-{seed}", corpus, data, minutes, seed, overrides(variant, args),
                    args.tokens)
                for seed in args.seeds for variant in args.variants]  # interleaved: load falls on all
        figures = execute(runs, recipe, args)
        results = {v: [figures[f"{corpus}-{v}-{budget}-{seed}"] for seed in args.seeds]
                   for v in args.variants}
        ablation_table(corpus, results, args)
    print(f"\n    python bench/speedrun.py {' '.join(sys.argv[1:])}\n")


def overrides(variant: str, args: argparse.Namespace) -> dict[str, object]:
    if variant == "all":
        return {k: v for name in VARIANTS if name not in ("adamw", "fp32") for k, v in overrides(name, args).items()}
    if variant == "batch_warmup":
        return {"data.batch_warmup_tokens": args.ramp_tokens}
    if variant in args.defined:
        return dict(args.defined[variant])
    return dict(VARIANTS[variant])


# ----- the sweep for the automatic recipe ------------------------------------------------------------------

def rule_overrides(data: Path, recipe: Path, minutes: float, peak: float) -> tuple[dict[str, object], float]:
    """What `tinylm quickstart --data` would choose for this data and budget (train.rules) on a machine of
    `peak` FLOP/s: its recipe overrides, and the compute C it chose them for."""
    cfg = load_config(TrainConfig, recipe, {"data.dir": str(data)})
    tok = Tokenizer.load(data / "tokenizer")
    shape = new_model_config(cfg.model, cfg.data.seq_len, tok.vocab_size, tok)
    flops = shape.flops_per_token(cfg.data.seq_len, training=True)
    peak = cfg.run.peak_flops or peak
    train_tokens = json.loads((data / "meta.json").read_text())["splits"]["train"]["tokens"]
    rule = auto_recipe(train_tokens, minutes * 60, expected_tokens_per_s(peak, flops), flops, cfg.data.seq_len)
    rows = rule.batch_tokens // cfg.data.seq_len
    return {**rule.overrides(), "data.micro_batch": micro_batch(rows, cfg.data.micro_batch)}, rule.compute


def sweep(args: argparse.Namespace, recipe: Path) -> None:
    data = prepare_corpus("pydoc", args.work, args.stories, args.vocab_size)
    seq_len = load_config(TrainConfig, recipe, {}).data.seq_len
    _, env = slot_command(0, args)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", torch.get_num_threads())))  # the peak one run sees
    chosen = {m: rule_overrides(data, recipe, m, peak_flops(args.work)) for m in args.minutes_list}
    keep = {"run.keep_best": "true"} if args.keep_best else {}
    autos = {m: {**overrides, **keep} for m, (overrides, _) in chosen.items()}
    train_tokens = json.loads((data / "meta.json").read_text())["splits"]["train"]["tokens"]
    runs = []
    for minutes in args.minutes_list:  # each budget's auto run first: a second command on other cores reuses it
        auto = autos[minutes]
        runs += [Run(auto_name(minutes, auto, seed), "pydoc", data, minutes, seed, auto) for seed in range(args.repeats)]
        for epochs in args.epochs or [None]:
            cap = {} if epochs is None else {"schedule.tokens": math.ceil(epochs * train_tokens)}
            tag = "" if epochs is None else f"e{epochs:g}-"
            for batch in args.batch:
                for lr in args.lr:
                    extra = {"data.batch_tokens": batch, "optim.lr": lr,
                             "data.micro_batch": micro_batch(batch // seq_len, 16), **keep, **cap}
                    runs += [Run(f"sweep-{minutes:g}m-{batch}-{lr:g}-{tag}{seed}", "pydoc", data, minutes, seed, extra)
                             for seed in range(args.repeats)]
    execute(runs, recipe, args)
    summary, fits = [], []
    for minutes in args.minutes_list:
        grid = sweep_points(args.work, minutes, args.repeats)  # this command's points and earlier ones
        batches, lrs = sorted({b for b, _, _ in grid}), sorted({lr for _, lr, _ in grid})
        for epochs in sorted({e for _, _, e in grid}, key=lambda e: (e is not None, e or 0.0)):
            length = "the whole budget" if epochs is None else f"at most {epochs:g} epochs (schedule.tokens)"
            print(f"\nreal text (pydoc), {minutes:g} min a run, {length}: val bits per byte of the final model "
                  f"(--keep-best: of the lowest-val checkpoint) by batch tokens (rows) and peak lr (columns), medians "
                  f"of {args.repeats}; tokens trained in brackets (--keep-best: and the scored checkpoint's)\n")
            print("| batch \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |")
            print("|---|" + "---|" * len(lrs))
            for b in batches:
                cells = [cell(*grid[(b, lr, epochs)]) if (b, lr, epochs) in grid else "-" for lr in lrs]
                print(f"| {b:,} | " + " | ".join(cells) + " |")
        auto = autos[minutes]
        auto_bpb = statistics.median(json.loads((args.work / "runs" / auto_name(minutes, auto, seed) /
                                                 "figures.json").read_text())["bpb"] for seed in range(args.repeats))
        (b, lr, epochs), (best, *_) = min(grid.items(), key=lambda kv: kv[1][0])
        compute = chosen[minutes][1]
        fits.append((b / compute**rules.BATCH_EXP, lr / compute**rules.LR_EXP))
        length = "" if epochs is None else f", {epochs:g} epochs"
        auto_cap = auto.get("schedule.tokens")
        auto_length = "" if auto_cap is None else f", {auto_cap / train_tokens:.3g} epochs"
        summary.append(f"| {minutes:g} | {b:,}, {lr:g}{length} | {best:.4f} | {auto['data.batch_tokens']:,}, "
                       f"{auto['optim.lr']:.2e}{auto_length} | {auto_bpb:.4f} | {auto_bpb / best - 1:+.1%} |")
    print("\n| minutes | best sweep point (batch, lr[, epochs]) | its bpb | auto recipe | its bpb | auto / best - 1 |")
    print("|---|---|---|---|---|---|")
    print("\n".join(summary))
    # train.rules' coefficients that put each budget's rule on its best point (exponents kept), and their
    # geometric mean over the budgets: what rules.BATCH_COEF and LR_COEF are fitted from
    for name, k in (("BATCH_COEF", 0), ("LR_COEF", 1)):
        each = [f[k] for f in fits]
        mean = math.exp(statistics.fmean(math.log(v) for v in each))
        print(f"fit {name} = {mean:.4g} (per budget: {', '.join(f'{v:.4g}' for v in each)}; now {getattr(rules, name)})")
    print(f"\n    python bench/speedrun.py {' '.join(sys.argv[1:])}\n")


def auto_name(minutes: float, auto: dict[str, object], seed: int) -> str:
    cap = f"-t{auto['schedule.tokens']}" if "schedule.tokens" in auto else ""  # train.rules' epoch cap
    return f"auto-{minutes:g}m-{auto['data.batch_tokens']}-{auto['optim.lr']:.3g}{cap}-{seed}"


Point = tuple[int, float, "float | None"]  # batch tokens, peak lr, epochs cap (None: the whole budget)


def sweep_points(work: Path, minutes: float, repeats: int) -> dict[Point, tuple[float, float, float]]:
    """(batch, lr, epochs) -> (median bpb, median tokens trained, median tokens of the scored checkpoint) of
    every sweep run of this budget under WORK with all `repeats` seeds done, whichever command ran it."""
    found: dict[Point, list[dict[str, Any]]] = {}
    for done in (work / "runs").glob(f"sweep-{minutes:g}m-*-*-*/figures.json"):
        parts = done.parent.name.split("-")[2:]
        batch, lr, seed = parts[0], parts[1], parts[-1]
        epochs = float(parts[2][1:]) if len(parts) == 4 else None
        if int(seed) < repeats:
            found.setdefault((int(batch), float(lr), epochs), []).append(json.loads(done.read_text()))
    return {k: (statistics.median(r["bpb"] for r in v), statistics.median(r["tokens"] for r in v),
                statistics.median(r.get("scored_tokens", r["tokens"]) for r in v))
            for k, v in found.items() if len(v) == repeats}


def cell(bpb: float, tokens: float, scored: float) -> str:
    """A sweep table's cell: bits per byte (tokens trained; the scored checkpoint's when not the last)."""
    at = f"; best at {scored / 1e6:.2f}M" if scored < tokens else ""
    return f"{bpb:.4f} ({tokens / 1e6:.2f}M{at})"


def peak_flops(work: Path) -> float:
    """The fp32 matmul peak at this process's thread count, measured once per WORK folder and thread count
    so that the auto recipe of a budget (and its run's name) stays the same when a sweep is resumed."""
    cache = work / "peak_flops.json"
    known = json.loads(cache.read_text()) if cache.exists() else {}
    key = str(torch.get_num_threads())
    if key not in known:
        known[key] = measure_peak_flops(torch.device("cpu"))
        cache.write_text(json.dumps(known))
    return known[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/speedrun"), help="corpora and runs")
    ap.add_argument("--corpus", nargs="+", default=["tinytales", "pydoc"], choices=["tinytales", "pydoc"])
    ap.add_argument("--variants", nargs="+", default=[*VARIANTS, "all"],
                    help=f"of {', '.join([*VARIANTS, 'all'])} and the --define names")
    ap.add_argument("--define", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                    help="a variant of your own: its name and the recipe overrides it sets (repeatable)")
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each training run")
    ap.add_argument("--tokens", type=int,
                    help="a token budget for each run instead of --minutes (schedule.tokens: the decay ends there), "
                         "to compare what options learn per token")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each variant (seeds 0, 1, ...)")
    ap.add_argument("--seeds", type=int, nargs="+",
                    help="these seeds of each variant instead of --repeats' 0, 1, ... (not with --sweep)")
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
    ap.add_argument("--epochs", type=float, nargs="+",
                    help="sweep: also cap each grid point's run at these epochs of the data (schedule.tokens; the "
                         "decay then ends there), a third axis beside batch and lr; default: the whole budget only")
    ap.add_argument("--keep-best", action="store_true",
                    help="sweep: every run keeps its lowest-val-loss checkpoint (run.keep_best, as `tinylm quickstart "
                         "--data` does) and is scored by it")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, each pinned to its share of the cores with as many threads")
    ap.add_argument("--judge-run", type=Path, help=argparse.SUPPRESS)  # a worker: judges one run folder
    ap.add_argument("--judge-data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.defined = {}
    for name, *pairs in args.define:
        if not pairs or any("=" not in p for p in pairs) or name in VARIANTS:
            ap.error(f"--define {name}: a new variant name and KEY=VALUE overrides")
        args.defined[name] = dict(p.split("=", 1) for p in pairs)
    unknown = sorted(set(args.variants) - {*VARIANTS, "all", *args.defined})
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}")
    if args.seeds is not None and (args.sweep or min(args.seeds) < 0 or len(set(args.seeds)) < len(args.seeds)):
        ap.error("--seeds: distinct seeds >= 0, and not with --sweep (its points are seeds 0 to --repeats - 1)")
    args.seeds = args.seeds if args.seeds is not None else list(range(args.repeats))
    if args.judge_run is not None:
        figures = judge(args.judge_data, args.judge_run, args.corpus[0], args)
        (args.judge_run / "figures.json").write_text(json.dumps(figures))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    recipe = args.recipe.resolve()
    if args.sweep:
        sweep(args, recipe)
    else:
        ablations(args, recipe)


if __name__ == "__main__":
    main()
