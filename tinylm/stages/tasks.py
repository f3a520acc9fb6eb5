"""`tinylm data task` (write a built-in task's examples as JSONL) and `tinylm data check` (score predictions)."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tinylm.core.errors import TinylmError, optional_import
from tinylm.core.fs import atomic_file, check_out
from tinylm.core.recipe import Count, Seed, one_of
from tinylm.data import tasks
from tinylm.data.sources import read_jsonl

TASK_NAMES = tuple(tasks.TASKS)


@dataclass
class TaskConfig:
    """What `tinylm data task` writes."""

    task: one_of(*TASK_NAMES)  # the built-in task: tinytales-instruct or function-calling
    out: str  # JSONL file to write, one record a line
    n: Count = 1000  # number of examples
    split: one_of("train", "test") = "train"  # train or held-out test (they never share a prompt)
    seed: Seed = 0  # the same seed gives the same examples
    pairs: bool = False  # preference pairs (prompt / chosen / rejected / reason) instead of chat SFT examples
    overwrite: bool = False  # replace an existing --out file


@dataclass
class CheckConfig:
    """What `tinylm data check` scores."""

    task: one_of(*TASK_NAMES)  # the built-in task: tinytales-instruct or function-calling
    data: str  # the examples: JSONL written by `tinylm data task` (SFT form)
    # JSONL, one answer a line in the examples' order: a JSON string, {"prediction": ...}, or a chat record
    # whose last message is the answer (or give --model and the model answers)
    predictions: str | None = None
    model: str | None = None  # answer the examples with this model (checkpoint dir, HF dir, .gguf or alias), greedily
    constrained: bool = False  # with --model, function calling: decode under the tools' JSON schema
    max_tokens: Count = 256  # with --model: the most new tokens per answer
    max_batch: Count = 16  # with --model: answers decoded together (continuous batching)
    save: str | None = None  # with --model: write its answers here as JSONL ({"prediction": ...} a line)
    overwrite: bool = False  # replace an existing --save file
    show: Count = 5  # how many failures to print


def task_main(cfg: TaskConfig) -> None:
    """`tinylm data task`: draw the examples, then write them atomically.

    Args:
        cfg: the command's config.
    """
    check_out(cfg.out, cfg.overwrite, kind="file")
    records = tasks.examples(cfg.task, cfg.n, cfg.split, cfg.seed, cfg.pairs)
    with atomic_file(cfg.out, cfg.overwrite) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    kind = "preference pairs" if cfg.pairs else "examples"
    print(f"wrote {cfg.out}: {len(records)} {cfg.task} {cfg.split} {kind} (seed {cfg.seed})")


def _prediction(row: Any) -> Any:
    """The answer in one line of a predictions file."""
    if isinstance(row, dict) and "prediction" in row:
        return row["prediction"]
    if isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
        return row["messages"][-1]
    return row


def _check_examples(task: str, rows: list[Any], path: str) -> None:
    for i, row in enumerate(rows, 1):
        ok = isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]
        if ok and task == "tinytales-instruct":
            ok = isinstance(row.get("spec"), dict)
        elif ok:
            ok = isinstance(row["messages"][-1], dict) and bool(tasks.function_calling.gold_calls(row))
        if not ok:
            raise TinylmError(f"{path}:{i} is not a {task} example written by `tinylm data task {task}`")


def check_main(cfg: CheckConfig) -> None:
    """`tinylm data check`: the share of predictions that are right, and the first failures.

    Args:
        cfg: the command's config.
    """
    examples = read_jsonl(cfg.data, "--data")
    _check_examples(cfg.task, examples, cfg.data)
    if (cfg.model is None) == (cfg.predictions is None):
        raise TinylmError("give the answers to check: --predictions FILE, or --model SOURCE to answer them")
    if cfg.model is None and (cfg.constrained or cfg.save):
        raise TinylmError("--constrained and --save apply to --model's answers")
    if cfg.constrained and cfg.task != "function-calling":
        raise TinylmError("--constrained is for function-calling (its answers are JSON calls)")
    if cfg.constrained:  # before the model loads
        optional_import("outlines_core", "json", "--constrained")
    if cfg.save:
        check_out(cfg.save, cfg.overwrite, kind="file")
    if cfg.model is not None:
        predictions: list[Any] = _model_answers(cfg, examples)
    else:
        predictions = [_prediction(r) for r in read_jsonl(cfg.predictions, "--predictions")]
    result = tasks.score(cfg.task, examples, predictions)
    for failure in result["failures"][:cfg.show]:
        print(f"#{failure['index']}: {'; '.join(failure['reasons'])}")
    kinds = Counter(kind for f in result["failures"] for kind in {_kind(r) for r in f["reasons"]})
    if kinds:  # how many answers fail each criterion (an answer can fail several)
        print("failing: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()))
    print(f"{cfg.task}: {result['correct']}/{result['n']} correct ({100 * result['accuracy']:.1f}%)")


def _kind(reason: str) -> str:
    """A failure reason without its particulars: "missing word: kazoo" -> "missing word", "no character named
    Emma" -> "no character named ...", "wrong arguments for set_alarm: {...}" -> "wrong arguments for ..."."""
    return re.sub(r"\b(named|about|for) .*", r"\1 ...", reason.split(":")[0])


def _model_answers(cfg: CheckConfig, examples: list[Any]) -> list[str]:
    """The model's greedy answers, with a progress line on stderr; written to --save when asked."""
    import sys

    from tinylm.evals.tasks import answer
    from tinylm.formats.checkpoint import load

    loaded = load(cfg.model)
    if loaded.tokenizer is None:
        raise TinylmError(f"{cfg.model} has no tokenizer")
    tokenizer, model = loaded.tokenizer, loaded.model
    if not tokenizer.chat_template:  # a base model, before `tinylm sft`: asked through the ChatML sft would give it
        from tinylm.data.chat import add_chatml

        print(f"tinylm: {cfg.model} has no chat template: asking it through the default ChatML, as `tinylm sft` "
              "would add it (its new tokens untrained)", file=sys.stderr)
        tokenizer, model = add_chatml(tokenizer, model)
    answers = answer(model.eval(), tokenizer, examples, cfg.max_tokens, cfg.constrained,
                     progress=lambda i: print(f"\ranswered {i}/{len(examples)}", end="", file=sys.stderr),
                     max_batch=cfg.max_batch)
    print(file=sys.stderr)
    if cfg.save:
        with atomic_file(cfg.save, cfg.overwrite) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps({"prediction": a}, ensure_ascii=False) + "\n" for a in answers)
    return answers
