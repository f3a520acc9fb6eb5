"""A model's answers to a built-in task's examples (tinylm.data.tasks), for `tinylm data check --model`.

Each example's messages before the last (the gold answer) are rendered through the model's chat template
with the generation prompt, and the model answers greedily until its end-of-turn token. Function calling
can be answered under JSON-schema constrained decoding: the answer is then a valid call of one of the
tools by construction (`function_calling.call_schema`), so only the choice of function and the argument
values can be wrong.
"""

from __future__ import annotations

from typing import Any, Callable

from tinylm.core.errors import TinylmError
from tinylm.data.chat import end_of_turn_id
from tinylm.data.tasks import function_calling
from tinylm.data.tokenizer import Tokenizer
from tinylm.infer.generate import common_prefix, generate_ids
from tinylm.model.kvcache import KVCache
from tinylm.model.llama import Llama


def answer(model: Llama, tokenizer: Tokenizer, examples: list[dict[str, Any]], max_tokens: int,
           constrained: bool = False, progress: Callable[[int], object] | None = None) -> list[str]:
    """The model's greedy answer to every example, in order.

    Args:
        model, tokenizer: the model (eval mode) and its tokenizer, which needs a chat template.
        examples: SFT records of a built-in task ({"messages": [..., gold assistant message]}).
        max_tokens: the most new tokens per answer.
        constrained: decode function calls under `function_calling.call_schema` (a JSON-schema constraint).
        progress: called with the number of answers done after each one.
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
    # The examples share their system message: each answer keeps the cached keys and values of the prefix its
    # prompt shares with the previous one and computes only the rest (at least one id, for the logits).
    cache, previous = KVCache.new(model, 1, longest), []
    out = []
    for i, ids in enumerate(prompts):
        cache.pos = common_prefix(previous, ids[:-1])
        new = generate_ids(model, ids, max_tokens, temperature=0.0, stop_ids=stops,
                           constraints=[make()] if make else None, cache=cache)
        previous = ids
        out.append(tokenizer.decode([t for t in new if t not in stops]))
        if progress is not None:
            progress(i + 1)
    return out


def _constraint(model: Llama, tokenizer: Tokenizer, max_tokens: int) -> Callable[[], Any]:
    """A factory of per-answer constraints to a valid call of the task's tools (the DFA is built once)."""
    from tinylm.infer.constrained import JsonConstraint, JsonIndex

    index = JsonIndex(function_calling.call_schema(), tokenizer, model.config.vocab_size)
    if max_tokens < index.min_tokens:
        raise TinylmError(f"--max-tokens {max_tokens} is too small for a function call: the shortest takes "
                          f"{index.min_tokens} tokens")
    return lambda: JsonConstraint(index)
