"""`tinylm judge FILE_or_MODEL --rubric tinystories|instruction|pairwise --judge SOURCE_or_URL`, and
`tinylm judge --calibrate N --judge ...` (how far to trust a judge, on TinyTales stories with known labels).

A FILE (.jsonl) is graded row by row: chat rows ({"messages"}), prompt / completion (or "text") rows, synth's
rows; with the pairwise rubric, pairs ({"prompt", "chosen", "rejected"}), each judged in both orders. A MODEL
answers built-in prompts (TinyTales story beginnings, TinyTales-Instruct instructions) and its answers are
graded. The rubrics and the calibration are evals/judge.py's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError
from tinylm.core.fs import atomic_file, check_out
from tinylm.core.recipe import Check, Count, Interval, NonNegative, Seed, one_of
from tinylm.data.sources import read_jsonl
from tinylm.evals.judge import (
    CRITERIA,
    RUBRICS,
    Judge,
    calibrate,
    calibration_items,
    format_calibration,
    model_answers,
    summary,
)
from tinylm.infer.teacher import LocalTeacher
from tinylm.serve.client import open_teacher


@dataclass
class JudgeConfig:
    """What `tinylm judge` grades, with which judge and rubric."""

    judge: str  # the judge: a checkpoint dir, HF dir, .gguf or alias (smollm2-135m), or an OpenAI-compatible URL
    # a JSONL file to grade, or a model whose answers to built-in prompts are graded (none with --calibrate)
    source: str | None = None
    rubric: one_of(*RUBRICS) = "tinystories"  # tinystories, instruction or pairwise (both orders)
    calibrate: Interval = 0  # grade N valid TinyTales stories and N corrupted twins: agreement and confusion table
    threshold: Annotated[float, Check(ge=1, le=10)] = 6.0  # --calibrate: a grade at or above it calls a story good
    n: Count = 20  # a MODEL: the prompts it answers
    max_tokens: Count = 256  # a MODEL: the most tokens of one answer
    temperature: NonNegative = 0.8  # a MODEL: its sampling temperature
    seed: Seed = 0  # a MODEL's prompts and samples; the calibration stories
    batch: Count = 16  # grades asked together (engine batch or requests in flight)
    out: str | None = None  # write every row with its grade (JSONL), or the calibration report (JSON)
    overwrite: bool = False  # replace an existing --out file
    judge_model: str | None = None  # a URL judge's model id (none: $TINYLM_JUDGE_MODEL, else its only one)
    judge_key_env: str = "OPENAI_API_KEY"  # environment variable holding a URL judge's API key
    device: str = "auto"  # a local judge's (and MODEL's) device: auto, cpu or cuda
    json: bool = False  # print JSON instead of a table


def _text(content: Any) -> str:
    """A message's content as text (a list of parts is joined)."""
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _prompt_text(prompt: Any) -> str:
    """A prompt as text: a string, or the last user message of a list of messages."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return _text(users[-1].get("content")) if users else ""
    return prompt if isinstance(prompt, str) else ""


def graded_pair(row: Any, where: str) -> tuple[str, str]:
    """(prompt, response) of a row to grade: {"messages"} (the last assistant turn and the user turn before
    it), or {"prompt", "completion" | "response" | "text"}.

    Args:
        row: the JSON row.
        where: FILE:LINE, for the message.
    """
    if isinstance(row, dict) and isinstance(row.get("messages"), list) and len(row["messages"]) >= 2:
        *before, last = row["messages"]
        if isinstance(last, dict) and last.get("role") == "assistant":
            return _prompt_text(before), _text(last.get("content"))
    if isinstance(row, dict) and "prompt" in row:
        for key in ("completion", "response", "text"):
            if isinstance(row.get(key), str):
                return _prompt_text(row["prompt"]), row[key]
    raise TinylmError(f"{where}: nothing to grade: give {{\"messages\"}} ending with an assistant turn, or "
                      "{\"prompt\", \"completion\"}")


def compared_pair(row: Any, where: str) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a pairs row."""
    if not isinstance(row, dict) or not all(k in row for k in ("prompt", "chosen", "rejected")):
        raise TinylmError(f"{where}: the pairwise rubric needs rows with 'prompt', 'chosen' and 'rejected'")
    chosen, rejected = (row[k] if isinstance(row[k], str) else _text(row[k][-1].get("content"))
                        if isinstance(row[k], list) and row[k] and isinstance(row[k][-1], dict) else ""
                        for k in ("chosen", "rejected"))
    return _prompt_text(row["prompt"]), chosen, rejected


