"""`tinylm quickstart`: a corpus -> tokenizer -> shards -> pretrain -> eval -> samples -> REPORT.md.

The corpus is the built-in TinyTales generator, or the user's own text (`--data FILE_or_DIR`). The whole
pipeline runs within a wall-clock budget (default 9 minutes on a 2-core CPU): the training run gets what
the data steps left, less `reserve_s` for evaluation and sampling, as its `run.minutes`, which plans its
steps from a probe of the first ones and re-plans while training (`train.budget`). On the user's own
text the batch size, peak lr, warmup and decay come from the data's size and the budget
(`train.rules.auto_recipe`); the rest of the recipe (the model, the context) is the quickstart's.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch

from tinylm.core.devices import measure_peak_flops, resolve_device
from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_file, check_out
from tinylm.core.recipe import Check, Count, NonNegative, Positive, Seed, load_config
from tinylm.data import tinytales
from tinylm.data.prepare import PrepareConfig, prepare
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.vocab import train_tokenizer_on
from tinylm.evals.perplexity import evaluate
from tinylm.evals.tinytales import sample_tinytales
from tinylm.formats.checkpoint import load
from tinylm.infer.generate import generate
from tinylm.train.config import TrainConfig
from tinylm.train.loop import fit, new_model_config, setup
from tinylm.train.losses import lm_loss_fn
from tinylm.train.rules import (
    MAX_EPOCHS,
    auto_recipe,
    expected_tokens_per_s,
    micro_batch,
)

# Package data (pyproject's package-data), found through the import system so that it is the installed
# package's copy; a wheel installs it as a plain file, so str() of the resource is its path.
RECIPE = importlib.resources.files("tinylm") / "recipes" / "quickstart.yaml"

# What quickstart writes in its --out dir, and whether each is a file or a directory.
OUTPUTS = {"tinytales.txt": "file", "tokenizer": "dir", "data": "dir", "train": "dir", "REPORT.md": "file",
           "report.json": "file"}

MIN_TRAIN_STEPS = 24  # however short the budget, the report's model trains this many steps (a probe + 20)
# the default --samples: 200 TinyTales stories (20 left the share of consistent stories up to 16 points off that
# of 200 from the same model: BENCHMARKS.md, "The quickstart's reserve and samples"), 20 samples of your text
TINYTALES_SAMPLES, OWN_TEXT_SAMPLES = 200, 20
OWN_VAL_FRACTION = 0.05  # of the documents of the user's text held out (TinyTales: 1% of 30,000 stories)
# Tokens of the built-in recipe after which its stories keep their names: with Muon and AdamW's lr 1.6e-2 for the
# embedding (the recipe since 2026-12-02) 92-93% of 100 stories in runs whose decay ends at 4.0M tokens and 89-93%
# at 3.7M (2 seeds each, the 0.2 decay; 91% and 93% with the recipe's 0.4; half of them already by 1.3-2.9M). With
# the embedding's lr at 2e-3 it was ~6.0M, with AdamW ~10.5M (BENCHMARKS.md, "Muon's AdamW lr", "Muon at a token
# budget", "The quickstart on an AVX2-only CPU"). A report short of them says how many minutes would do.
NAMED_TOKENS = 4_000_000
CONSISTENT_GOAL = 0.8  # the share of stories keeping their names that issue 17 asks of the quickstart


@dataclass
class QuickstartConfig:
    """What `tinylm quickstart` does: corpus -> tokenizer -> shards -> pretrain -> eval -> samples -> report."""

    out: str = "runs/quickstart"  # the run directory (corpus, tokenizer, data, checkpoints, final model, REPORT.md)
    # your own text: a file or dir (.txt with blank-line separated documents, .jsonl, .parquet); none: TinyTales
    data: str | None = None
    minutes: Positive = 9.0  # wall-clock budget of the whole pipeline
    stories: Annotated[int, Check(ge=100)] = 30000  # TinyTales stories in the corpus
    vocab_size: Count = 2048  # BPE vocabulary of the tokenizer trained on the corpus
    samples: Count | None = None  # samples drawn; none: 200 TinyTales stories scored, or 20 of your text
    seed: Seed = 0  # corpus, split and initialisation seed
    recipe: str | None = None  # the training recipe (YAML); none: recipes/quickstart.yaml
    # seconds kept for evaluation, sampling and the report after training: for TinyTales on 2 cores they took
    # 3.9-5.3 s with 20 stories, 12.1 s with 200 (BENCHMARKS.md, "The quickstart's reserve and samples"); more for
    # a large val split of your own text
    reserve_s: NonNegative = 20.0
    overwrite: bool = False  # replace the outputs of an earlier quickstart in out


def quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run the whole pipeline; returns the figures written into OUT/REPORT.md."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    recipe = Path(cfg.recipe or str(RECIPE))
    if not recipe.is_file():
        raise TinylmError(f"no quickstart recipe at {recipe}; pass --recipe FILE")
    if cfg.data is not None and not Path(cfg.data).exists():
        raise TinylmError(f"--data {cfg.data}: no such file or directory")
    train_cfg = _train_config(cfg, recipe, out)  # a bad recipe fails here, before anything is written
    check_out(out, overwrite=True, kind="dir")  # an existing dir is added to: each output is checked below
    for name, kind in OUTPUTS.items():
        check_out(out / name, cfg.overwrite, kind)
    figures: dict[str, Any] = {"seed": cfg.seed, "builtin_recipe": cfg.recipe is None}
    with _removed_on_failure(out):
        out.mkdir(parents=True, exist_ok=True)
        corpus = _data_steps(cfg, out, figures)
        figures["data_s"] = time.perf_counter() - t0
        shutil.rmtree(out / "train", ignore_errors=True)  # --overwrite: a new run, not a resumed one
        train_s = cfg.minutes * 60 - (time.perf_counter() - t0) - cfg.reserve_s
        if cfg.data is not None:
            _own_text_recipe(train_cfg, out / "data", figures, train_s)
        final = _train(train_cfg, train_s, figures)
        _evaluate(cfg, final, out, figures)
        figures["total_s"] = time.perf_counter() - t0
        write_report(out, figures, corpus)
    return figures


@contextlib.contextmanager
def _removed_on_failure(out: Path) -> Iterator[None]:
    """On any failure or interrupt, remove what this run wrote: `out` if it made it, else the outputs it
    created or replaced (a replaced dir or file has a new inode)."""
    def identity(p: Path) -> tuple[int, int] | None:
        return (p.stat().st_ino, p.stat().st_mtime_ns) if p.exists() else None

    created = not out.exists()
    before = {name: identity(out / name) for name in OUTPUTS}
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        for name, kind in OUTPUTS.items():
            path = out / name
            if created or not path.exists() or identity(path) == before[name]:
                continue
            if kind == "dir":
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _data_steps(cfg: QuickstartConfig, out: Path, figures: dict[str, Any]) -> Path:
    if cfg.data is not None:
        corpus = Path(cfg.data)
        _say(f"1/4 corpus: your text, {corpus}")
    else:
        corpus = out / "tinytales.txt"
        _say(f"1/4 corpus: {cfg.stories:,} TinyTales stories -> {corpus}")
        stats = tinytales.write_corpus(corpus, cfg.stories, cfg.seed, overwrite=True)
        figures["corpus"] = {k: stats[k] for k in ("stories", "bytes", "distinct_words", "bits_per_byte")}
    _say(f"2/4 tokenizer: byte-level BPE, {cfg.vocab_size} tokens; shards")
    train_tokenizer_on([str(corpus)], cfg.vocab_size, out / "tokenizer", overwrite=True)
    val = 0.01 if cfg.data is None else OWN_VAL_FRACTION
    meta = prepare(PrepareConfig(inputs=[str(corpus)], tokenizer=str(out / "tokenizer"), out=str(out / "data"),
                                 seed=cfg.seed, val_fraction=val, overwrite=True, progress=False))
    figures["tokens"] = {split: meta["splits"][split]["tokens"] for split in meta["splits"]}
    if cfg.data is not None:
        splits = meta["splits"]
        figures["corpus"] = {"path": str(corpus), "bytes": sum(s["bytes"] for s in splits.values()),
                             "documents": sum(s["documents"] for s in splits.values())}
        if not splits["val"]["tokens"]:
            raise TinylmError(f"--data {corpus}: its {figures['corpus']['documents']} documents leave none for "
                              "validation (blank lines separate the documents of a .txt)")
    return corpus


def _train_config(cfg: QuickstartConfig, recipe: Path, out: Path) -> TrainConfig:
    train_cfg = load_config(TrainConfig, recipe, {"data.dir": str(out / "data"), "run.out": str(out / "train"),
                                                  "run.seed": cfg.seed, "run.resume": "never"})
    train_cfg.schedule.steps = train_cfg.schedule.tokens = None  # the budget sets the length
    return train_cfg


def _own_text_recipe(train_cfg: TrainConfig, data: Path, figures: dict[str, Any], train_s: float) -> None:
    """Batch size, lr, warmup and decay for the user's text and the training budget (train.rules)."""
    d = train_cfg.data
    tokenizer = Tokenizer.load(data / "tokenizer")
    shape = new_model_config(train_cfg.model, d.seq_len, tokenizer.vocab_size, tokenizer)
    flops = shape.flops_per_token(d.seq_len, training=True)
    peak = train_cfg.run.peak_flops or measure_peak_flops(resolve_device(train_cfg.run.device))
    rule = auto_recipe(figures["tokens"]["train"], max(train_s, 1.0), expected_tokens_per_s(peak, flops), flops,
                       d.seq_len)
    d.batch_tokens, train_cfg.optim.lr = rule.batch_tokens, rule.lr
    # the rule sets the whole batch schedule, without the TinyTales recipe's ramp: it was fitted without one, and
    # a ramp lost on real text in every seed (BENCHMARKS.md, "Each option on real text")
    d.batch_warmup_tokens = 0
    # and with AdamW, as it was fitted: the TinyTales recipe's Muon lost on real text in every seed, its fixed cost
    # per step too large at the rule's small batches (BENCHMARKS.md, "Each option on real text")
    train_cfg.optim.name = "adamw"
    # and with rows that start anywhere: rows from a document's start (data.document_rows, which a --recipe may
    # set) were measured on TinyTales' stories only
    d.document_rows = 0.0
    # a user's text may be small for the budget (pydoc's 120K tokens overfit after 5-7 of 20 minutes:
    # BENCHMARKS.md, "The automatic recipe"): the report's model is the checkpoint of lowest val loss
    train_cfg.run.keep_best = True
    train_cfg.schedule.warmup_steps, train_cfg.schedule.decay_fraction = rule.warmup_steps, rule.decay_fraction
    train_cfg.schedule.tokens = rule.token_cap  # a budget long for this text: MAX_EPOCHS of it, then stop
    rows = rule.batch_tokens // d.seq_len
    d.micro_batch = micro_batch(rows, d.micro_batch)
    figures["recipe"] = {**rule.overrides(), "expected_tokens": rule.run_tokens, "compute_flops": rule.compute}
    capped = "" if rule.token_cap is None else (f"; at most {rule.token_cap:,} tokens ({MAX_EPOCHS:.1f} epochs: more "
                                                 "would memorise the text), so it may end before the budget")
    _say(f"    recipe for {figures['tokens']['train']:,} tokens and {train_s / 60:.1f} min: batch "
         f"{rule.batch_tokens:,} tokens, lr {rule.lr:.2e}, warmup {rule.warmup_steps} steps, decay "
         f"{rule.decay_fraction:.0%}{capped}")


