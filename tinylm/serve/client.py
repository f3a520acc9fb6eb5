"""A teacher or judge to ask: a local model through the engine (infer.teacher), or any OpenAI-compatible endpoint.

`open_teacher(SOURCE_or_URL)` gives either one behind the same call, `answer(asks) -> texts`: a list of chat
questions (`infer.teacher.Ask`: messages, token limit, temperature, seed, optional JSON schema) answered in
order. An endpoint gets them as concurrent POST /chat/completions requests (a server such as `tinylm serve`,
llama-server or vLLM batches them), with the schema as `response_format`.

An endpoint is checked when it is opened (GET /models must answer and list the model); `serve.router`'s URL
fallback is opened by the same check. Every failure of an endpoint (no answer, an HTTP error, a reply that is
not an OpenAI chat completion) is a one-line TinylmError naming the flag and URL.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from tinylm.core.errors import TinylmError, optional_import
from tinylm.infer.teacher import Ask, LocalTeacher

CONNECT_SECONDS, READ_SECONDS = 10.0, 600.0  # a long answer of a big model under load takes minutes


def one_line(e: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none)."""
    return " ".join((str(e) or type(e).__name__).split())


def _listed(ids: list[str]) -> str:
    return f"{', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}"


def check_endpoint(url: str, model: str | None, key_env: str, flag: str) -> tuple[str, str, dict[str, str]]:
    """Check an OpenAI-compatible URL before any work: GET /models must answer and list `model` (or list one
    model only, when `model` is None). Returns (model id, base URL ending in "/", request headers).

    Args:
        url: its base URL (http://host:port/v1).
        model: the model id to ask for, or None.
        key_env: the environment variable that holds its API key (unset or empty: no key is sent).
        flag: the option that named the URL ("--teacher"); `{flag}-model` and `{flag}-key-env` are its
            companions in the messages.
    """
    httpx2 = optional_import("httpx2", "serve", f"{flag} URL")
    key = os.environ.get(key_env, "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    base = url.rstrip("/")
    try:
        reply = httpx2.get(f"{base}/models", headers=headers, timeout=CONNECT_SECONDS)
    except httpx2.HTTPError as e:
        raise TinylmError(f"{flag} {url}: cannot reach it: {one_line(e)}") from None
    if reply.status_code != 200:
        hint = f" (is ${key_env} the right key? {flag}-key-env names another)" if reply.status_code in (401, 403) \
            else ""
        raise TinylmError(f"{flag} {url}: GET /models answered {reply.status_code}{hint}")
    try:
        ids = [m["id"] for m in reply.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise TinylmError(f"{flag} {url}: /models is not an OpenAI model list") from None
    if model is None and len(ids) != 1:
        raise TinylmError(f"{flag} {url} serves {len(ids)} models ({_listed(ids)}): name one with {flag}-model")
    if model is not None and model not in ids:
        raise TinylmError(f"{flag} {url} does not serve {flag}-model {model!r} (it lists {_listed(ids)})")
    return model or ids[0], base + "/", headers


class Endpoint:
    """A model behind an OpenAI-compatible URL, asked with concurrent chat completions.

    Args:
        name: the model id.
        base_url: up to /v1/.
        headers: sent with every request (an API key).
        flag: the option that named it, for messages.
        workers: requests in flight at once.
    """

    def __init__(self, name: str, base_url: str, headers: dict[str, str], flag: str, workers: int = 8) -> None:
        self.name, self.base_url, self.headers, self.flag, self.workers = name, base_url, headers, flag, workers

    def answer(self, asks: Sequence[Ask], on_done: Callable[[], object] | None = None) -> list[str]:
        """The answers to `asks`, in order; the first failure is a one-line TinylmError (the rest are dropped).

        Args:
            asks: the questions.
            on_done: called after each answer arrives.
        """
        httpx2 = optional_import("httpx2", "serve", f"{self.flag} URL")
        timeout = httpx2.Timeout(READ_SECONDS, connect=CONNECT_SECONDS)
        with httpx2.Client(base_url=self.base_url, headers=self.headers, timeout=timeout) as client, \
                ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(self._one, client, ask, on_done) for ask in asks]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def check(self, asks: Sequence[Ask]) -> None:
        """Nothing to check here: the server checks its own context (an error is its 400 reply)."""

    def _one(self, client: Any, ask: Ask, on_done: Callable[[], object] | None) -> str:
        body: dict[str, Any] = {"model": self.name, "messages": ask.messages, "max_tokens": ask.max_tokens,
                                "temperature": ask.temperature}
        if ask.seed is not None:
            body["seed"] = ask.seed
        if ask.schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": ask.schema, "strict": True}}
        where = f"{self.flag} {self.base_url.rstrip('/')}"
        try:
            reply = client.post("chat/completions", json=body)
        except Exception as e:  # httpx2.HTTPError and its transport's errors
            raise TinylmError(f"{where} did not answer: {one_line(e)}") from None
        if reply.status_code != 200:
            raise TinylmError(f"{where} answered {reply.status_code}: {_error_text(reply)}")
        try:
            text = reply.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            raise TinylmError(f"{where}: malformed response, not an OpenAI chat completion: {reply.text[:200]!r}")
        if on_done is not None:
            on_done()
        return text


def _error_text(reply: Any) -> str:
    """An error reply's message (OpenAI's {"error": {"message"}} or the start of its body), on one line."""
    try:
        message = reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = reply.text[:200]
    return " ".join(str(message).split())


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def open_teacher(source: str, flag: str, model: str | None = None, key_env: str = "OPENAI_API_KEY",
                 max_batch: int = 16, device: Any = "cpu") -> Endpoint | LocalTeacher:
    """A teacher or judge from a model source or an OpenAI-compatible URL, checked before any work.

    Args:
        source: a checkpoint dir, HF dir, .gguf file or alias, or http(s)://host:port/v1.
        flag: the option that named it ("--teacher", "--judge"), for messages.
        model: with a URL, the model id (None: $TINYLM_<FLAG>_MODEL, else the URL's only model).
        key_env: with a URL, the environment variable holding the API key.
        max_batch: a local model's questions decoded together; an endpoint's requests in flight.
        device: where a local model runs.
    """
    if is_url(source):
        model = model or os.environ.get(f"TINYLM_{flag.strip('-').upper()}_MODEL") or None
        return Endpoint(*check_endpoint(source, model, key_env, flag), flag=flag, workers=max_batch)
    if model is not None:
        raise TinylmError(f"{flag}-model names a model at a {flag} URL; {source} is not one")
    from tinylm.formats.checkpoint import load

    return LocalTeacher(load(source, device=device), source, max_batch)
