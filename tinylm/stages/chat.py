"""`tinylm chat`: talk to a model in the terminal, turn by turn, with history and streamed replies."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any, Callable

import torch

from tinylm.core.errors import TinylmError
from tinylm.core.recipe import Check, Count, NonNegative, Seed
from tinylm.data.chat import end_of_turn_id
from tinylm.data.tokenizer import Tokenizer
from tinylm.formats.checkpoint import load
from tinylm.infer.generate import TextStream, generate_ids
from tinylm.model.kvcache import KVCache
from tinylm.model.llama import Llama

HELP = "commands: /reset (clear the history), /system TEXT (set the system message), /exit (or Ctrl-D)"


@dataclass
class ChatConfig:
    """What `tinylm chat` does: read user lines from stdin, stream the model's replies to stdout."""

    source: str  # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m); needs a chat template
    system: str | None = None  # system message at the start of the history (/system TEXT changes it)
    max_tokens: Count = 128  # most new tokens per reply (the history gets the rest of the context)
    temperature: NonNegative = 0.7  # softmax temperature; 0 = greedy
    top_p: Annotated[float, Check(gt=0, le=1)] | None = None  # nucleus sampling: the smallest set of tokens with this probability (none: all)
    seed: Seed | None = None  # sampling seed (reply i of the session uses seed + i)
    json_schema: str | None = None  # constrain every reply to JSON valid for the JSON Schema in this file


def main(cfg: ChatConfig) -> None:
    """`tinylm chat`: check the schema and the model (a chat template, room in its context) before the first
    prompt, then answer lines from stdin until /exit or end of input.

    Args:
        cfg: the command's config.
    """
    schema = None
    if cfg.json_schema:
        from tinylm.infer.constrained import load_schema

        schema = load_schema(cfg.json_schema)  # a bad schema fails before the model loads
    loaded = load(cfg.source)
    tok = loaded.tokenizer
    if tok is None or not tok.chat_template:
        raise TinylmError(f"{cfg.source} has no chat template: fine-tune it with `tinylm sft` (which adds ChatML) "
                          "or continue plain text with `tinylm generate`")
    if cfg.max_tokens >= loaded.config.max_seq_len:
        raise TinylmError(f"--max-tokens {cfg.max_tokens} leaves no room for the history in the model's context "
                          f"of {loaded.config.max_seq_len} tokens")
    session = ChatSession(loaded.model, tok, cfg, _json_constraint(schema, loaded, cfg) if schema else None)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)
    while (line := _read_line(interactive)) is not None:
        if line.startswith("/"):
            if not _command(session, line):
                return
        elif line.strip():
            session.reply(line)


def _json_constraint(schema: dict[str, Any], loaded: Any, cfg: ChatConfig) -> Callable[[], Any]:
    """A factory of per-reply JSON-schema constraints; refuses a --max-tokens too small for the schema."""
    from tinylm.infer.constrained import JsonConstraint, JsonIndex

    index = JsonIndex(schema, loaded.tokenizer, loaded.config.vocab_size)
    if cfg.max_tokens < index.min_tokens:
        raise TinylmError(f"--max-tokens {cfg.max_tokens} is too small for this JSON schema: its shortest valid "
                          f"value takes {index.min_tokens} tokens")
    return lambda: JsonConstraint(index)


def _read_line(interactive: bool) -> str | None:
    """The next user line, or None at end of input; a `> ` prompt only on a terminal."""
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)  # end the prompt's line
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def _command(session: ChatSession, line: str) -> bool:
    """Run a /command; False ends the chat."""
    name, _, arg = line.partition(" ")
    if name == "/exit":
        return False
    if name == "/reset":
        session.messages.clear()
        print("(history cleared)", file=sys.stderr)
    elif name == "/system":
        session.system = arg.strip() or None
        print("(system message set)" if session.system else "(system message removed)", file=sys.stderr)
    else:
        print(f"unknown command {name}; {HELP}", file=sys.stderr)
    return True


