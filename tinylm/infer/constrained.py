"""JSON-schema-constrained decoding: a token-level automaton that only admits JSON valid for a schema.

The schema is checked with `jsonschema` (a one-line error if it is not valid JSON Schema), turned into a
regular expression and a token-level DFA over the model's vocabulary by `outlines-core` (the maintained
Rust core of Outlines, Willard & Louf 2023, "Efficient Guided Generation for LLMs"). On top of it,
tinylm adds a length budget: every state knows the fewest tokens that reach an accepting state, and a
token is allowed only if the JSON can still be closed in the tokens that remain, so a sample that hits
`max_new_tokens` still parses.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinylm.core.errors import TinylmError, optional_import
from tinylm.data.tokenizer import Tokenizer, bytes_to_unicode


def load_schema(path: str | Path) -> dict[str, Any]:
    """Read a JSON Schema file and check it against its metaschema; any problem is a one-line error."""
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TinylmError(f"cannot read the JSON schema {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise TinylmError(f"{path} is not JSON: {e}") from None
    check_schema(schema)
    schema_regex(schema)  # unsupported features fail here, before any model is loaded
    return schema


def schema_regex(schema: dict[str, Any]) -> str:
    """The regular expression of the JSON texts valid for `schema` (outlines-core), or a one-line error."""
    json_schema = optional_import("outlines_core.json_schema", "json", "--json-schema")

    try:
        return json_schema.build_regex_from_schema(json.dumps(schema))
    except (ValueError, TypeError) as e:  # outlines-core: unsupported type / format / reference
        raise TinylmError(f"JSON schema not supported for constrained decoding: {str(e).splitlines()[0]}") from None


def check_schema(schema: Any) -> None:
    """Raise a one-line TinylmError unless `schema` is valid JSON Schema (its own $schema's draft, else 2020-12)."""
    jsonschema = optional_import("jsonschema", "json", "--json-schema")

    if not isinstance(schema, (dict, bool)):
        raise TinylmError(f"a JSON schema is an object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "(root)"
        raise TinylmError(f"not a valid JSON schema at {where}: {e.message}") from None


def validate(instance_text: str, schema: dict[str, Any]) -> Any:
    """Parse `instance_text` as JSON and validate it against `schema`; returns the value (raises on failure)."""
    jsonschema = optional_import("jsonschema", "json", "--json-schema")

    value = json.loads(instance_text)
    jsonschema.validate(value, schema)
    return value


def token_bytes(tokenizer: Tokenizer) -> dict[int, bytes]:
    """The bytes each ordinary token stands for (byte-level BPE symbols mapped back through GPT-2's table);
    special and added tokens are left out, so constrained decoding never emits them."""
    byte_of = {ch: b for b, ch in enumerate(bytes_to_unicode())}
    added = set(tokenizer.backend.get_added_tokens_decoder())
    out = {}
    for token, i in tokenizer.backend.get_vocab(with_added_tokens=False).items():
        if i not in added and all(ch in byte_of for ch in token):
            out[i] = bytes(byte_of[ch] for ch in token)
    if len(out) < 128:
        raise TinylmError("JSON-constrained decoding needs a byte-level BPE tokenizer")
    return out


class JsonIndex:
    """The token DFA of one schema over one vocabulary, shared by every sample drawn with it.

    Args:
        schema: a JSON Schema (already checked).
        tokenizer: the model's tokenizer (byte-level BPE, with an eos token).
        vocab_size: the model's number of logits (may exceed the tokenizer's).
    """

    def __init__(self, schema: dict[str, Any], tokenizer: Tokenizer, vocab_size: int) -> None:
        outlines_core = optional_import("outlines_core", "json", "--json-schema")
        Index, Vocabulary = outlines_core.Index, outlines_core.Vocabulary

        if tokenizer.eos_id is None:
            raise TinylmError("JSON-constrained decoding needs a tokenizer with an eos token")
        regex = schema_regex(schema)
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in token_bytes(tokenizer).items():
            by_bytes.setdefault(b, []).append(i)
        self.eos_id, self.vocab_size = tokenizer.eos_id, vocab_size
        self.index = Index(regex, Vocabulary(self.eos_id, by_bytes))
        self.start = self.index.get_initial_state()
        self.finals = set(self.index.get_final_states())
        self.edges = self._edges(self.index.get_transitions())
        self.distance = self._distances()

    def _edges(self, transitions: dict[int, dict[int, int]]) -> dict[int, tuple[Tensor, Tensor]]:
        """Per state: (token ids, next states), both (n,) int64; eos (which ends the text) excluded."""
        edges = {}
        for state, moves in transitions.items():
            pairs = [(t, s) for t, s in moves.items() if t != self.eos_id and t < self.vocab_size]
            tokens = torch.tensor([t for t, _ in pairs], dtype=torch.long)
            edges[state] = (tokens, torch.tensor([s for _, s in pairs], dtype=torch.long))
        return edges

    def _distances(self) -> Tensor:
        """Fewest tokens from each state to an accepting one (reverse breadth-first search); (n_states,)."""
        n = 1 + max([self.start, *self.finals, *self.edges] +
                    [int(s.max()) for _, s in self.edges.values() if s.numel()])
        incoming: dict[int, list[int]] = {}
        for state, (_, nxt) in self.edges.items():
            for s in set(nxt.tolist()):
                incoming.setdefault(s, []).append(state)
        far = n + 1  # "unreachable"
        dist = torch.full((n,), far, dtype=torch.long)
        queue = deque(self.finals)
        for s in self.finals:
            dist[s] = 0
        while queue:
            s = queue.popleft()
            for p in incoming.get(s, ()):
                if dist[p] == far:
                    dist[p] = dist[s] + 1
                    queue.append(p)
        if dist[self.start] == far:
            raise TinylmError("this JSON schema admits no value that the tokenizer can spell")
        return dist


class JsonConstraint:
    """One sample's position in a JsonIndex: which tokens may come next, and the move on each token.

    Args:
        index: the schema's JsonIndex.
    """

    def __init__(self, index: JsonIndex) -> None:
        self.index, self.state, self.done = index, index.start, False

    def allowed(self, remaining: int) -> Tensor:
        """(vocab_size,) bool: tokens that keep the text a prefix of valid JSON that can still be closed
        within `remaining` tokens (this one included); eos once the text is complete."""
        mask = torch.zeros(self.index.vocab_size, dtype=torch.bool)
        tokens, nxt = self.index.edges.get(self.state, (torch.empty(0, dtype=torch.long),) * 2)
        if tokens.numel():
            dist = self.index.distance[nxt]  # (n,) fewest tokens to close the JSON after each candidate
            ok = dist <= remaining - 1
            mask[tokens[ok if ok.any() else dist == dist.min()]] = True  # over budget: head for the exit
        if self.state in self.index.finals:
            mask[self.index.eos_id] = True
        return mask

    def advance(self, token: int) -> bool:
        """Take `token`; returns True when the text is finished (eos, or no token can follow)."""
        if token == self.index.eos_id:
            self.done = True
            return True
        tokens, nxt = self.index.edges[self.state]
        self.state = int(nxt[(tokens == token).nonzero()[0, 0]])
        self.done = self.state in self.index.finals and self.index.edges.get(self.state, (torch.empty(0),))[0].numel() == 0
        return self.done


def constraint_factory(schema: dict[str, Any], tokenizer: Tokenizer, vocab_size: int) -> Any:
    """A callable that returns a fresh JsonConstraint per sample (the DFA is built once)."""
    index = JsonIndex(schema, tokenizer, vocab_size)
    return lambda: JsonConstraint(index)
