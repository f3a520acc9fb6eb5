"""`tinylm route calibrate`: the threshold of `tinylm serve SMALL --fallback ...`, set on the user's own
labelled examples (serve.routing has the signals, the curve and the choice).

The small model answers every example greedily, as the server would (a chat through its chat template, a
prompt as a completion); each answer is judged acceptable or not by the example's label, by exact match with
its reference, or by a built-in task's checker; the curve of quality against the share sent to the fallback
is printed, the threshold that meets the target is chosen, and route.json is written for `serve
--route-config`. The fallback is taken to answer right unless an example says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_file, check_out
from tinylm.core.recipe import Count, Fraction, one_of
from tinylm.data import tasks
from tinylm.data.chat import end_of_turn_id, generation_prompt
from tinylm.data.sources import read_jsonl
from tinylm.formats.checkpoint import load
from tinylm.serve.routing import (
    SIGNALS,
    Point,
    answer_signals,
    choose,
    curve,
    plot_curves,
    route_record,
)

SHOWN = 20  # curve points printed (route.json holds them all)


@dataclass
class CalibrateConfig:
    """What `tinylm route calibrate` measures and writes."""

    small: str  # the model that `tinylm serve SMALL --fallback ...` serves (checkpoint dir, HF dir, .gguf or alias)
    # labelled JSONL, one example a line: "messages" (a chat, answered as /v1/chat/completions would) or "prompt"
    # (text, answered as /v1/completions would), and whether the small model's answer is acceptable: "acceptable"
    # (true or false), or "reference" (the answer must equal it, surrounding spaces aside), or --task's checker;
    # "fallback_acceptable" (true or false) if the fallback's answer is known (else it is taken to be right)
    data: str
    out: str = "route.json"  # the route file to write (`tinylm serve --route-config` reads it)
    target_quality: Fraction | None = None  # route the smallest share that gives the routed system this quality
    fallback_share: Fraction | None = None  # or: route this share of the requests (at most)
    signal: one_of(*SIGNALS) = "mean_logprob"  # the small model's signal: mean_logprob, min_logprob, neg_entropy
    # the examples are this built-in task's (`tinylm data task`): the messages before the last are asked, and the
    # task's checker judges the answer (where an example has no "acceptable" or "reference" of its own)
    task: one_of(*tasks.TASKS) | None = None
    max_tokens: Count = 256  # the most new tokens per answer
    max_batch: Count = 16  # answers decoded together
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N or mps
    plot: str | None = None  # also draw the curve into this PNG
    overwrite: bool = False  # replace existing --out and --plot files


def calibrate_main(cfg: CalibrateConfig) -> None:
    """`tinylm route calibrate`: answer, judge, print the curve, choose the threshold, write route.json.

    Args:
        cfg: the command's config.
    """
    if (cfg.target_quality is None) == (cfg.fallback_share is None):
        raise TinylmError("give one target: --target-quality Q or --fallback-share S")
    for path in (cfg.out, cfg.plot):
        if path:
            check_out(path, cfg.overwrite, kind="file")
    rows = read_labelled(cfg.data, cfg.task)
    loaded = load(cfg.small, device=resolve_device(cfg.device))
    if loaded.tokenizer is None:
        raise TinylmError(f"{cfg.small} has no tokenizer")
    prompts, budgets, stops = _prompts(rows, loaded, cfg)
    answers = answer_signals(loaded.model.eval(), loaded.tokenizer, prompts, budgets, stops, [cfg.signal],
                             cfg.max_batch)
    small_ok = [_acceptable(row, text, cfg.task) for row, (text, _) in zip(rows, answers)]
    signals = [values[cfg.signal] for _, values in answers]
    points = curve(signals, small_ok, [row.get("fallback_acceptable", True) for row in rows])
    chosen = _report(points, cfg)
    record = route_record(cfg.signal, chosen, points, small=cfg.small, data=cfg.data, n=len(rows),
                          target={"quality": cfg.target_quality} if cfg.fallback_share is None else
                          {"fallback_share": cfg.fallback_share})
    with atomic_file(cfg.out, cfg.overwrite) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    if cfg.plot:
        with atomic_file(cfg.plot, cfg.overwrite) as tmp:
            plot_curves({f"{Path(cfg.small).name}: {cfg.signal}": points}, tmp, chosen,
                        f"routing on {Path(cfg.data).name} ({len(rows)} examples)")
    print(f"wrote {cfg.out}" + (f" and {cfg.plot}" if cfg.plot else "") +
          f": serve with `tinylm serve {cfg.small} --fallback MODEL_OR_URL --route-config {cfg.out}`")


def read_labelled(path: str, task: str | None) -> list[dict[str, Any]]:
    """The labelled examples of a JSONL file (see CalibrateConfig.data), each checked; a one-line error names
    the first bad one.

    Args:
        path: the file.
        task: the built-in task the examples belong to, or None.
    """
    rows = read_jsonl(path, "--data")
    for i, row in enumerate(rows, 1):
        why = _bad_row(row, task)
        if why:
            raise TinylmError(f"{path}: example {i} {why}")
    if not rows:
        raise TinylmError(f"{path} holds no examples")
    return rows


def _bad_row(row: Any, task: str | None) -> str | None:
    """What is wrong with one labelled example, or None."""
    if not isinstance(row, dict):
        return "is not a JSON object"
    messages, prompt = row.get("messages"), row.get("prompt")
    if (messages is None) == (prompt is None):
        return 'needs "messages" (a chat) or "prompt" (text), one of them'
    if prompt is not None and not (isinstance(prompt, str) and prompt):
        return 'has a "prompt" that is not a non-empty string'
    if messages is not None and not (isinstance(messages, list) and messages and
                                     all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        return 'has "messages" that are not a list of {"role", "content"} objects'
    for key in ("acceptable", "fallback_acceptable"):
        if key in row and not isinstance(row[key], bool):
            return f'has "{key}" that is not true or false'
    if "reference" in row and not isinstance(row["reference"], str):
        return 'has a "reference" that is not a string'
    if task is not None and (messages is None or len(messages) < 2 or messages[-1].get("role") != "assistant"):
        return f"is not a {task} example written by `tinylm data task {task}` (its last message is the answer)"
    if task is None and "acceptable" not in row and "reference" not in row:
        return 'has no label: give "acceptable" (true/false) or "reference" (the right answer), or --task'
    return None


def _asked(row: dict[str, Any], task: str | None) -> list[dict[str, Any]]:
    """The messages the small model answers (a task example's last message is its gold answer)."""
    return row["messages"][:-1] if task is not None else row["messages"]


def _prompts(rows: list[dict[str, Any]], loaded: Any, cfg: CalibrateConfig) -> tuple[list, list, list]:
    """Each example's prompt ids, answer budget (never past the context) and stop ids, as the server has them."""
    tok, context = loaded.tokenizer, loaded.config.max_seq_len
    chat_stops = None
    prompts, budgets, stops = [], [], []
    for i, row in enumerate(rows):
        if "messages" in row:
            if not tok.chat_template:
                raise TinylmError(f"{cfg.small} has no chat template, so it cannot answer the chats of {cfg.data} "
                                  "(fine-tune it with `tinylm sft`, or give text as \"prompt\")")
            chat_stops = chat_stops or sorted({end_of_turn_id(tok)} | ({tok.eos_id} - {None}))
            ids, stop = tok.encode(generation_prompt(_asked(row, cfg.task), tok)), chat_stops
        else:
            ids, stop = tok.encode(row["prompt"]), None
        if not ids or len(ids) >= context:
            raise TinylmError(f"example {i + 1} of {cfg.data} takes {len(ids)} tokens; {cfg.small} needs 1 to "
                              f"{context - 1} (its context is {context})")
        prompts.append(ids)
        budgets.append(min(cfg.max_tokens, context - len(ids)))
        stops.append(stop)
    return prompts, budgets, stops


def _acceptable(row: dict[str, Any], answer: str, task: str | None) -> bool:
    """The example's label, its reference's exact match, or the task's checker."""
    if "acceptable" in row:
        return row["acceptable"]
    if "reference" in row:
        return answer.strip() == row["reference"].strip()
    return tasks.judge(task, row, answer)[0]


def _report(points: list[Point], cfg: CalibrateConfig) -> Point:
    """Print the curve (about SHOWN points spread evenly over it, both ends included) and the choice; returns the
    chosen point (a target that no threshold meets is an error, after the curve)."""
    print(f"{'threshold':>12} {'to fallback':>12} {'quality':>8}")
    step = max(1, len(points) // SHOWN)
    for k in sorted({*range(0, len(points), step), len(points) - 1}):
        p = points[k]
        print(f"{p.threshold:12.6g} {100 * p.share:11.1f}% {p.quality:8.4f}")
    chosen = choose(points, cfg.target_quality, cfg.fallback_share)
    print(f"chosen: {cfg.signal} < {chosen.threshold:.6g} goes to the fallback: {100 * chosen.share:.1f}% of "
          f"{points[-1].routed} examples, quality {chosen.quality:.4f} (the small model alone "
          f"{points[0].quality:.4f}, the fallback alone {points[-1].quality:.4f})")
    return chosen
