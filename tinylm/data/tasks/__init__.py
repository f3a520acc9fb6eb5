"""The built-in fine-tuning tasks, each with a checker: `examples` draws a split, `score` judges predictions.

* "tinytales-instruct" (`tinytales_instruct`): "Write a story that uses the words X, Y and Z and has ..." with
  gold TinyTales stories; a prediction is the story text, judged by `tinytales_instruct.follows`.
* "function-calling" (`function_calling`): requests to a small tool set with their gold calls; a prediction is
  the model's answer (a JSON call, or an assistant message with it or `tool_calls`), judged by exact match.

Records are chat records: SFT examples hold "messages" (the last one is the gold assistant turn: give a model
the ones before it); preference pairs hold "prompt", "chosen", "rejected" and "reason".
"""

from __future__ import annotations

from typing import Any

from tinylm.core.errors import TinylmError
from tinylm.data.tasks import function_calling, tinytales_instruct

TASKS = {"tinytales-instruct": tinytales_instruct, "function-calling": function_calling}


def _task(task: str) -> Any:
    if task not in TASKS:
        raise TinylmError(f"unknown task {task!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[task]


def examples(task: str, n: int, split: str = "train", seed: int = 0, pairs: bool = False) -> list[dict[str, Any]]:
    """`n` examples of a task's split, the same for the same seed (train and test never share a prompt).

    Args:
        task: a key of TASKS.
        n: how many.
        split: "train" or "test".
        seed: the seed.
        pairs: preference pairs (prompt / chosen / rejected) instead of SFT chats.
    """
    if split not in ("train", "test"):
        raise TinylmError(f"the split must be train or test, got {split!r}")
    return _task(task).examples(n, split, seed, pairs)


def judge(task: str, example: dict[str, Any], prediction: Any) -> tuple[bool, list[str]]:
    """Whether one prediction is right for one SFT example, and why not.

    Args:
        task: a key of TASKS.
        example: a record written by `examples` (with "messages").
        prediction: the model's answer to the messages before the last: text, or an assistant message.
    """
    if task == "tinytales-instruct":
        text = prediction.get("content") if isinstance(prediction, dict) else prediction
        if not isinstance(text, str):
            return False, ["not a story"]
        return tinytales_instruct.follows(example["spec"], text)
    _task(task)
    return function_calling.matches(function_calling.gold_calls(example), prediction)


def score(task: str, examples: list[dict[str, Any]], predictions: list[Any]) -> dict[str, Any]:
    """Judge every prediction against its example.

    Args:
        task: a key of TASKS.
        examples: records written by `examples` (SFT form).
        predictions: one answer per example, in order (see `judge`).

    Returns:
        {"task", "n", "correct", "accuracy", "failures": [{"index", "reasons"}, ...]}.
    """
    if len(examples) != len(predictions):
        raise TinylmError(f"{len(predictions)} predictions for {len(examples)} examples")
    failures = []
    for i, (example, prediction) in enumerate(zip(examples, predictions)):
        ok, reasons = judge(task, example, prediction)
        if not ok:
            failures.append({"index": i, "reasons": reasons})
    n = len(examples)
    return {"task": task, "n": n, "correct": n - len(failures), "accuracy": (n - len(failures)) / max(n, 1),
            "failures": failures}