def _check(cfg: JudgeConfig) -> None:
    if (cfg.source is None) == (cfg.calibrate == 0):
        raise TinylmError("give a FILE.jsonl or MODEL to judge, or --calibrate N (not both)")
    if cfg.calibrate and cfg.rubric == "instruction":
        raise TinylmError("--calibrate grades stories: use --rubric tinystories or pairwise")
    if cfg.source is not None and not _is_file(cfg.source) and cfg.rubric == "pairwise":
        raise TinylmError("the pairwise rubric compares two answers: give a pairs JSONL file, not a model")
    if cfg.out is not None:
        check_out(cfg.out, cfg.overwrite, kind="file")


def _is_file(source: str) -> bool:
    return source.endswith((".jsonl", ".ndjson", ".json")) or Path(source).is_file()


def judge_main(cfg: JudgeConfig) -> dict[str, Any]:
    """`tinylm judge`: grade a file's rows, a model's answers, or the calibration stories; print a summary.

    Args:
        cfg: the command's config.
    """
    _check(cfg)
    rows = read_jsonl(cfg.source, "the file to judge") if cfg.source and _is_file(cfg.source) else None
    device = resolve_device(cfg.device)
    judge = Judge(open_teacher(cfg.judge, "--judge", cfg.judge_model, cfg.judge_key_env, cfg.batch, device),
                  cfg.rubric, seed=cfg.seed)
    if cfg.calibrate:
        report = calibrate(judge, calibration_items(cfg.calibrate, cfg.seed), cfg.threshold)
        print(json.dumps(report, indent=2) if cfg.json else format_calibration(report))
        _write(cfg, json.dumps(report, indent=2) + "\n")
        return report
    if rows is None:
        from tinylm.formats.checkpoint import load

        model = LocalTeacher(load(cfg.source, device=device), cfg.source, cfg.batch)
        prompts, answers = model_answers(model, cfg.rubric, cfg.n, cfg.max_tokens, cfg.temperature, cfg.seed)
        rows = [{"prompt": p, "completion": a} for p, a in zip(prompts, answers)]
    result = _judge_rows(judge, rows, cfg)
    print(json.dumps(result, indent=2) if cfg.json else format_summary(result, cfg))
    return result


def _judge_rows(judge: Judge, rows: list[Any], cfg: JudgeConfig) -> dict[str, Any]:
    where = [f"{cfg.source}:{i}" for i in range(1, len(rows) + 1)]
    if cfg.rubric == "pairwise":
        triples = [compared_pair(r, w) for r, w in zip(rows, where)]
        verdicts = judge.compare(*(list(t) for t in zip(*triples))) if triples else []
        n = max(1, len(verdicts))
        result = {"rubric": "pairwise", "n": len(verdicts),
                  "chosen_wins": sum(v["winner"] == "first" for v in verdicts) / n,
                  "rejected_wins": sum(v["winner"] == "second" for v in verdicts) / n,
                  "ties": sum(v["winner"] == "tie" for v in verdicts) / n,
                  "consistent": sum(v["consistent"] for v in verdicts) / n,
                  "chosen_as_a": {k: sum(v["first_as_a"] == k for v in verdicts) for k in ("A", "B", "tie")},
                  "chosen_as_b": {k: sum(v["first_as_b"] == k for v in verdicts) for k in ("A", "B", "tie")}}
        graded = verdicts
    else:
        pairs = [graded_pair(r, w) for r, w in zip(rows, where)]
        graded = judge.grade([p for p, _ in pairs], [a for _, a in pairs])
        result = {"rubric": cfg.rubric, **summary(graded, cfg.rubric)}
    _write(cfg, "".join(json.dumps({**(r if isinstance(r, dict) else {"row": r}), "judge": g}, ensure_ascii=False)
                        + "\n" for r, g in zip(rows, graded)))
    return result


def _write(cfg: JudgeConfig, text: str) -> None:
    if cfg.out is not None:
        with atomic_file(cfg.out, cfg.overwrite) as tmp:
            tmp.write_text(text, encoding="utf-8")


def format_summary(result: dict[str, Any], cfg: JudgeConfig) -> str:
    """A judged file's or model's summary as a small markdown table."""
    lines = [f"| {cfg.source} judged by {cfg.judge} ({cfg.rubric}) | |", "|---|---|"]
    if cfg.rubric == "pairwise":
        lines += [f"| {k.replace('_', ' ')} | {result[k]:.1%} |" for k in ("chosen_wins", "rejected_wins", "ties",
                                                                           "consistent")]
        lines += [f"| verdicts, chosen shown as {s} | " + ", ".join(f"{k} {v}" for k, v in result[f"chosen_as_{s.lower()}"]
                                                                    .items()) + " |" for s in ("A", "B")]
    else:
        lines += [f"| {k} (1-10) | {result[k]:.2f} |" for k in (*CRITERIA[cfg.rubric], "overall")]
        if "ages" in result:
            lines.append("| estimated age | " + ", ".join(f"{a}: {c}" for a, c in result["ages"].items()) + " |")
    lines.append(f"| rows | {result['n']} |")
    return "\n".join(lines)

