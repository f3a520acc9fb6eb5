"""A model's answers to a built-in task's examples (tinylm.data.tasks), for `tinylm data check --model`.

Each example's messages before the last (the gold answer) are rendered through the model's chat template
with the generation prompt, and the model answers greedily until its end-of-turn token. Function calling
can be answered under JSON-schema constrained decoding: the answer is then a valid call of one of the
tools by construction (`function_calling.call_schema`), so only the choice of function and the argument
values can be wrong.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from tinylm.core.errors import TinylmError
from tinylm.data.chat import end_of_turn_id
from tinylm.data.tasks import function_calling
from tinylm.data.tokenizer import Tokenizer
from tinylm.infer.engine import Engine, EngineConfig, Request
from tinylm.model.llama import Llama


def answer(model: Llama, tokenizer: Tokenizer, examples: list[dict[str, Any]], max_tokens: int,
           constrained: bool = False, progress: Callable[[int], object] | None = None,
           max_batch: int = 16) -> list[str]:
    """The model's greedy answer to every example, in order.

    Args:
        model, tokenizer: the model (eval mode) and its tokenizer, which needs a chat template.
        examples: SFT records of a built-in task ({"messages": [..., gold assistant message]}).
        max_tokens: the most new tokens per answer.
        constrained: decode function calls under `function_calling.call_schema` (a JSON-schema constraint).
        progress: called with the number of answers done after each one.
        max_batch: answers decoded together.
    """
    if not tokenizer.chat_template:
        raise TinylmError("the model has no chat template: fine-tune it with `tinylm sft` (which adds ChatML) first")
    stops = sorted({end_of_turn_id(tokenizer)} | ({tokenizer.eos_id} - {None}))
    make = _constraint(model, tokenizer, max_tokens) if constrained else None
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(e["messages"][:-1], add_generation_prompt=True))
               for e in examples]
    longest = max((len(p) for p in prompts), default=0) + max_tokens
    if longest > model.config.max_seq_len:
        raise TinylmError(f"a prompt and --max-tokens {max_tokens} take {longest} tokens, more than the model's "
                          f"context of {model.config.max_seq_len}")
    # Decoded together by the engine (continuous batching); the examples' shared system message is computed
    # once and found again in its prefix cache. Greedy answers equal one-at-a-time decoding (tests/test_engine).
    count = itertools.count(1)
    finished = (lambda _: progress(next(count))) if progress is not None else None
    engine = Engine(model, tokenizer, EngineConfig(max_batch=max_batch, kv_tokens=max_batch * longest + longest))
    requests = [Request(ids, max_tokens, stop_ids=stops, constraint=make() if make else None, on_finish=finished)
                for ids in prompts]
    return [tokenizer.decode([t for t in c.token_ids if t not in stops]) for c in engine.run(requests)]


def _constraint(model: Llama, tokenizer: Tokenizer, max_tokens: int) -> Callable[[], Any]:
    """A factory of per-answer constraints to a valid call of the task's tools (the DFA is built once)."""
    from tinylm.infer.constrained import JsonConstraint, JsonIndex

    index = JsonIndex(function_calling.call_schema(), tokenizer, model.config.vocab_size)
    if max_tokens < index.min_tokens:
        raise TinylmError(f"--max-tokens {max_tokens} is too small for a function call: the shortest takes "
                          f"{index.min_tokens} tokens")
    return lambda: JsonConstraint(index)