def _train(train_cfg: TrainConfig, train_s: float, figures: dict[str, Any]) -> Path:
    train_cfg.run.minutes = max(train_s, 1.0) / 60  # a budget the data steps used up still trains MIN_TRAIN_STEPS
    run = setup(train_cfg)
    run.budget.min_total = MIN_TRAIN_STEPS
    _say(f"3/4 pretrain: {run.model.num_params():,} parameters for {train_s / 60:.1f} min; steps planned from "
         f"the first ones and re-planned while training")
    t_train = time.perf_counter()
    final = fit(run, lm_loss_fn(train_cfg.optim.z_loss))
    seconds = time.perf_counter() - t_train
    precision = "bf16 autocast" if run.amp_dtype == torch.bfloat16 else "fp32"  # run.dtype auto: README, Set-up
    figures["train"] = {"parameters": run.model.num_params(), "steps": run.step, "tokens": run.tokens(),
                        "step_s": seconds / max(run.step, 1), "seconds": seconds, "precision": precision}
    _say(f"    {run.step} steps, {run.tokens():,} tokens in {seconds / 60:.1f} min")
    best = final.parent / "best"
    if train_cfg.run.keep_best and best.is_dir():
        meta = load(best).meta
        figures["train"]["best"] = {"step": meta["step"], "tokens": meta["tokens"], "val_loss": meta["val_loss"],
                                    "final_val_loss": run.last_val}
        if meta["step"] < run.step:
            _say(f"    the lowest val loss was at step {meta['step']} ({meta['val_loss']:.4f} against the final "
                 f"{run.last_val:.4f}): the report's model is {best}")
            return best
    return final


