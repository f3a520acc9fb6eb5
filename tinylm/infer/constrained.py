"""JSON-schema-constrained decoding: a token-level automaton that only admits JSON valid for a schema.

The schema is checked with `jsonschema` (a one-line error if it is not valid JSON Schema), turned into a
regular expression and a token-level DFA over the model's vocabulary by `outlines-core` (the maintained
Rust core of Outlines, Willard & Louf 2023, "Efficient Guided Generation for LLMs"). On top of it,
tinylm adds a length budget: every state knows the fewest tokens that reach an accepting state, and a
token is allowed only if the JSON can still be closed in the tokens that remain, so a sample that hits
`max_new_tokens` still parses.

The work is bounded (issue 12): what outlines-core cannot compile right (look-around, backreferences, an
allOf of several schemas) and bounds no value meets are refused by name; the automaton's size is estimated
from the regex's repetition counts and refused over MAX_STATES and MAX_STEPS; building the index has a
wall-clock limit, COMPILE_SECONDS, and Ctrl-C ends it.
"""

from __future__ import annotations

import json
import re
import threading
import time
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
    check_satisfiable(schema)
    check_supported(schema)
    check_size(schema_regex(schema), 0)  # unsupported features and sizes fail here, before any model is loaded
    return schema


# Regex features that Python's `re` accepts but outlines-core's automata cannot express (no DFA has them).
_UNSUPPORTED = [
    (re.compile(r"\(\?<[=!]"), "look-behind (?<=...) or (?<!...)"),
    (re.compile(r"\(\?[=!]"), "look-ahead (?=...) or (?!...)"),
    (re.compile(r"\\[1-9]|\(\?P=|\\k<"), "a backreference (\\1, (?P=name))"),
    (re.compile(r"\(\?>|[*+?}][+]"), "an atomic group or possessive quantifier"),
    (re.compile(r"\(\?\("), "a conditional group (?(...)...)"),
]
_BOUNDS = [("minimum", "maximum"), ("minLength", "maxLength"), ("minItems", "maxItems"),
           ("minProperties", "maxProperties"), ("minContains", "maxContains")]


def _subschemas(schema: Any, where: str = "") -> Any:
    """Every object in `schema` with its JSON pointer, the schema itself first."""
    if isinstance(schema, dict):
        yield where or "/", schema
        for key, value in schema.items():
            yield from _subschemas(value, f"{where}/{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _subschemas(value, f"{where}/{i}")


def check_supported(schema: Any) -> None:
    """A one-line error for what outlines-core cannot compile right: a `pattern` that is not a regular
    expression or uses a feature no automaton can express (look-around, backreferences), or an allOf of
    several schemas; it names where it is and the feature.

    Args:
        schema: the JSON schema (already checked against its metaschema).
    """
    for where, sub in _subschemas(schema):
        if isinstance(sub.get("allOf"), list) and len(sub["allOf"]) > 1:  # outlines-core 0.2 concatenates them
            raise TinylmError(f"allOf with {len(sub['allOf'])} schemas at {where} is not supported for constrained "
                              "decoding: merge them into one schema")
        pattern = sub.get("pattern")
        if not isinstance(pattern, str):
            continue
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise TinylmError(f"the pattern {pattern[:60]!r} at {where} is not a regular expression: {e}") from None
        for feature, name in _UNSUPPORTED:
            if feature.search(pattern):
                raise TinylmError(f"the pattern {pattern[:60]!r} at {where} uses {name}, which constrained "
                                  "decoding cannot support (no finite automaton can)")


def check_satisfiable(schema: Any) -> None:
    """A one-line error for bounds that no value meets (minimum above maximum, minLength above maxLength, ...).

    Args:
        schema: the JSON schema (already checked against its metaschema).
    """
    for where, sub in _subschemas(schema):
        if sub.get("enum") == [] and not where.endswith(("/properties", "/$defs", "/definitions")):
            raise TinylmError(f"this JSON schema admits no value: an empty enum at {where}")
        for low, high in _BOUNDS:
            a, b = sub.get(low), sub.get(high)
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) and a > b:
                raise TinylmError(f"this JSON schema admits no value: {low} {a} > {high} {b} at {where}")


def schema_regex(schema: dict[str, Any]) -> str:
    """The regular expression of the JSON texts valid for `schema` (outlines-core), or a one-line error."""
    json_schema = optional_import("outlines_core.json_schema", "json", "--json-schema")

    try:
        return json_schema.build_regex_from_schema(json.dumps(schema))
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # unsupported type / format / reference
        raise TinylmError(f"JSON schema not supported for constrained decoding: {_index_error(e)}") from None


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
    """Parse `instance_text` as JSON and validate it against `schema`; returns the value, or raises a one-line
    TinylmError (the automaton enforces the schema's structure; a few keywords, such as multipleOf or
    uniqueItems, only this check sees)."""
    jsonschema = optional_import("jsonschema", "json", "--json-schema")

    try:
        value = json.loads(instance_text)
    except json.JSONDecodeError as e:
        raise TinylmError(f"a constrained sample is not JSON ({e}): this schema was compiled wrongly; "
                          "please report it to tinylm") from None
    error = jsonschema.exceptions.best_match(
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema).iter_errors(value))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise TinylmError(f"a sample is JSON but not valid for the schema at {where}: {error.message[:200]} "
                          "(constrained decoding does not enforce every keyword)")
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


