"""Chat and instruction data for fine-tuning: readers, chat templates, exact loss masks, packed rows.

Data as people have it becomes a list of `Example`s (`read_examples`): chat `messages` JSON Lines (roles
system / user / assistant / tool, `tool_calls`, a `tools` list per example), `prompt` / `completion`
(plain text, or lists of messages), Alpaca (`instruction` / `input` / `output`), from .jsonl / .json
files, parquet files and `datasets.save_to_disk` dirs. A bad row is one line naming file:line.

`render` turns an example into token ids and a loss mask through the tokenizer's chat template: the
template is rendered on message prefixes, so the mask is exact for any template that renders a
conversation's prefix as a prefix of the whole (checked; a template that does not is refused) and is
True exactly on the assistant turns' content and their end-of-turn token. A tokenizer without a
template gets ChatML (`add_chatml`: special tokens added, embeddings and LM head resized).

`pack` puts rendered examples into rows of seq_len + 1 tokens with per-token segment ids, never
splitting an example, and `Packed.batches` is the training loop's batch source over them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import tokenizers
import torch

from tinylm.core.errors import TinylmError, optional_import
from tinylm.core.recipe import one_of
from tinylm.data.sources import Source, resolve_inputs
from tinylm.data.tokenizer import CHATML_TEMPLATE, Tokenizer
from tinylm.data.tokens import Batch, BatchSource
from tinylm.model.llama import Llama
from tinylm.model.surgery import resize_vocab

ROLES = ("system", "user", "assistant", "tool")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

T = TypeVar("T")  # what a row is converted to


@dataclass
class ChatSection:
    """How chat and instruction data becomes training rows."""

    # loss only on the assistant turns and their end-of-turn token (or a completion and its eos);
    # false: on every token
    assistant_only: bool = True
    # fit: best-fit decreasing by length (fewest rows); order: rows filled in data order; none: one
    # example per row, padded
    packing: one_of("fit", "order", "none") = "fit"
    too_long: one_of("refuse", "truncate") = "refuse"  # an example longer than seq_len + 1 tokens
    skip_bad_rows: bool = False  # skip rows with missing fields or bad values and report how many
    end_of_turn: str | None = None  # the token that ends an assistant turn (none: <|im_end|> if known, else eos)


@dataclass
class Example:
    """One training example: a conversation, or a plain prompt and completion.

    Args:
        messages: [{"role", "content"[, "tool_calls"]}, ...] (None for plain text); tool calls are
            normalised to {"type": "function", "function": {"name", "arguments": dict}}.
        tools: the functions the conversation may call (JSON-schema'd, the chat `tools` format).
        train_from: assistant turns before this message index carry no loss (a conversational
            prompt's own assistant turns).
        prompt, completion: plain text (when messages is None).
        where: file:line of the row, named in errors.
    """

    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    train_from: int = 0
    prompt: str | None = None
    completion: str | None = None
    where: str = "an example"


# ----- reading ---------------------------------------------------------------------------------------

def read_examples(inputs: list[str], skip_bad: bool = False) -> tuple[list[Example], list[str]]:
    """Every example of the user's files, in order, and the problems of the rows skipped.

    Args:
        inputs: .jsonl / .json (JSON Lines, or one JSON array) / .parquet files, dirs of them, or
            `datasets.save_to_disk` dirs.
        skip_bad: skip a bad row (its problem is returned) instead of refusing the data.

    Returns:
        (examples, one line per skipped row).
    """
    return read_rows(inputs, to_example, skip_bad, "examples")


def read_rows(inputs: list[str], convert: Callable[[Any, str], T], skip_bad: bool = False,
              what: str = "examples") -> tuple[list[T], list[str]]:
    """Every row of the inputs (as `read_examples` takes them) through `convert(row, where)` (where is
    file:line), and the problems of the rows skipped; `convert` raises a TinylmError for a bad row.

    Args:
        inputs: .jsonl / .json / .parquet files, dirs of them, or `datasets.save_to_disk` dirs.
        convert: checks and converts one row (`to_example`; dpo's `to_pair`).
        skip_bad: skip a bad row (its problem is returned) instead of refusing the data.
        what: what the rows are, for the message when none is left.
    """
    rows, skipped = [], []
    for where, record in _records(_chat_sources(inputs)):
        try:
            rows.append(convert(record, where))
        except TinylmError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    if not rows:
        raise TinylmError(f"no {what} in {', '.join(inputs)}" + (f" ({len(skipped)} bad rows)" if skipped else ""))
    return rows, skipped


def is_held_out(row: Example | tuple[Example, ...], fraction: float) -> bool:
    """Whether a row goes to validation: a hash of its content, uniform in [0, 1), below `fraction`, so the
    split depends neither on the order of the data nor on the seed.

    Args:
        row: an example, or a preference pair's examples (their file:line does not count, so moving rows
            keeps the split).
        fraction: the share held out.
    """
    def content(e: Example) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(e).items() if k != "where"}

    key = content(row) if isinstance(row, Example) else [content(e) for e in row]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _chat_sources(inputs: list[str]) -> list[Source]:
    """The data files of the inputs; files of other kinds inside a dir are left out, given ones refused."""
    sources = []
    for spec in inputs:
        found = resolve_inputs([spec])
        if Path(spec).is_dir():
            found = [s for s in found if s.kind != "txt"]
        for s in found:
            if s.kind not in ("jsonl", "parquet", "hf_disk"):
                raise TinylmError(f"{s.name}: chat data must be JSON Lines (.jsonl, .json), parquet or a "
                                  f"datasets dir")
        sources += found
    if not sources:
        raise TinylmError(f"no .jsonl, .json or .parquet files in {', '.join(inputs)}")
    return sources


def _records(sources: list[Source]) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of the sources; where is file:line (JSON Lines) or file row n."""
    for src in sources:
        if src.kind == "jsonl":
            yield from _json_records(Path(src.name))
        elif src.kind == "parquet":
            pq = optional_import("pyarrow.parquet", "data", f"{src.name}: reading it")
            try:
                rows = pq.read_table(src.name).to_pylist()
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for corrupt files
                raise TinylmError(f"{src.name}: not a readable parquet file ({str(e).splitlines()[0]})") from None
            yield from ((f"{src.name} row {i}", _drop_nulls(r)) for i, r in enumerate(rows, 1))
        else:
            datasets = optional_import("datasets", "data", f"{src.name}: reading it")
            ds = datasets.load_from_disk(src.name)
            parts = [ds] if hasattr(ds, "column_names") else [ds["train"]] if "train" in ds else [ds[k] for k in sorted(ds)]
            for part in parts:
                yield from ((f"{src.name} row {i}", _drop_nulls(r)) for i, r in enumerate(part, 1))


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise TinylmError(f"{path}: not UTF-8 text") from None
    if text.lstrip().startswith("["):  # one JSON array (Alpaca's alpaca_data.json)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise TinylmError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        yield from ((f"{path} item {i}", r) for i, r in enumerate(rows, 1))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise TinylmError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


def _drop_nulls(x: Any) -> Any:
    """A parquet / datasets row without the nulls that columnar storage adds for absent keys."""
    if isinstance(x, dict):
        return {k: _drop_nulls(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_nulls(v) for v in x]
    return x


def to_example(record: Any, where: str = "an example") -> Example:
    """One row as an Example, every field checked; a problem is a one-line TinylmError naming `where`.

    Args:
        record: a row: {"messages"[, "tools"]}, {"prompt", "completion"} or {"instruction"[, "input"], "output"}.
        where: file:line of the row.
    """
    def bad(problem: str) -> TinylmError:
        return TinylmError(f"{where}: {problem}")

    if not isinstance(record, dict):
        raise bad("expected a JSON object")
    tools = record.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise bad("'tools' must be a list of objects")
    if "messages" in record:
        return Example(_messages(record["messages"], bad), tools or None, where=where)
    if "prompt" in record and "completion" in record:
        return _prompt_completion(record["prompt"], record["completion"], tools, bad, where)
    if "instruction" in record and "output" in record:
        fields = [record["instruction"], record.get("input", ""), record["output"]]
        if not all(isinstance(f, str) for f in fields):
            raise bad("'instruction', 'input' and 'output' must be strings")
        user = fields[0] + ("\n\n" + fields[1] if fields[1].strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": fields[2]}]
        return Example(_messages(messages, bad), where=where)
    raise bad("no 'messages', 'prompt' / 'completion' or 'instruction' / 'output' fields")


def _prompt_completion(prompt: Any, completion: Any, tools: list[dict[str, Any]] | None, bad: Any,
                       where: str) -> Example:
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise bad("empty completion")
        return Example(prompt=prompt, completion=completion, where=where)
    if isinstance(prompt, list):  # conversational: loss on the completion's turns only
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        if isinstance(completion, list):
            messages = _messages(prompt + completion, bad)
            return Example(messages, tools or None, train_from=len(prompt), where=where)
    raise bad("'prompt' and 'completion' must be strings, or lists of messages")


def _messages(messages: Any, bad: Any) -> list[dict[str, Any]]:
    """The messages checked and normalised (tool calls as {"type", "function": {"name", "arguments"}})."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise bad(f"message {i} has no 'role'")
        if m["role"] not in ROLES:
            raise bad(f"message {i} has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        m = dict(m)
        calls = [_tool_call(c, i, bad) for c in m.pop("tool_calls", None) or []]
        content = m.get("content")
        if m["role"] == "tool" and isinstance(content, (dict, list)):
            content = json.dumps(content, ensure_ascii=False)  # a tool's JSON result, as its text
        if content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise bad(f"message {i} ({m['role']}) has no string 'content'")
        if m["role"] == "assistant" and not content.strip() and not calls:
            raise bad(f"message {i}: empty assistant turn")
        m["content"] = content
        if calls:
            if m["role"] != "assistant":
                raise bad(f"message {i}: only assistant turns make tool calls")
            m["tool_calls"] = calls
        out.append(m)
    if not any(m["role"] == "assistant" for m in out):
        raise bad("no assistant turn")
    return out


def _tool_call(call: Any, i: int, bad: Any) -> dict[str, Any]:
    fn = call.get("function", call) if isinstance(call, dict) else None  # OpenAI's nesting, or flat
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise bad(f"message {i}: a tool call without a function name")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise bad(f"message {i}: tool call {fn['name']!r}: arguments do not parse as JSON ({e.msg})") from None
    if not isinstance(args, dict):
        raise bad(f"message {i}: tool call {fn['name']!r}: arguments are not a JSON object")
    return {"type": "function", "function": {"name": fn["name"], "arguments": args}}


# ----- templates -------------------------------------------------------------------------------------------

def add_chatml(tokenizer: Tokenizer, model: Llama) -> tuple[Tokenizer, Llama]:
    """Give a tokenizer without a chat template ChatML, and the model rows for its special tokens.

    <|im_start|> and <|im_end|> are added as special tokens where the vocabulary lacks them, the
    embeddings and LM head resized to cover them (new rows: the mean of the old ones, see
    `surgery.resize_vocab`), and <|im_end|> becomes the eos token of both, so generation stops at the
    end of an assistant turn (as TRL's `setup_chat_format` does). A tokenizer with a template is
    returned as it is.

    Args:
        tokenizer: the model's tokenizer (left unchanged).
        model: the model (left unchanged).

    Returns:
        (the tokenizer with ChatML, the model with rows for every token id).
    """
    if tokenizer.chat_template:
        return tokenizer, model
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    missing = [t for t in CHATML_TOKENS if backend.token_to_id(t) is None]
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
    chat = Tokenizer(backend, tokenizer.bos_token, CHATML_TOKENS[1], tokenizer.pad_token, tokenizer.unk_token,
                     CHATML_TEMPLATE, tokenizer.model_max_length)
    new_ids = [backend.token_to_id(t) for t in missing]
    if chat.vocab_size > model.config.vocab_size:
        model = resize_vocab(model, chat.vocab_size)
    else:  # a model padded beyond its tokenizer: the new ids land on padding rows, set them as new rows
        model = resize_vocab(model, model.config.vocab_size)  # a copy
        _mean_rows(model, new_ids, tokenizer.vocab_size)
    model.config.eos_token_id = chat.eos_id
    return chat, model


@torch.no_grad()
def _mean_rows(model: Llama, ids: list[int], n_real: int) -> None:
    """Set rows `ids` of the embedding and LM head to the mean of their first n_real rows."""
    for w in {id(m.weight): m.weight for m in (model.model.embed_tokens, model.lm_head)}.values():
        w[ids] = w[:n_real].mean(0)


def end_of_turn_id(tokenizer: Tokenizer, token: str | None = None) -> int:
    """The id of the token that ends an assistant turn: `token`, else <|im_end|>, else eos.

    Args:
        tokenizer: the tokenizer.
        token: the end-of-turn token's text (None: the default).
    """
    name = token or (CHATML_TOKENS[1] if tokenizer.token_to_id(CHATML_TOKENS[1]) is not None else tokenizer.eos_token)
    tid = tokenizer.token_to_id(name)
    if tid is None:
        raise TinylmError(f"the end-of-turn token {name!r} is not in the vocabulary; name it with end_of_turn")
    return tid


# Tool calls and tool lists for templates that do not render them, in the Hermes / Qwen2.5 format
# (NousResearch Hermes-Function-Calling; Qwen2.5's chat template): calls as JSON in <tool_call> tags.
TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
                  "</tools>\n\nFor each function call, return a json object with function name and arguments "
                  "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                  '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def format_tool_call(call: dict[str, Any]) -> str:
    """A normalised tool call as the text an assistant writes: <tool_call>\\n{"name", "arguments"}\\n</tool_call>.

    Args:
        call: {"type": "function", "function": {"name", "arguments"}}.
    """
    fn = call["function"]
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False) + \
        "\n</tool_call>"


_TOOL_CALL_TAGS = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """The calls an assistant wrote in <tool_call> tags (the inverse of `format_tool_call`) and the text
    around them; a tagged block that is not a JSON call {"name", "arguments": object} stays in the text.

    Args:
        text: the assistant's reply.

    Returns:
        (the text outside the calls, stripped; the calls as {"type": "function", "function": {"name",
        "arguments": dict}}).
    """
    calls, kept, start = [], [], 0
    for match in _TOOL_CALL_TAGS.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments", {}), dict)):
            continue
        calls.append({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments", {})}})
        kept.append(text[start:match.start()])
        start = match.end()
    kept.append(text[start:])
    return "".join(kept).strip(), calls


def generation_prompt(messages: list[dict[str, Any]], tokenizer: Tokenizer,
                      tools: list[dict[str, Any]] | None = None) -> str:
    """The text a model continues to answer a conversation: the chat template's rendering with the assistant
    header, tool calls and the tools list written into the text where the template ignores them (as in
    training, see `render`).

    Args:
        messages: normalised messages (tool calls as {"type", "function": {"name", "arguments": dict}}).
        tokenizer: a tokenizer with a chat template.
        tools: the functions the model may call (the chat `tools` format), or None.
    """
    folded, _ = _template_messages(Example(messages, tools or None), tokenizer)
    return tokenizer.apply_chat_template(folded, True, tools=tools if _template_renders(tokenizer, "tools") else None)


_PROBE_CALL = "tinylm_probe_function"


def _template_renders(tokenizer: Tokenizer, what: str) -> bool:
    """Whether the chat template writes tool calls (what="tool_calls") or a tools list (what="tools")."""
    key = (tokenizer.chat_template, what)
    if key not in _PROBES:
        fn = {"name": _PROBE_CALL, "description": "", "parameters": {"type": "object", "properties": {}}}
        user = {"role": "user", "content": "hi"}
        call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": _PROBE_CALL, "arguments": {}}}]}
        try:
            text = (tokenizer.apply_chat_template([user, call], False) if what == "tool_calls" else
                    tokenizer.apply_chat_template([user], False, tools=[{"type": "function", "function": fn}]))
        except TinylmError:  # a template that raises on them does not render them
            text = ""
        _PROBES[key] = _PROBE_CALL in text
    return _PROBES[key]


_PROBES: dict[tuple[str | None, str], bool] = {}


def _template_messages(example: Example, tokenizer: Tokenizer) -> tuple[list[dict[str, Any]], int]:
    """The messages to render, tool calls and tools folded into the text where the template ignores
    them, and the index of the first message that carries loss."""
    messages, train_from = [dict(m) for m in example.messages], example.train_from
    if not _template_renders(tokenizer, "tool_calls"):
        for m in messages:
            if m.get("tool_calls"):
                texts = [m["content"]] if m["content"] else []
                m["content"] = "\n".join(texts + [format_tool_call(c) for c in m.pop("tool_calls")])
    if example.tools and not _template_renders(tokenizer, "tools"):
        preamble = TOOLS_PREAMBLE.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in example.tools))
        if messages[0]["role"] == "system":
            messages[0]["content"] += "\n\n" + preamble
        else:
            messages.insert(0, {"role": "system", "content": preamble})
            train_from += 1
    return messages, train_from


# ----- rendering with loss masks ------------------------------------------------------------------------

@dataclass
class Rendered:
    """An example's token ids and its loss mask.

    Args:
        ids: the token ids.
        mask: per token, True when it is a target that carries loss (never the first token).
        where: file:line of the row.
    """

    ids: list[int]
    mask: list[bool]
    where: str = "an example"


def render(example: Example, tokenizer: Tokenizer, assistant_only: bool = True, end_of_turn: str | None = None,
           add_bos: bool = False) -> Rendered:
    """Token ids of an example and its exact loss mask.

    A conversation goes through the tokenizer's chat template; with `assistant_only` the mask is True
    exactly on each trained assistant turn's content and its end-of-turn token, and False on the
    system / user / tool turns, on the assistant header (`<|im_start|>assistant\\n`) and after the
    end-of-turn token. A plain prompt / completion is prompt + completion + eos, the mask on the
    completion and eos.

    Args:
        example: the example.
        tokenizer: the model's tokenizer (with a chat template for conversations: see `add_chatml`).
        assistant_only: False puts loss on every token.
        end_of_turn: the token ending an assistant turn (None: <|im_end|> if known, else eos).
        add_bos: start a plain prompt with the bos token.
    """
    try:
        if example.messages is None:
            pieces = [([tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []) +
                      tokenizer.encode(example.prompt or ""),
                      tokenizer.encode(example.completion or "", add_eos=True)]
            flags = [False, True]
        else:
            pieces, flags = _chat_pieces(example, tokenizer, end_of_turn_id(tokenizer, end_of_turn))
    except TinylmError as e:
        raise TinylmError(f"{example.where}: {e}") from None
    ids = [t for p in pieces for t in p]
    mask = [f or not assistant_only for p, f in zip(pieces, flags) for _ in p]
    if mask:
        mask[0] = False  # the first token is never a target
    return Rendered(ids, mask, example.where)


def _chat_pieces(example: Example, tokenizer: Tokenizer, eot: int) -> tuple[list[list[int]], list[bool]]:
    """The conversation's tokens in pieces that alternate between no loss and loss (an assistant turn
    up to and including its end-of-turn token).

    Each piece is the text between two boundaries, encoded alone: the boundaries are where the
    template's rendering of a message prefix ends (with the assistant header for the start of an
    assistant turn), so every piece is exact for the template, and a turn's tokens are the ones a
    model continuing the prompt `...<|im_start|>assistant\\n` is trained to write.
    """
    messages, train_from = _template_messages(example, tokenizer)
    tools = example.tools if _template_renders(tokenizer, "tools") else None
    whole = tokenizer.apply_chat_template(messages, False, tools=tools)
    cuts = [0]
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i >= train_from:
            cuts += [_prefix_end(tokenizer, messages[:i], True, tools, whole, cuts[-1]),
                     _prefix_end(tokenizer, messages[:i + 1], False, tools, whole, cuts[-1])]
    cuts.append(len(whole))
    texts = [whole[a:b] for a, b in zip(cuts, cuts[1:])]
    encoded = [tokenizer.backend.encode(t, add_special_tokens=False).ids for t in texts]
    pieces, flags = [], []
    for k, ids in enumerate(encoded):
        if k % 2 == 0:  # before, between and after the trained assistant turns
            pieces.append(ids)
            flags.append(False)
            continue
        if eot not in ids:
            raise TinylmError(f"an assistant turn of the chat template does not end with the end-of-turn token "
                              f"{tokenizer.decode([eot])!r}; name the template's one with end_of_turn")
        end = len(ids) - ids[::-1].index(eot)  # through the last end-of-turn token of the turn
        pieces += [ids[:end], ids[end:]]
        flags += [True, False]
    return pieces, flags


def _prefix_end(tokenizer: Tokenizer, messages: list[dict[str, Any]], generation: bool,
                tools: list[dict[str, Any]] | None, whole: str, after: int) -> int:
    """Where the rendering of `messages` ends inside `whole`, the rendering of the conversation."""
    text = tokenizer.apply_chat_template(messages, generation, tools=tools) if messages or generation else ""
    if not whole.startswith(text) or len(text) < after:
        what = "with the assistant header " if generation else ""
        raise TinylmError(f"the chat template renders the first {len(messages)} messages {what}differently from "
                          f"the start of the whole conversation, so loss masks cannot be derived from it")
    return len(text)


# ----- packing into rows ------------------------------------------------------------------------------

@dataclass
class Packed:
    """Rendered examples in rows of seq_len + 1 tokens, none split across rows.

    Args:
        tokens: (R, seq_len + 1) token ids, padding after the examples.
        loss: (R, seq_len + 1) the rendered masks: True where a token is a target that carries loss.
        segments: (R, seq_len + 1) each token's example number within its row (0, 1, ...), -1 on padding.
        places: per input example, (row, first position, length), or None when it was dropped.
        truncated: examples cut to seq_len + 1 tokens.
        dropped: examples left out because truncation left no token with loss.
    """

    tokens: torch.Tensor
    loss: torch.Tensor
    segments: torch.Tensor
    places: list[tuple[int, int, int] | None]
    truncated: int = 0
    dropped: int = 0
    _perms: dict[tuple[int, int], np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def n_rows(self) -> int:
        return len(self.tokens)

    def rows(self, idx: torch.Tensor | list[int], index: int = 0) -> Batch:
        """The Batch of rows `idx`: mask (B, T) True where a target carries loss and belongs to the same
        example as its input (never across an example boundary), segments (B, T + 1): the model's
        attention and positions follow them (`Llama.forward(segments=...)`).

        Args:
            idx: row numbers.
            index: the Batch's index in the run.
        """
        idx = torch.as_tensor(idx, dtype=torch.long)
        seg = self.segments[idx]  # (B, T + 1)
        mask = self.loss[idx, 1:]  # (B, T); Batch drops the targets across examples and on padding
        return Batch(self.tokens[idx], index=index, mask=mask, segments=seg)

    def batches(self, seed: int, global_batch: int) -> BatchSource:
        """The training loop's batch source: epochs over the rows, each in a shuffled order.

        Global row g of the run (step * global_batch + i) is row perm_e[g mod R] of epoch e = g // R,
        perm_e a permutation drawn from (seed, e), so a step's batch depends only on (seed, step) and
        a resumed run reads the rows it would have read.

        Args:
            seed: data order seed.
            global_batch: rows per optimizer step over all ranks and micro-steps.
        """
        def source(step: int, start: int, count: int) -> Batch:
            g = step * global_batch + start + np.arange(count, dtype=np.int64)
            idx = [int(self._perm(seed, int(e))[r]) for e, r in zip(g // self.n_rows, g % self.n_rows)]
            return self.rows(idx, index=step * global_batch + start)

        return source

    def _perm(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[key] = np.random.default_rng([seed, epoch]).permutation(self.n_rows)
        return self._perms[key]


def pack(examples: list[Rendered], seq_len: int, packing: str = "fit", too_long: str = "refuse",
         pad_id: int = 0) -> Packed:
    """Put rendered examples into rows of seq_len + 1 tokens, each example whole inside one row.

    Packing is deterministic (no randomness; the batch source shuffles rows):
    "fit" is best-fit decreasing, examples longest first (ties in data order), each into the row
    with the least room that holds it (the most recently filled of those), else a new row;
    "order" fills rows in data order, starting a new row when the next example does not fit;
    "none" puts one example per row.

    Args:
        examples: from `render`.
        seq_len: tokens per input row (a row holds seq_len + 1 tokens).
        packing: "fit", "order" or "none".
        too_long: "refuse" an example longer than seq_len + 1 tokens (one line with the count), or
            "truncate" it to its first seq_len + 1 tokens (counted in Packed.truncated).
        pad_id: the id written after the examples (it carries no loss).
    """
    cap = seq_len + 1
    long = [len(r.ids) for r in examples if len(r.ids) > cap]
    if long and too_long != "truncate":
        raise TinylmError(f"{len(long)} of {len(examples)} examples are longer than the context ({cap} tokens with "
                          f"seq_len {seq_len}; the longest has {max(long)}): raise seq_len or truncate them")
    kept = [(i, min(len(r.ids), cap)) for i, r in enumerate(examples) if any(r.mask[:cap])]
    if not kept:
        raise TinylmError("no example has a token that carries loss within the context")
    assign = _assign_rows(kept, cap, packing)
    n_rows = max(assign.values()) + 1
    tokens = np.full((n_rows, cap), pad_id, dtype=np.int64)
    loss = np.zeros((n_rows, cap), dtype=bool)
    segments = np.full((n_rows, cap), -1, dtype=np.int64)
    fill, count = [0] * n_rows, [0] * n_rows
    places: list[tuple[int, int, int] | None] = [None] * len(examples)
    for i, n in kept:  # data order within a row
        row, start = assign[i], fill[assign[i]]
        tokens[row, start:start + n] = examples[i].ids[:n]
        loss[row, start:start + n] = examples[i].mask[:n]
        segments[row, start:start + n] = count[row]
        places[i] = (row, start, n)
        fill[row], count[row] = start + n, count[row] + 1
    return Packed(torch.from_numpy(tokens), torch.from_numpy(loss), torch.from_numpy(segments), places, truncated=len(long), dropped=len(examples) - len(kept))


def _assign_rows(kept: list[tuple[int, int]], cap: int, packing: str) -> dict[int, int]:
    """Example index -> row number, for examples (index, length) with lengths <= cap."""
    if packing == "none":
        return {i: r for r, (i, _) in enumerate(kept)}
    if packing == "order":
        assign, row, room = {}, -1, 0
        for i, n in kept:
            if n > room:
                row, room = row + 1, cap
            assign[i], room = row, room - n
        return assign
    if packing != "fit":
        raise TinylmError(f"packing {packing!r} is unknown (known: fit, order, none)")
    by_room: list[list[int]] = [[] for _ in range(cap + 1)]  # rows with exactly r free tokens
    counts = np.zeros(cap + 1, dtype=np.int64)
    assign, n_rows = {}, 0
    for i, n in sorted(kept, key=lambda x: (-x[1], x[0])):
        fits = np.flatnonzero(counts[n:])
        if fits.size:
            room = n + int(fits[0])
            row = by_room[room].pop()
            counts[room] -= 1
        else:
            room, row, n_rows = cap, n_rows, n_rows + 1
        assign[i] = row
        by_room[room - n].append(row)
        counts[room - n] += 1
    return assign
