"""`tinylm quickstart`: TinyTales corpus -> tokenizer -> shards -> pretrain -> eval -> stories -> REPORT.md.

The whole pipeline runs within a wall-clock budget (default 9 minutes on a 2-core CPU): after the data
steps, a few probe steps of the real training run measure its speed, and the run's length is set so
that training, evaluation and sampling fit in what is left.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch

from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_file, check_out
from tinylm.core.recipe import Check, Count, NonNegative, Positive, Seed, load_config
from tinylm.data import tinytales
from tinylm.data.prepare import PrepareConfig, prepare
from tinylm.data.vocab import train_tokenizer_on
from tinylm.evals.perplexity import evaluate
from tinylm.evals.tinytales import sample_tinytales
from tinylm.formats.checkpoint import load
from tinylm.train.config import TrainConfig
from tinylm.train.loop import fit, setup, train_step
from tinylm.train.losses import lm_loss

# Package data (pyproject's package-data), found through the import system so that it is the installed
# package's copy; a wheel installs it as a plain file, so str() of the resource is its path.
RECIPE = importlib.resources.files("tinylm") / "recipes" / "quickstart.yaml"

# What quickstart writes in its --out dir, and whether each is a file or a directory.
OUTPUTS = {"tinytales.txt": "file", "tokenizer": "dir", "data": "dir", "train": "dir", "REPORT.md": "file",
           "report.json": "file"}


@dataclass
class QuickstartConfig:
    """What `tinylm quickstart` does: TinyTales corpus -> tokenizer -> shards -> pretrain -> eval -> stories."""

    out: str = "runs/quickstart"  # the run directory (corpus, tokenizer, data, checkpoints, final model, REPORT.md)
    minutes: Positive = 9.0  # wall-clock budget of the whole pipeline
    stories: Annotated[int, Check(ge=100)] = 30000  # TinyTales stories in the corpus
    vocab_size: Count = 2048  # BPE vocabulary of the tokenizer trained on the corpus
    samples: Count = 20  # stories sampled from the trained model and scored by the TinyTales validator
    seed: Seed = 0  # corpus, split and initialisation seed
    recipe: str | None = None  # the training recipe (YAML); none: recipes/quickstart.yaml
    reserve_s: NonNegative = 60.0  # seconds kept for evaluation, sampling and the report after training
    overwrite: bool = False  # replace the outputs of an earlier quickstart in out


def quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    """Run the whole pipeline; returns the figures written into OUT/REPORT.md."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    recipe = Path(cfg.recipe or str(RECIPE))
    if not recipe.is_file():
        raise TinylmError(f"no quickstart recipe at {recipe}; pass --recipe FILE")
    train_cfg = _train_config(cfg, recipe, out)  # a bad recipe fails here, before anything is written
    check_out(out, overwrite=True, kind="dir")  # an existing dir is added to: each output is checked below
    for name, kind in OUTPUTS.items():
        check_out(out / name, cfg.overwrite, kind)
    figures: dict[str, Any] = {"seed": cfg.seed}
    with _removed_on_failure(out):
        out.mkdir(parents=True, exist_ok=True)
        corpus = _data_steps(cfg, out, figures)
        figures["data_s"] = time.perf_counter() - t0
        shutil.rmtree(out / "train", ignore_errors=True)  # --overwrite: a new run, not a resumed one
        final = _train(cfg, train_cfg, t0, figures)
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
    corpus = out / "tinytales.txt"
    _say(f"1/4 corpus: {cfg.stories:,} TinyTales stories -> {corpus}")
    stats = tinytales.write_corpus(corpus, cfg.stories, cfg.seed, overwrite=True)
    figures["corpus"] = {k: stats[k] for k in ("stories", "bytes", "distinct_words", "bits_per_byte")}
    _say(f"2/4 tokenizer: byte-level BPE, {cfg.vocab_size} tokens; shards")
    train_tokenizer_on([str(corpus)], cfg.vocab_size, out / "tokenizer", overwrite=True)
    meta = prepare(PrepareConfig(inputs=[str(corpus)], tokenizer=str(out / "tokenizer"), out=str(out / "data"),
                                 seed=cfg.seed, overwrite=True, progress=False))
    figures["tokens"] = {split: meta["splits"][split]["tokens"] for split in meta["splits"]}
    return corpus