def _evaluate(cfg: QuickstartConfig, final: Path, out: Path, figures: dict[str, Any]) -> None:
    _say("4/4 evaluation and samples")
    loaded = load(final)
    figures["eval"] = evaluate(loaded.model, out / "data", split="val")
    torch.manual_seed(cfg.seed)
    if cfg.data is None:
        figures["stories"] = sample_tinytales(loaded.model, loaded.tokenizer, cfg.samples or TINYTALES_SAMPLES,
                                              seed=cfg.seed)
    else:  # from the start of a document, as the data dir stores each one (BOS + text + EOS)
        with_bos = loaded.tokenizer.bos_id is not None
        texts = generate(loaded.model, loaded.tokenizer, "", max_new_tokens=128, temperature=0.8, seed=cfg.seed,
                         n=cfg.samples or OWN_TEXT_SAMPLES, add_bos=with_bos)
        figures["samples"] = [texts] if isinstance(texts, str) else texts
    figures["final"] = str(final)


def write_report(out: Path, f: dict[str, Any], corpus: Path) -> None:
    """OUT/REPORT.md (figures, loss plot, three samples) and OUT/report.json."""
    ev, tr, co = f["eval"], f["train"], f["corpus"]
    tiny = "stories" in f  # TinyTales: its entropy bound, validator and consistency figures
    what = (f"{co['stories']:,} TinyTales stories" if tiny else f"{co['documents']:,} documents of {co['path']}")
    lines = [
        "# tinylm quickstart report", "",
        f"A {tr['parameters']:,}-parameter Llama trained from scratch on {what} ({co['bytes'] / 1e6:.1f} MB) in "
        f"{tr['seconds'] / 60:.1f} minutes; the whole run took {f['total_s'] / 60:.1f} minutes.", "",
        "| figure | value |", "|---|---|",
        f"| training steps / tokens | {tr['steps']:,} / {tr['tokens']:,} ({tr['precision']}) |",
        f"| val loss (nats/token) | {ev['loss']:.4f} |",
        f"| val perplexity | {ev['perplexity']:.3f} |",
        f"| val bits per byte | {ev['bits_per_byte']:.4f} |",
    ]
    if tiny:
        st = f["stories"]
        lines += [
            f"| corpus entropy bound (bits per byte) | {co['bits_per_byte']:.4f} |",
            f"| stories' sentences passing the TinyTales validator | {st['valid_fraction']:.1%} of {st['sentences']} |",
            # a story the validator cannot parse is vacuously consistent: count only those it mostly parses
            f"| stories with consistent names and pronouns (and at least half their sentences valid) | "
            f"{st['consistent_valid_fraction']:.1%} of {st['stories']} |",
            "", "The entropy bound is the floor a perfect model of the generator approaches (an upper bound on "
            "the corpus entropy); val bits per byte above it is what the model has yet to learn."]
        minutes = longer_budget(f)
        if minutes is not None:
            lines += ["", (f"Its characters change names from sentence to sentence: with this recipe stories keep "
                           f"their names after about {NAMED_TOKENS / 1e6:.1f}M tokens, and this machine trained "
                           f"{tr['tokens'] / 1e6:.1f}M at {tr['tokens'] / tr['seconds']:,.0f} tokens/s. "
                           f"`tinylm quickstart --minutes {minutes}` would train about that many here.")]
            _say(f"stories keep their names after about {NAMED_TOKENS / 1e6:.1f}M tokens; this machine trained "
                 f"{tr['tokens'] / 1e6:.1f}M: try --minutes {minutes}")
    else:
        r = f["recipe"]
        lines += ["", f"Recipe for this text and budget (tinylm.train.rules): batch {r['data.batch_tokens']:,} "
                  f"tokens, peak lr {r['optim.lr']:.2e}, warmup {r['schedule.warmup_steps']} steps, decay over the "
                  f"last {r['schedule.decay_fraction']:.0%} of the steps."]
        if "schedule.tokens" in r:
            lines += ["", (f"The budget would have read this text more than {MAX_EPOCHS:.1f} times, where repeats stop "
                           f"paying (tinylm.train.rules, rule 5): training was capped at {r['schedule.tokens']:,} "
                           f"tokens and read {tr['tokens']:,}. More text, not more minutes, would make a better "
                           "model.")]
        b = tr.get("best")
        if b and b["step"] < tr["steps"]:
            lines += ["", (f"The model is the checkpoint of lowest validation loss, step {b['step']:,} of "
                           f"{tr['steps']:,} ({b['val_loss']:.4f} nats/token against the last step's "
                           f"{b['final_val_loss']:.4f}): past it the model memorised its training text.")]
    lines += ["", "![train and val loss, learning rate](train/loss.png)", "",
              "## Three stories" if tiny else "## Three samples", ""]
    for i, text in enumerate((f["stories"]["samples"] if tiny else f["samples"])[:3], 1):
        lines += [f"{i}. {text.strip()}", ""]
    prompt = "Once upon a time" if tiny else "the first words of a text like yours"
    lines += [f"Model: `{f['final']}` — try `tinylm generate {f['final']} --prompt \"{prompt}\"`.", ""]
    with atomic_file(out / "REPORT.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_file(out / "report.json") as tmp:
        tmp.write_text(json.dumps(f, indent=2, default=str) + "\n")
    _say(f"report: {out / 'REPORT.md'}")


def longer_budget(f: dict[str, Any]) -> int | None:
    """The --minutes that would train NAMED_TOKENS at this run's speed, when the built-in recipe's TinyTales
    stories fell short of the consistency goal for lack of them; else None."""
    tr = f["train"]
    if (not f.get("builtin_recipe") or f["stories"]["consistent_valid_fraction"] >= CONSISTENT_GOAL
            or tr["tokens"] >= NAMED_TOKENS):
        return None
    rest_s = f["total_s"] - tr["seconds"]  # corpus, tokenizer, shards, evaluation: the same in a longer run
    return math.ceil((NAMED_TOKENS * tr["seconds"] / tr["tokens"] + rest_s) / 60)


def _say(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)
