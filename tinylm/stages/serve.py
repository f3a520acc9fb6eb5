"""`tinylm serve`: an OpenAI-compatible HTTP server over one model (tinylm.serve), on uvicorn."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Annotated, Any

from tinylm.core.devices import resolve_device
from tinylm.core.errors import TinylmError, optional_import
from tinylm.core.recipe import Check, Count, Interval, one_of
from tinylm.formats.checkpoint import load
from tinylm.infer.engine import EngineConfig

NEEDS = ("fastapi", "uvicorn", "prometheus_client")  # the `serve` extra


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


def main(cfg: ServeConfig) -> None:
    """`tinylm serve`: load the model, listen, and answer until Ctrl-C or SIGTERM.

    Args:
        cfg: the command's config.
    """
    for module in NEEDS:
        optional_import(module, "serve", "tinylm serve")
    import uvicorn

    from tinylm.serve.app import listen

    app = build_app(cfg, resolve_device(cfg.device))
    sock = listen(cfg.host, cfg.port)
    try:
        host, port = sock.getsockname()[:2]
        print(f"tinylm: serving {app.state.server.model.name} at http://{host}:{port}/v1 (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()


def build_app(cfg: ServeConfig, device: Any = "cpu") -> Any:
    """The FastAPI app serving `cfg.source` (its engine thread starts with the app's lifespan).

    Args:
        cfg: what to serve and the limits.
        device: where the model runs.
    """
    from tinylm.serve.app import Limits, create_app
    from tinylm.serve.metrics import Metrics
    from tinylm.serve.worker import LocalModel

    loaded = load(cfg.source, device=device)
    context = loaded.config.max_seq_len
    kv_tokens = cfg.kv_tokens or cfg.max_concurrent * (context + EngineConfig.block_size)
    if kv_tokens < context:
        raise TinylmError(f"--kv-tokens {kv_tokens} is less than the model's context of {context} tokens: a long "
                          "request could never run")
    engine = EngineConfig(max_batch=cfg.max_concurrent, kv_tokens=kv_tokens, prefix_cache=cfg.prefix_cache)
    metrics = Metrics()
    model = LocalModel(loaded, cfg.name or cfg.source, engine, metrics)
    return create_app(model, Limits(cfg.max_concurrent, cfg.max_queue, cfg.max_body_bytes), metrics)