class ChatSession:
    """The history of one chat, and a KV cache holding the tokens of the last prompt and reply, so that the
    next turn computes only what it appends (its prompt starts with the previous one).

    Args:
        model, tokenizer: the model and its tokenizer (with a chat template).
        cfg: sampling settings and the reply length.
        constraint: makes a fresh per-reply constraint (JSON schema), or None.
        write: where replies stream (default stdout).
    """

    def __init__(self, model: Llama, tokenizer: Tokenizer, cfg: ChatConfig,
                 constraint: Callable[[], Any] | None = None, write: Callable[[str], object] | None = None) -> None:
        self.model, self.tokenizer, self.cfg, self.constraint = model, tokenizer, cfg, constraint
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.system = cfg.system
        self.messages: list[dict[str, str]] = []  # user, assistant, user, ... (the system message apart)
        self.stops = {end_of_turn_id(tokenizer)} | ({tokenizer.eos_id} - {None})
        self.cache = KVCache.new(model, 1, 1)
        self.cached: list[int] = []  # the ids whose keys and values the cache holds (cache.pos of them)
        self.turns = 0
        self.warned = False

    def history(self) -> list[dict[str, str]]:
        """The messages of the next prompt: the system message, then the turns."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def prompt_ids(self) -> list[int] | None:
        """The ids of the next prompt, dropping the oldest turns while it leaves less than --max-tokens of
        the model's context; None when the last user message alone does not fit."""
        budget = self.model.config.max_seq_len - self.cfg.max_tokens
        while True:
            text = self.tokenizer.apply_chat_template(self.history(), add_generation_prompt=True)
            ids = self.tokenizer.encode(text)
            if len(ids) <= budget:
                return ids
            if len(self.messages) <= 1:
                print(f"tinylm: this message makes a prompt of {len(ids)} tokens; the context holds {budget} "
                      f"with --max-tokens {self.cfg.max_tokens}: not sent", file=sys.stderr)
                return None
            del self.messages[:2]  # the oldest user message and its reply
            if not self.warned:
                print("tinylm: the history no longer fits the model's context: dropping the oldest turns "
                      "(the system message stays)", file=sys.stderr)
                self.warned = True

    def reply(self, text: str) -> str | None:
        """Add a user message, stream the model's reply, add it to the history and return it; None when
        the message does not fit or Ctrl-C stops the reply (the turn is then forgotten).

        Args:
            text: the user's message.
        """
        self.messages.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        if ids is None:
            self.messages.pop()
            return None
        stream = TextStream(self.tokenizer, (), self.write)
        try:
            new = self._generate(ids, stream)
        except KeyboardInterrupt:  # Ctrl-C during a reply: stop it, back to the prompt
            self.messages.pop()
            self.cache.pos, self.cached = 0, []  # the cache may be half-written
            self.write("\n")
            print("(reply stopped)", file=sys.stderr)
            return None
        self.cached = (ids + new)[:self.cache.pos]
        answer = stream.finish()
        self.write("\n")
        self.messages.append({"role": "assistant", "content": answer})
        self.turns += 1
        return answer

    def _generate(self, ids: list[int], stream: TextStream) -> list[int]:
        """The new ids after the prompt `ids`, reusing the cache for the prefix it shares with them."""
        keep = _common_prefix(self.cached, ids[:-1])  # at least one prompt id is fed, for the logits
        self._reserve(keep, len(ids) + self.cfg.max_tokens)
        cfg = self.cfg
        seed = None if cfg.seed is None else cfg.seed + self.turns
        return generate_ids(self.model, ids, cfg.max_tokens, cfg.temperature, None, cfg.top_p, 1.0, seed,
                            sorted(self.stops), on_token=lambda _, t: t in self.stops or stream.push(t),
                            constraints=[self.constraint()] if self.constraint else None, cache=self.cache)

    @torch.no_grad()
    def _reserve(self, keep: int, length: int) -> None:
        """Keep the first `keep` cached positions, in a cache of at least `length` (grown in steps of 512
        positions, up to the model's context, so a long chat reallocates rarely)."""
        if self.cache.max_len < length:
            grown = KVCache.new(self.model, 1, min(-(-length // 512) * 512, self.model.config.max_seq_len))
            grown.k[..., :keep, :] = self.cache.k[..., :keep, :]  # (L, 1, n_kv, keep, hd)
            grown.v[..., :keep, :] = self.cache.v[..., :keep, :]
            self.cache = grown
        self.cache.pos = keep


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