# Limits on the work one schema may cause (issue 12: `{"type": "string", "minLength": 100000}` ran for minutes).
# A JSON string character is about 10 DFA states (UTF-8 sequences and escapes), so 50,000 states is a string of
# about 5,000 characters. Building the token index walks every state with every distinct token, about 0.1 us a
# step in outlines-core 0.2.14 on one core (measured: 3.5M steps in 0.32 s); the estimate is an upper bound
# (SmolLM2-135M's 49k tokens with {"type": "object"}: ~97M estimated, the whole command 7 s). Tabulating the
# allowed tokens in Python costs about 2 us per allowed (state, token) pair.
MAX_STATES = 50_000  # estimated automaton states of a schema's regular expression
MAX_STEPS = 400_000_000  # estimated states x distinct tokens walked to build the token index (at most ~40 s)
COMPILE_SECONDS = 30.0  # wall-clock limit on building the token index, a backstop for what the estimate misses

# The regex is searched from a sentinel byte that JSON never contains. outlines-core builds a dense DFA with an
# unanchored start too, whose size is exponential in repetition counts when the JSON's own bytes can start a
# new match (a string's `\"`): `"(...){14,}"` took 2.4 s, {20,} minutes. After the sentinel no new match can
# start, so the DFA stays linear in the regex; the sentinel is a token of its own, taken before the first step.
_SENTINEL = "\\x01"


def regex_states(regex: str) -> int:
    """An upper estimate of the DFA states of `regex` (outlines-core's dialect): every literal counts 1, a
    class or `.` that can match beyond ASCII counts 8 (its UTF-8 byte sequences; a JSON string character is
    about 10 states, measured), alternatives add up, and a repetition
    {n}, {n,} or {n,m} multiplies what it repeats by m (n + 1 when unbounded).

    Args:
        regex: the regular expression.
    """
    stack: list[list[int]] = [[0, 0]]  # per open group: [size so far, size of the last atom]
    i = 0
    while i < len(regex):
        c, top = regex[i], stack[-1]
        if c == "(":
            stack.append([0, 0])
            i += 3 if regex.startswith("(?:", i) else 1
            continue
        if c == ")" and len(stack) > 1:
            size = stack.pop()[0]
            stack[-1][0] += size
            stack[-1][1] = size
        elif c == "{" and (m := re.match(r"\{(\d+)(,(\d*))?\}", regex[i:])):
            low, comma, high = int(m.group(1)), m.group(2), m.group(3)
            times = int(high) if high else low + 1 if comma else low
            top[0] += top[1] * (max(times, 1) - 1)
            top[1] *= max(times, 1)
            i += m.end()
            continue
        elif c in "*+?|":
            pass
        else:
            size, i = _atom(regex, i)
            top[0] += size
            top[1] = size
            continue
        i += 1
    return sum(s for s, _ in stack)


def _atom(regex: str, i: int) -> tuple[int, int]:
    # (estimated states, index after) of the literal, escape, class or `.` at regex[i]
    if regex[i] == "\\":
        end = i + 2
        if regex.startswith(("\\x",), i):
            end = i + 4
        elif regex.startswith(("\\u",), i):
            end = i + 6
        return (8 if regex[i + 1:i + 2] in ("u", "p", "P", "D", "W", "S") else 1), end
    if regex[i] == "[":
        j = i + 1 + (regex[i + 1:i + 2] == "^")
        j += regex[j:j + 1] == "]"
        while j < len(regex) and regex[j] != "]":
            j += 2 if regex[j] == "\\" else 1
        body = regex[i:j + 1]
        wide = body.startswith("[^") or "\\u" in body or any(ord(ch) > 127 for ch in body)
        return (8 if wide else 1), j + 1
    return (8 if regex[i] == "." or ord(regex[i]) > 127 else 1), i + 1


