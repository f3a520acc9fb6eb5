"""A local model as a teacher or judge: chat questions answered together through the engine.

`LocalTeacher.answer(asks)` decodes a list of `Ask`s (messages, token limit, temperature, seed, optional JSON
schema) with continuous batching, each with its own seeded generator and its own JSON-schema constraint, and
returns the answers in order. serve.client puts an OpenAI-compatible endpoint behind the same call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tinylm.core.errors import TinylmError


@dataclass
class Ask:
    """One chat question for a teacher.

    Args:
        messages: the conversation so far ([{"role", "content"}, ...]), ending with the user's turn.
        max_tokens: the most tokens of the answer.
        temperature: 0 is greedy.
        seed: the sampling seed (the same seed, the same answer from a local model).
        schema: a JSON schema the answer must satisfy (constrained decoding), or None.
    """

    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    schema: dict[str, Any] | None = None


class LocalTeacher:
    """A model of any tinylm source, asked through the engine (continuous batching).

    A model with a chat template gets each conversation rendered by it with the generation prompt and
    answers until its end-of-turn token; a base model without one gets the last user message as a plain
    prompt after bos and answers until eos.

    Args:
        loaded: the loaded model and tokenizer (formats.checkpoint.load).
        name: its name in messages and rows.
        max_batch: questions decoded together.
    """

    def __init__(self, loaded: Any, name: str, max_batch: int = 16) -> None:
        if loaded.tokenizer is None:
            raise TinylmError(f"{name} has no tokenizer to read questions with")
        self.model, self.tokenizer, self.name, self.max_batch = loaded.model.eval(), loaded.tokenizer, name, max_batch
        self._constraints: dict[str, Callable[[], Any]] = {}  # one JSON index per schema

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The token ids the model continues for a conversation."""
        tok = self.tokenizer
        if tok.chat_template:
            return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        bos = [tok.bos_id] if tok.bos_id is not None else []
        return bos + tok.encode(messages[-1]["content"])

    def answer(self, asks: Sequence[Ask], on_done: Callable[[], object] | None = None) -> list[str]:
        """The answers to `asks`, in order, decoded together by a fresh engine (so the same questions give the
        same answers whatever was asked before).

        Args:
            asks: the questions.
            on_done: called after each answer finishes.
        """
        from tinylm.data.chat import end_of_turn_id
        from tinylm.infer.engine import Engine, EngineConfig, Request
        from tinylm.infer.sampling import SamplingConfig

        if not asks:
            return []
        tok = self.tokenizer
        stops = sorted(({end_of_turn_id(tok)} if tok.chat_template else set()) | ({tok.eos_id} - {None}))
        prompts = self.check(asks)
        finished = (lambda _: on_done()) if on_done is not None else None
        longest = max(len(p) + a.max_tokens for p, a in zip(prompts, asks))
        engine = Engine(self.model, tok, EngineConfig(max_batch=self.max_batch, kv_tokens=(self.max_batch + 1) * longest))
        requests = [Request(ids, a.max_tokens, SamplingConfig(temperature=a.temperature, seed=a.seed), stop_ids=stops,
                            constraint=self._constraint(a.schema) if a.schema else None, on_finish=finished)
                    for ids, a in zip(prompts, asks)]
        return [tok.decode([t for t in c.token_ids if t not in stops]) for c in engine.run(requests)]

    def check(self, asks: Sequence[Ask]) -> list[list[int]]:
        """The questions' prompt ids; a one-line error when one and its answer would not fit the context."""
        prompts = [self.prompt_ids(a.messages) for a in asks]
        context = self.model.config.max_seq_len
        for ids, ask in zip(prompts, asks):
            if len(ids) + ask.max_tokens > context:
                raise TinylmError(f"a question of {len(ids)} tokens and its {ask.max_tokens} answer tokens exceed "
                                  f"{self.name}'s context of {context} tokens (lower --max-tokens)")
        return prompts

    def _constraint(self, schema: dict[str, Any]) -> Any:
        from tinylm.infer.constrained import constraint_factory

        key = json.dumps(schema, sort_keys=True)
        if key not in self._constraints:
            self._constraints[key] = constraint_factory(schema, self.tokenizer, self.model.config.vocab_size)
        return self._constraints[key]()
