"""The OpenAI API's shapes: request bodies (checked with pydantic), error bodies, and the pieces of responses.

The request models follow OpenAI's API reference for /v1/chat/completions and /v1/completions; fields
tinylm does not use (user, metadata, store, parallel_tool_calls, ...) are accepted and ignored, as vLLM
does, and two of vLLM's extensions are read: `top_k` and `repetition_penalty`. An error is OpenAI's body,
{"error": {"message", "type", "param", "code"}}, with a 4xx status for what the client got wrong.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tinylm.data.tokenizer import Tokenizer, bytes_to_unicode

MAX_SEED = 2**63  # torch.Generator.manual_seed takes seeds below it (as core.recipe.Seed)


class ApiError(Exception):
    """A request the server refuses, as OpenAI words it.

    Args:
        status: the HTTP status (400 bad request, 404 unknown model, 413 body too large, 429 busy, 500).
        message: one line for the client.
        param: the request field at fault, if one is.
        code: OpenAI's machine-readable code (context_length_exceeded, model_not_found, ...).
        type: OpenAI's error type (invalid_request_error by default).
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ----- request bodies -----------------------------------------------------------------------------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class Function(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Body):
    type: Literal["function"]
    function: Function


class NamedFunction(_Body):
    name: str


class ToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Body):
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")  # `schema` is a BaseModel attribute


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)  # None: OpenAI's default, 1
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # vLLM's extension
    repetition_penalty: float | None = Field(None, gt=0)  # vLLM's extension
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=MAX_SEED)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None  # refused unless 0 (not implemented)
    frequency_penalty: float | None = None  # refused unless 0 (not implemented)
    logit_bias: dict[str, float] | None = None  # refused unless empty (not implemented)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None  # refused (no fill-in-the-middle)


def parse_body(raw: bytes, model: type[_Body]) -> Any:
    """The request body as `model`, or an ApiError 400 naming the first field at fault.

    Args:
        raw: the body's bytes.
        model: ChatRequest or CompletionRequest.
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"We could not parse the JSON body of your request: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _invalid(e.errors()[0]) from None


def _invalid(error: Any) -> ApiError:
    """OpenAI's 400 for pydantic's first error; inside a union, the field is named, not the branch tried."""
    loc = list(error["loc"])
    branch = next((i for i, part in enumerate(loc) if _is_union_branch(part)), None)
    param = ".".join(str(part) for part in loc[:branch]) or None
    if error["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    why = "it is none of the accepted types" if branch is not None else error["msg"]
    return ApiError(400, f"Invalid value for '{param}': {why}.", param, "invalid_value")


def _is_union_branch(part: Any) -> bool:
    # pydantic names the branch of a union it tried ("str", "list[int]", "ToolChoice"); fields are snake_case
    return isinstance(part, str) and (part[:1].isupper() or "[" in part or part in ("str", "int", "float", "bool"))


# ----- response pieces ----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` for the string)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


class TokenText:
    """Each token's bytes and text for log-probabilities: a byte-level BPE symbol mapped back through GPT-2's
    byte table (so a token holding half a UTF-8 character keeps its exact bytes), a special token its text.

    Args:
        tokenizer: the model's tokenizer.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_of = {ch: b for b, ch in enumerate(bytes_to_unicode())}
        self.special = set(tokenizer.backend.get_added_tokens_decoder())
        self.cache: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        if token not in self.cache:
            symbol = self.tokenizer.backend.id_to_token(token)
            if symbol is not None and token not in self.special and all(ch in self.byte_of for ch in symbol):
                self.cache[token] = bytes(self.byte_of[ch] for ch in symbol)
            else:
                self.cache[token] = self.tokenizer.decode([token]).encode()
        return self.cache[token]

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")

    def chat_entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
        """One token of a chat reply's `logprobs.content`, with its `top_logprobs`."""
        return {**self._plain(token, logprob), "top_logprobs": [self._plain(t, lp) for t, lp in top]}

    def _plain(self, token: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text(token), "logprob": logprob, "bytes": list(self.bytes(token))}

    def completion_logprobs(self, tokens: list[int], logprobs: list[float | None],
                            tops: list[list[tuple[int, float]] | None], offset: int) -> dict[str, Any]:
        """The legacy completions `logprobs` object: tokens, their log-probabilities, a {token: logprob} dict
        of the most likely ones per position (the chosen token included, as OpenAI does), and each token's
        character offset in the choice's text (starting at `offset`). A None entry (the first prompt
        token, which nothing predicts) stays None."""
        texts = [self.text(t) for t in tokens]
        starts = list(itertools.accumulate((len(s) for s in texts[:-1]), initial=offset))[:len(texts)]
        top_dicts: list[dict[str, float] | None] = []
        for token, lp, top in zip(tokens, logprobs, tops):
            top_dicts.append(None if lp is None or top is None else
                             {**{self.text(t): v for t, v in top}, self.text(token): lp})
        return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": top_dicts, "text_offset": starts}