def _train_config(cfg: QuickstartConfig, recipe: Path, out: Path) -> TrainConfig:
    return load_config(TrainConfig, recipe, {"data.dir": str(out / "data"), "run.out": str(out / "train"),
                                             "run.seed": cfg.seed, "run.resume": "never"})


def _train(cfg: QuickstartConfig, train_cfg: TrainConfig, t0: float, figures: dict[str, Any]) -> Path:
    run = setup(train_cfg)
    probe = max(2, min(4, train_cfg.schedule.warmup_steps - 1))  # inside warmup: lr does not depend on the total
    _say(f"3/4 pretrain: {run.model.num_params():,} parameters; probing speed for {probe} steps")
    times = []
    for _ in range(probe):
        start = time.perf_counter()
        train_step(run, lm_loss)
        times.append(time.perf_counter() - start)
    step_s = sorted(times[1:])[len(times[1:]) // 2]  # median, the first step (compilation) left out
    budget = cfg.minutes * 60 - (time.perf_counter() - t0) - cfg.reserve_s
    run.total_steps = max(probe + 20, run.step + int(budget / step_s))
    figures["train"] = {"parameters": run.model.num_params(), "steps": run.total_steps,
                        "tokens": run.total_steps * run.rows * train_cfg.data.seq_len, "step_s": step_s}
    _say(f"    {step_s:.2f} s/step -> {run.total_steps} steps in the budget")
    t_train = time.perf_counter()
    final = fit(run, lm_loss)
    figures["train"]["seconds"] = time.perf_counter() - t_train
    return final


def _evaluate(cfg: QuickstartConfig, final: Path, out: Path, figures: dict[str, Any]) -> None:
    _say("4/4 evaluation and stories")
    loaded = load(final)
    figures["eval"] = evaluate(loaded.model, out / "data", split="val")
    torch.manual_seed(cfg.seed)
    figures["stories"] = sample_tinytales(loaded.model, loaded.tokenizer, cfg.samples, seed=cfg.seed)
    figures["final"] = str(final)


def write_report(out: Path, f: dict[str, Any], corpus: Path) -> None:
    """OUT/REPORT.md (figures, loss plot, three stories) and OUT/report.json."""
    ev, st, tr, co = f["eval"], f["stories"], f["train"], f["corpus"]
    lines = [
        "# tinylm quickstart report", "",
        f"A {tr['parameters']:,}-parameter Llama trained from scratch on {co['stories']:,} TinyTales stories "
        f"({co['bytes'] / 1e6:.1f} MB) in {tr['seconds'] / 60:.1f} minutes; the whole run took "
        f"{f['total_s'] / 60:.1f} minutes.", "",
        "| figure | value |", "|---|---|",
        f"| training steps / tokens | {tr['steps']:,} / {tr['tokens']:,} |",
        f"| val loss (nats/token) | {ev['loss']:.4f} |",
        f"| val perplexity | {ev['perplexity']:.3f} |",
        f"| val bits per byte | {ev['bits_per_byte']:.4f} |",
        f"| corpus entropy bound (bits per byte) | {co['bits_per_byte']:.4f} |",
        f"| stories' sentences passing the TinyTales validator | {st['valid_fraction']:.1%} of {st['sentences']} |",
        f"| stories with consistent names and pronouns | {st['consistent_fraction']:.1%} of {st['stories']} |",
        "", "The entropy bound is the floor a perfect model of the generator approaches (an upper bound on the "
        "corpus entropy); val bits per byte above it is what the model has yet to learn.", "",
        "![train and val loss, learning rate](train/loss.png)", "", "## Three stories", "",
    ]
    for i, story in enumerate(st["samples"][:3], 1):
        lines += [f"{i}. {story.strip()}", ""]
    lines += [f"Model: `{f['final']}` — try `tinylm generate {f['final']} --prompt \"Once upon a time\"`.", ""]
    with atomic_file(out / "REPORT.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_file(out / "report.json") as tmp:
        tmp.write_text(json.dumps(f, indent=2, default=str) + "\n")
    _say(f"report: {out / 'REPORT.md'}")


def _say(message: str) -> None:
    print(f"[quickstart] {message}", flush=True)