class JsonIndex:
    """The token DFA of one schema over one vocabulary, shared by every sample drawn with it.

    Building it is bounded: the regex's estimated states and states x tokens are checked against MAX_STATES and
    MAX_STEPS first, and the index is built in a thread that is abandoned after `seconds` (or on Ctrl-C).

    Args:
        schema: a JSON Schema (already checked).
        tokenizer: the model's tokenizer (byte-level BPE, with an eos token).
        vocab_size: the model's number of logits (may exceed the tokenizer's).
        seconds: wall-clock limit on building the index.
    """

    def __init__(self, schema: dict[str, Any], tokenizer: Tokenizer, vocab_size: int,
                 seconds: float = COMPILE_SECONDS) -> None:
        if tokenizer.eos_id is None:
            raise TinylmError("JSON-constrained decoding needs a tokenizer with an eos token")
        self.deadline = time.monotonic() + seconds
        self.seconds = seconds
        regex = schema_regex(schema)
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in token_bytes(tokenizer).items():
            by_bytes.setdefault(b, []).append(i)
        check_size(regex, len(by_bytes))
        sentinel = 1 + max([vocab_size, tokenizer.eos_id, *(i for ids in by_bytes.values() for i in ids)])
        by_bytes.setdefault(b"\x01", []).append(sentinel)
        self.eos_id, self.vocab_size = tokenizer.eos_id, vocab_size
        self.index = self._build(f"{_SENTINEL}(?:{regex})", by_bytes)
        start = self.index.get_next_state(self.index.get_initial_state(), sentinel)
        if start is None:
            raise TinylmError("this JSON schema admits no value that the tokenizer can spell")
        self.start = start
        self.finals = set(self.index.get_final_states())
        self.edges = self._edges(self.index.get_transitions())
        self.distance = self._distances()

    @property
    def min_tokens(self) -> int:
        """The fewest tokens that spell a value valid for the schema."""
        return int(self.distance[self.start])

    def _build(self, regex: str, by_bytes: dict[bytes, list[int]]) -> Any:
        """outlines-core's Index, built in a thread (it releases the GIL) that is left behind on timeout or Ctrl-C."""
        outlines_core = optional_import("outlines_core", "json", "--json-schema")
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["index"] = outlines_core.Index(regex, outlines_core.Vocabulary(self.eos_id, by_bytes))
            except Exception as e:  # noqa: BLE001 - handed to the main thread
                result["error"] = e

        worker = threading.Thread(target=work, name="tinylm-json-index", daemon=True)
        worker.start()
        # Joined in short slices: POSIX lets the kernel hand a process-directed SIGINT to any thread, and Python
        # runs its handler (the KeyboardInterrupt) only in the main thread, between bytecodes; one long join
        # would not wake until the build ends when the signal lands on the build thread.
        while worker.is_alive() and time.monotonic() < self.deadline:
            worker.join(min(0.2, max(0.0, self.deadline - time.monotonic())))
        if worker.is_alive():
            self._too_slow()
        if "error" in result:
            raise TinylmError(f"JSON schema not supported for constrained decoding: {_index_error(result['error'])}")
        return result["index"]

    def _too_slow(self) -> None:
        raise TinylmError(f"compiling the JSON schema took longer than its limit of {self.seconds:g} seconds; "
                          "simplify the schema (fewer properties, smaller length and item counts)")

    def _edges(self, transitions: dict[int, dict[int, int]]) -> dict[int, tuple[Tensor, Tensor]]:
        """Per state: (token ids, next states), both (n,) int64; eos (which ends the text) excluded."""
        edges = {}
        for k, (state, moves) in enumerate(transitions.items()):
            if k % 256 == 0 and time.monotonic() > self.deadline:
                self._too_slow()
            tokens = torch.tensor(list(moves), dtype=torch.long)  # (n,)
            nxt = torch.tensor(list(moves.values()), dtype=torch.long)  # (n,)
            keep = (tokens != self.eos_id) & (tokens < self.vocab_size)  # the sentinel is >= vocab_size
            edges[state] = (tokens[keep], nxt[keep])
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
        dist = [far] * n
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
        if dist[self.start] == 0:  # outlines-core turned it into a regex that matches the empty text
            raise TinylmError("this JSON schema admits no value (it compiles to the empty text, which is not JSON)")
        return torch.tensor(dist, dtype=torch.long)


def check_size(regex: str, n_tokens: int) -> None:
    """A one-line error if the schema's automaton would exceed MAX_STATES, or building its token index over
    `n_tokens` distinct tokens would exceed MAX_STEPS (0: the states alone, before the vocabulary is known).

    Args:
        regex: the schema's regular expression.
        n_tokens: the vocabulary's distinct token spellings.
    """
    states = regex_states(regex)
    hint = "lower its minLength/maxLength, minItems/maxItems or pattern {n,m} counts, or shorten its enums"
    if states > MAX_STATES:
        raise TinylmError(f"this JSON schema needs an automaton of about {states:,} states, over the limit of "
                          f"{MAX_STATES:,}: {hint}")
    if states * n_tokens > MAX_STEPS:
        raise TinylmError(f"this JSON schema needs about {states:,} automaton states x {n_tokens:,} tokens = "
                          f"{states * n_tokens:,} steps to compile, over the limit of {MAX_STEPS:,}: {hint}")


def _index_error(e: Exception) -> str:
    """outlines-core's error building the index, as one line naming the regex feature it refused."""
    text = " ".join(str(e).split())
    if "look-around" in text or "look-behind" in text or "look-ahead" in text:
        return "a pattern uses look-around ((?=...), (?!...), (?<=...), (?<!...)), which is not supported"
    if "backreference" in text:
        return "a pattern uses a backreference (\\1), which is not supported"
    return text.split(" Make sure it is valid")[0][:300]  # outlines-core appends a paragraph of advice


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
