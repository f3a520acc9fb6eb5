"""Rewards for reinforcement learning on checkable tasks (`tinylm grpo --reward`).

A reward is any callable `(prompts, completions) -> list[float]`: `prompts` are the data rows the completions
answer (the JSON objects of the prompts file as they are, so a reward sees every field a row carries: a
built-in task's gold call or story spec, a user's own answer key), `completions` the decoded completions,
one per row, in order; it returns one finite number per completion.

* "checker": the built-in tasks' checkers (`data.tasks`): 1.0 when a completion passes, else 0.0. A row
  with a "spec" is a TinyTales-Instruct instruction (the story must follow it), a row whose last message
  holds a gold call is a function-calling request (exact match).
* "judge": an LLM judge's grade of each completion (`evals.judge`, the instruction or TinyStories rubric),
  its mean score on 1-10 rescaled to 0-1.
* "FILE.py:FUNC": FUNC of a Python file of the user's. Naming a file here is the user's explicit choice
  to run its code (it is imported like any module: its top level runs once, in this process).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any, Callable

from tinylm.core.errors import TinylmError
from tinylm.data import tasks

Reward = Callable[[list[Any], list[str]], list[float]]


def checker_task(row: Any) -> str | None:
    """The built-in task whose checker judges answers to `row`, or None if no checker can.

    Args:
        row: a prompts-file row (a record of `tinylm data task`, or any object).
    """
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        return None
    if isinstance(row.get("spec"), dict):
        return "tinytales-instruct"
    last = row["messages"][-1]
    if isinstance(last, dict) and last.get("role") == "assistant" and tasks.function_calling.gold_calls(row):
        return "function-calling"
    return None


def checker_reward(prompts: list[Any], completions: list[str]) -> list[float]:
    """1.0 for each completion its row's built-in checker accepts, else 0.0 (see `checker_task`)."""
    out = []
    for row, text in zip(prompts, completions):
        task = checker_task(row)
        if task is None:
            raise TinylmError("a row has neither a TinyTales-Instruct 'spec' nor a gold function call for the checker")
        out.append(1.0 if tasks.judge(task, row, text)[0] else 0.0)
    return out


def prompt_text(row: Any) -> str:
    """What a judge is shown as the prompt a completion answers: a row's text prompt, else its last user
    message (a final assistant message is the gold answer, not part of the prompt)."""
    if isinstance(row, dict):
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            return prompt
        messages = prompt if isinstance(prompt, list) else row.get("messages")
        if isinstance(messages, list):
            for m in reversed(messages):
                if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
                    return m["content"]
    raise TinylmError("a row has no text prompt or user message for the judge to read")


def judge_reward(judge: Any) -> Reward:
    """A judge's grades as a reward: `judge.score(prompts, responses)` (1-10, evals.judge.Judge) rescaled to
    0-1."""
    def reward(prompts: list[Any], completions: list[str]) -> list[float]:
        return [(s - 1) / 9 for s in judge.score([prompt_text(r) for r in prompts], completions)]
    return reward


def load_reward(spec: str, judge: Any = None) -> Reward:
    """The reward a `--reward` value names.

    Args:
        spec: "checker", "judge" or "FILE.py:FUNC".
        judge: with "judge", the judge (anything with `score(prompts, responses)` on 1-10).
    """
    if spec == "checker":
        return checker_reward
    if spec == "judge":
        if judge is None:
            raise TinylmError("--reward judge needs a judge: --judge SOURCE_or_URL (a model source or an "
                              "OpenAI-compatible endpoint)")
        return judge_reward(judge)
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise TinylmError(f"--reward {spec!r} is not checker, judge or FILE.py:FUNC")
    if not Path(path).is_file():
        raise TinylmError(f"--reward {spec}: no file {path}")
    fn = getattr(_import_file(Path(path), spec), name, None)
    if not callable(fn):
        raise TinylmError(f"--reward {spec}: {path} has no function {name}")
    return fn


def _import_file(path: Path, spec: str) -> Any:
    """The module of a user's Python file, imported by path (importlib; the user asked for it by name)."""
    module_name = f"tinylm_user_reward_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    if loader is None or loader.loader is None:
        raise TinylmError(f"--reward {spec}: {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module  # dataclasses and pickling in the user's module look it up here
    quiet, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ left beside the user's file
    try:
        loader.loader.exec_module(module)
    except Exception as e:  # the user's code: any error is theirs, said in one line
        del sys.modules[module_name]
        raise TinylmError(f"--reward {spec}: importing {path} raised {_one_line(e)}") from None
    finally:
        sys.dont_write_bytecode = quiet
    return module


def score(reward: Reward, prompts: list[Any], completions: list[str], name: str = "the reward") -> list[float]:
    """`reward(prompts, completions)`, checked: one finite number per completion, or a one-line TinylmError.

    Args:
        reward: the reward.
        prompts: the rows the completions answer, one per completion.
        completions: the decoded completions.
        name: the reward as the user named it, for errors.
    """
    try:
        values = reward(list(prompts), list(completions))
    except TinylmError:
        raise
    except Exception as e:  # the user's code: any error is theirs, said in one line
        raise TinylmError(f"{name} raised {_one_line(e)}") from None
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise TinylmError(f"{name} must return a list of numbers, got {type(values).__name__}") from None
    if len(out) != len(completions):
        raise TinylmError(f"{name} returned {len(out)} rewards for {len(completions)} completions")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise TinylmError(f"{name} returned a non-finite reward ({bad[0]})")
    return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
