"""`tinylm serve`: an OpenAI-compatible HTTP server over one model (tinylm.serve), on uvicorn; with --fallback,
a small model that hands the requests it is unsure of to a bigger one (tinylm.serve.router)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any

from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError, optional_import
from tinylm.core.recipe import Check, Count, Interval, one_of
from tinylm.formats.checkpoint import load
from tinylm.infer.engine import EngineConfig
from tinylm.serve.routing import SIGNALS, read_route

NEEDS = ("fastapi", "uvicorn", "prometheus_client")  # the `serve` extra
ROUTE_NEEDS = ("httpx2", "jsonschema")  # the `serve` extra, for --fallback


@dataclass
class ServeConfig:
    """What `tinylm serve` serves, where, and how much at once."""

    source: str  # checkpoint dir, HF Llama dir, .gguf file or alias (smollm2-135m)
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: every interface)
    port: Annotated[int, Check(ge=0, le=65535)] = 8000  # TCP port (0: any free one, printed at start)
    name: str | None = None  # the model id clients send and /v1/models lists (none: SOURCE as given)
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N or mps
    max_concurrent: Count = 16  # samples decoded together (the engine's batch); more wait in its queue
    max_queue: Interval = 64  # samples that may wait beyond them; a request that would exceed both gets 429
    max_body_bytes: Count = 1_000_000  # largest request body in bytes (413 beyond)
    # KV-cache positions of all samples together, which bounds its memory: a sample reserves prompt + max_tokens
    # when it starts and waits until they are free (none: max_concurrent whole contexts)
    kv_tokens: Count | None = None
    prefix_cache: bool = True  # compute a prompt prefix seen before once (a shared system prompt)
    log_level: one_of("critical", "error", "warning", "info", "debug") = "info"  # uvicorn's (info: a line per request)
    # routing: the model that answers the requests SOURCE is unsure of: a model source (served in-process), or an
    # OpenAI-compatible URL (http://host:port/v1)
    fallback: str | None = None
    fallback_model: str | None = None  # the fallback's model id (none: a URL's only model, or --fallback as given)
    fallback_key_env: str = "OPENAI_API_KEY"  # environment variable holding a URL fallback's API key (unset: none)
    route_threshold: float | None = None  # send a request to the fallback when SOURCE's signal is below this
    route_signal: one_of(*SIGNALS) = "mean_logprob"  # with --route-threshold: mean_logprob, min_logprob, neg_entropy
    route_config: str | None = None  # or: the signal and threshold of a route.json from `tinylm route calibrate`


def main(cfg: ServeConfig) -> None:
    """`tinylm serve`: load the model, listen, and answer until Ctrl-C or SIGTERM.

    Args:
        cfg: the command's config.
    """
    for module in NEEDS + (ROUTE_NEEDS if cfg.fallback else ()):
        optional_import(module, "serve", "tinylm serve")
    import uvicorn

    from tinylm.serve.app import listen

    app = build_app(cfg, resolve_device(cfg.device))
    sock = listen(cfg.host, cfg.port)
    try:
        host, port = sock.getsockname()[:2]
        print(f"tinylm: serving {app.state.server.model.name} at http://{host}:{port}/v1 (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        router = app.state.server.router
        if router is not None:
            print(f"tinylm: routing to {router.fallback.name} when {router.signal_name} < {router.threshold:g} or a "
                  "requested JSON schema or tool call fails", file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()


def build_app(cfg: ServeConfig, device: Any = "cpu") -> Any:
    """The FastAPI app serving `cfg.source` (its engine thread starts with the app's lifespan), routing to
    `cfg.fallback` when one is given.

    Args:
        cfg: what to serve and the limits.
        device: where the model runs.
    """
    from tinylm.serve.app import Limits, create_app
    from tinylm.serve.metrics import Metrics

    rule = _route_rule(cfg)
    if rule is not None:
        from tinylm.serve.router import Router, local_fallback, remote_fallback
    url = rule is not None and cfg.fallback.startswith(("http://", "https://"))
    # a URL is checked before any model loads
    fallback = remote_fallback(cfg.fallback, cfg.fallback_model, cfg.fallback_key_env) if url else None
    metrics = Metrics()
    model = _local_model(cfg, cfg.source, cfg.name or cfg.source, device, metrics)
    limits = Limits(cfg.max_concurrent, cfg.max_queue, cfg.max_body_bytes)
    app = create_app(model, limits, metrics)
    if rule is not None:
        name = cfg.fallback_model or cfg.fallback
        fallback = fallback or local_fallback(_local_model(cfg, cfg.fallback, name, device, Metrics()), limits)
        Router(model, fallback, *rule, metrics).install(app.state.server)
    return app


def _local_model(cfg: ServeConfig, source: str, name: str, device: Any, metrics: Any) -> Any:
    """A loaded model and its engine, sized by cfg's batch and KV-cache limits."""
    from tinylm.serve.worker import LocalModel

    loaded = load(source, device=device)
    context = loaded.config.max_seq_len
    kv_tokens = cfg.kv_tokens or cfg.max_concurrent * (context + EngineConfig.block_size)
    if kv_tokens < context:
        raise TinylmError(f"--kv-tokens {kv_tokens} is less than the context of {source} ({context} tokens): a "
                          "long request could never run")
    engine = EngineConfig(max_batch=cfg.max_concurrent, kv_tokens=kv_tokens, prefix_cache=cfg.prefix_cache)
    return LocalModel(loaded, name, engine, metrics)


def _route_rule(cfg: ServeConfig) -> tuple[str, float] | None:
    """(signal, threshold) of the routing flags, or None without --fallback; a one-line error when they
    disagree."""
    if cfg.fallback is None:
        if cfg.route_threshold is not None or cfg.route_config is not None or cfg.fallback_model is not None:
            raise TinylmError("--route-threshold, --route-config and --fallback-model need --fallback")
        return None
    if (cfg.route_threshold is None) == (cfg.route_config is None):
        raise TinylmError("--fallback needs one of --route-threshold T or --route-config FILE (written by "
                          "`tinylm route calibrate`)")
    return (cfg.route_signal, cfg.route_threshold) if cfg.route_config is None else read_route(cfg.route_config)
