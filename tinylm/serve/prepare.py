"""From an OpenAI request to engine work: prompts, one engine request per sample, constraints, and limits.

Chat messages go through the model's chat template (`data.chat.generation_prompt`: tools and tool calls are
written into the text where the template ignores them, Hermes-style, as tinylm's fine-tuning renders them).
A reply's tool calls are read back from <tool_call> tags, or from a bare JSON call naming one of the tools
(what tinylm's function-calling task teaches). With tool_choice "required" or a named function the reply
is constrained to one call of those tools (`function_calling.call_schema`), as `tinylm data check
--constrained` does; `response_format` json_schema / json_object constrain it to the schema.

Lengths, never truncated: a prompt that does not fit the model's context is a 400. An explicit max_tokens
that takes prompt + max_tokens beyond the context is a 400, as OpenAI does; without one, a chat reply may
take the rest of the context and a completion OpenAI's default of 16 tokens, clamped to the rest.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Literal

from tinylm.core.errors import TinylmError
from tinylm.data.chat import end_of_turn_id, generation_prompt, parse_tool_calls
from tinylm.data.tasks import function_calling
from tinylm.data.tokenizer import Tokenizer
from tinylm.infer.constrained import (
    JsonConstraint,
    JsonIndex,
    check_satisfiable,
    check_schema,
    check_supported,
)
from tinylm.infer.engine import Request
from tinylm.infer.sampling import SamplingConfig
from tinylm.serve.protocol import ApiError, ChatRequest, CompletionRequest, ToolChoice

COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
SCHEMA_CACHE = 16  # compiled JSON schemas kept (building one for a 49k vocabulary takes seconds)


@dataclass
class Job:
    """A request turned into engine work.

    Args:
        kind: "chat" or "completion".
        body: the checked request.
        prompts: the ids of each prompt (a chat has one).
        prompt_texts: each prompt's text (what `echo` shows).
        samples: the engine requests, n per prompt in the order of the choices (choice i answers prompt i // n);
            empty when a completion asks for no new tokens (echo only).
        n: samples per prompt.
        top_logprobs: None without log-probabilities; else how many of the most likely tokens to show per token.
        tools: the tools offered (their calls are parsed from the reply), or None.
    """

    kind: Literal["chat", "completion"]
    body: Any
    prompts: list[list[int]]
    prompt_texts: list[str]
    samples: list[Request]
    n: int
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None

    @property
    def echo(self) -> bool:
        return self.kind == "completion" and bool(self.body.echo)


class Preparer:
    """Turns requests for one model into Jobs; keeps the compiled JSON schemas of recent requests.

    Args:
        name: the model id requests must name.
        tokenizer: the model's tokenizer.
        context: the model's context length.
        vocab_size: the model's number of logits.
        max_samples: the most samples one request may ask for (the server's whole capacity).
    """

    def __init__(self, name: str, tokenizer: Tokenizer, context: int, vocab_size: int, max_samples: int) -> None:
        self.name, self.tokenizer, self.context, self.vocab_size = name, tokenizer, context, vocab_size
        self.max_samples = max_samples
        self.indexes: OrderedDict[str, asyncio.Future] = OrderedDict()

    async def chat(self, body: ChatRequest) -> Job:
        """The Job of a /v1/chat/completions request, or an ApiError."""
        self._check(body, 1)
        if not self.tokenizer.chat_template:
            raise ApiError(400, f"The model '{self.name}' has no chat template; use /v1/completions.", "messages")
        tools, forced = _tools(body)
        schema = forced or _response_schema(body)
        if forced and body.response_format is not None and body.response_format.type != "text":
            raise ApiError(400, "response_format cannot be combined with a required tool call.", "response_format")
        text = generation_prompt(_messages(body), self.tokenizer, tools)
        ids = self.tokenizer.encode(text)
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = self._budget(len(ids), asked, None, "messages")
        stop_ids = sorted({end_of_turn_id(self.tokenizer)} | ({self.tokenizer.eos_id} - {None}))
        make = await self._constraint(schema, max_tokens) if schema is not None else None
        top = (body.top_logprobs or 0) if body.logprobs else None
        return Job("chat", body, [ids], [text], self._samples(body, ids, max_tokens, stop_ids, top, make), body.n,
                   top, tools)

    async def completion(self, body: CompletionRequest) -> Job:
        """The Job of a /v1/completions request, or an ApiError."""
        self._check(body, 1)
        if body.suffix:
            raise ApiError(400, "suffix is not supported.", "suffix")
        prompts, texts = self._prompts(body.prompt)
        self._check(body, len(prompts))
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens must be at least 1 (0 only with echo, to score the prompt).", "max_tokens")
        samples = []
        for ids in prompts:
            max_tokens = self._budget(len(ids), body.max_tokens, COMPLETION_DEFAULT_TOKENS, "prompt")
            if max_tokens:
                samples += self._samples(body, ids, max_tokens, None, body.logprobs, None)
        return Job("completion", body, prompts, texts, samples, body.n, body.logprobs)

    # ----- checks -----

    def _check(self, body: Any, n_prompts: int) -> None:
        """The model's name, the parameters tinylm does not implement, and the number of samples."""
        if body.model != self.name:
            raise ApiError(404, f"The model '{body.model}' does not exist; this server has '{self.name}'.", "model",
                           "model_not_found")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(body, name):
                raise ApiError(400, f"{name} is not supported (use repetition_penalty).", name)
        if body.logit_bias:
            raise ApiError(400, "logit_bias is not supported.", "logit_bias")
        if body.n * n_prompts > self.max_samples:
            raise ApiError(400, f"This request asks for {body.n * n_prompts} samples, more than this server holds "
                           f"({self.max_samples}).", "n")

    def _budget(self, n_prompt: int, asked: int | None, default: int | None, where: str) -> int:
        """The new tokens a prompt of n_prompt tokens gets: refused when it does not fit, never truncated."""
        if n_prompt >= self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                           f"{where} resulted in {n_prompt} tokens. Please reduce the length of the {where}.",
                           where, "context_length_exceeded")
        room = self.context - n_prompt
        if asked is None:
            return min(default or room, room)
        if asked > room:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                           f"requested {n_prompt + asked} tokens ({n_prompt} in the {where}, {asked} in the "
                           f"completion). Please reduce the length of the {where} or completion.", "max_tokens",
                           "context_length_exceeded")
        return asked

    def _prompts(self, prompt: Any) -> tuple[list[list[int]], list[str]]:
        """Every prompt of a completions request (text, texts, ids or lists of ids) as ids, and as text."""
        items = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
        if not items:
            raise ApiError(400, "The prompt is empty.", "prompt")
        ids, texts = [], []
        for k, item in enumerate(items):
            x = self.tokenizer.encode(item) if isinstance(item, str) else list(item)
            if not x:
                raise ApiError(400, f"Prompt {k} is empty.", "prompt")
            if min(x) < 0 or max(x) >= self.vocab_size:
                raise ApiError(400, f"Prompt {k} has a token id outside the vocabulary [0, {self.vocab_size}).",
                               "prompt")
            ids.append(x)
            texts.append(item if isinstance(item, str) else self.tokenizer.decode(x))
        return ids, texts

    # ----- samples and constraints -----

    def _samples(self, body: Any, ids: list[int], max_tokens: int, stop_ids: list[int] | None, top: int | None,
                 make: Callable[[], Any] | None) -> list[Request]:
        """n engine requests for one prompt; sample j of a seeded request is seeded with seed + j."""
        stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
        if stop and make is not None:
            raise ApiError(400, "stop cannot be combined with a JSON constraint: a stop string would cut the JSON "
                           "short.", "stop")
        out = []
        for j in range(body.n):
            try:
                sampling = SamplingConfig(1.0 if body.temperature is None else body.temperature, body.top_k or None,
                                          body.top_p if body.top_p is not None and body.top_p < 1 else None,
                                          body.repetition_penalty or 1.0,
                                          None if body.seed is None else (body.seed + j) % 2**63)
            except TinylmError as e:
                raise ApiError(400, str(e)) from None
            out.append(Request(ids, max_tokens, sampling, stop, stop_ids, make() if make else None, top or 0))
        return out

    async def _constraint(self, schema: Any, max_tokens: int) -> Callable[[], Any]:
        """A factory of per-sample constraints to `schema`; the compiled schema is shared by concurrent and
        later requests, and built in a thread so the server goes on meanwhile."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self.indexes:
            self.indexes[key] = asyncio.ensure_future(asyncio.to_thread(self._compile, schema))
            while len(self.indexes) > SCHEMA_CACHE:
                self.indexes.popitem(last=False)
        self.indexes.move_to_end(key)
        try:
            index = await asyncio.shield(self.indexes[key])
        except TinylmError as e:
            self.indexes.pop(key, None)
            raise ApiError(400, f"Invalid schema: {e}", "response_format", "invalid_schema") from None
        if max_tokens < index.min_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is too small for this schema: its shortest valid value "
                           f"takes {index.min_tokens} tokens.", "max_tokens")
        return lambda: JsonConstraint(index)

    def _compile(self, schema: Any) -> Any:
        check_schema(schema)
        check_satisfiable(schema)
        check_supported(schema)
        return JsonIndex(schema, self.tokenizer, self.vocab_size)


def _messages(body: ChatRequest) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: text content, developer as system, tool calls with their
    arguments parsed."""
    out = []
    for i, m in enumerate(body.messages):
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise ApiError(400, "Only text content parts are supported.", f"messages.{i}.content")
            content = "\n".join(part.text for part in content)
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.tool_calls:
            if m.role != "assistant":
                raise ApiError(400, "Only assistant messages have tool_calls.", f"messages.{i}.tool_calls")
            message["tool_calls"] = [{"type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments, f"messages.{i}.tool_calls.{j}")}}
                for j, c in enumerate(m.tool_calls)]
        elif m.role == "assistant" and not message["content"]:
            raise ApiError(400, "An assistant message needs content or tool_calls.", f"messages.{i}.content")
        for key in ("tool_call_id", "name"):
            if getattr(m, key):
                message[key] = getattr(m, key)
        out.append(message)
    return out


def _arguments(arguments: str | dict[str, Any], where: str) -> dict[str, Any]:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            raise ApiError(400, f"The arguments of a tool call are not JSON ({e.msg}).", f"{where}.function.arguments") \
                from None
    if not isinstance(arguments, dict):
        raise ApiError(400, "The arguments of a tool call must be a JSON object.", f"{where}.function.arguments")
    return arguments


def _tools(body: ChatRequest) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    """(the tools to show the model, or None; the JSON schema a required call is constrained to, or None)."""
    choice = body.tool_choice or ("auto" if body.tools else "none")
    if not body.tools:
        if choice != "none" and choice != "auto":
            raise ApiError(400, "tool_choice needs tools.", "tool_choice")
        return None, None
    tools = [{"type": "function", "function": {
        "name": t.function.name, "description": t.function.description or "",
        "parameters": t.function.parameters or {"type": "object", "properties": {}}}} for t in body.tools]
    if choice == "none":
        return None, None
    if isinstance(choice, ToolChoice):
        chosen = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not chosen:
            raise ApiError(400, f"tool_choice names '{choice.function.name}', which is not among the tools.",
                           "tool_choice")
        return tools, function_calling.call_schema(chosen)
    return tools, function_calling.call_schema(tools) if choice == "required" else None


def _response_schema(body: ChatRequest) -> dict[str, Any] | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise ApiError(400, "response_format json_schema needs json_schema.schema.", "response_format.json_schema")
    return fmt.json_schema.json_schema


def reply_calls(text: str, tools: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """The tool calls in a reply and the text around them: calls in <tool_call> tags, else a reply that is
    only a JSON call (or list of calls) of the offered tools.

    Args:
        text: the reply.
        tools: the tools offered.

    Returns:
        (the rest of the text; calls as {"name", "arguments": dict}).
    """
    rest, tagged = parse_tool_calls(text)
    if tagged:
        return rest, [c["function"] for c in tagged]
    names = {t["function"]["name"] for t in tools}
    bare = function_calling.parse_calls(text)
    if bare and all(c["name"] in names for c in bare):
        return "", bare
    return text, []
