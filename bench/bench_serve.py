"""Load test and throughput of an OpenAI-compatible server: `tinylm serve`, or any other (llama-server, vLLM).

Load test (issue 15's acceptance): --requests streamed completions from --concurrency clients, prompts of mixed
lengths (TinyTales text cut to 8..--max-prompt-words words), replies of mixed lengths (1..--max-tokens tokens,
greedy), and a --disconnect fraction of the requests hung up after 1-5 tokens. It reports requests done,
disconnected, refused (4xx) and lost (a 5xx, a broken connection or a timeout), p50 / p99 latency and time to
the first token, and generated tokens/s; against tinylm it then reads /metrics until no request runs or
waits, and reports any that stay as leaked slots. The exit code is 1 when a request was lost or a slot leaked.

    python bench/bench_serve.py --model smollm2-135m --requests 500 --concurrency 32 --disconnect 0.1
    python bench/bench_serve.py --url http://127.0.0.1:8000 --requests 500 --concurrency 32

--model starts `tinylm serve MODEL --port 0` in a subprocess for the run (--server-args adds options);
--url uses a running server (its first model unless --model-name).

Throughput (--sweep 1,4,16,64): for each concurrency, --requests requests without disconnects; generated
tokens/s of the server, and of --compare-url (e.g. llama-server --parallel 64 on the same GGUF and threads)
beside it:

    python bench/bench_serve.py --model smollm2-135m --sweep 1,4,16,64 --requests 128 --max-tokens 64 \\
        --compare-url http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinylm.data import tinytales  # noqa: E402


@dataclass
class Spec:
    prompt: str
    max_tokens: int
    hang_up_after: int  # 0: read to the end


@dataclass
class Outcome:
    kind: str  # done | disconnected | refused | lost
    latency: float | None = None
    ttft: float | None = None
    tokens: int = 0
    why: str = ""


def specs(n: int, max_words: int, max_tokens: int, disconnect: float, seed: int) -> list[Spec]:
    """n requests: a TinyTales passage of 8..max_words words, 1..max_tokens new tokens, some hung up early."""
    rng = random.Random(seed)
    words = " ".join(tinytales.generate(max(8, n // 4), seed=seed)).split()
    out = []
    for _ in range(n):
        length = rng.randint(8, max(8, max_words))
        start = rng.randrange(max(1, len(words) - length))
        hang_up = rng.randint(1, 5) if rng.random() < disconnect else 0
        out.append(Spec(" ".join(words[start:start + length]), rng.randint(1, max_tokens), hang_up))
    return out


async def ask(client: openai.AsyncOpenAI, model: str, spec: Spec) -> Outcome:
    """One streamed completion; hangs up after `spec.hang_up_after` text chunks if that is set."""
    start, ttft, pieces, tokens = time.perf_counter(), None, 0, 0
    try:
        stream = await client.completions.create(model=model, prompt=spec.prompt, max_tokens=spec.max_tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                pieces += 1
                if spec.hang_up_after and pieces >= spec.hang_up_after:
                    await stream.close()
                    return Outcome("disconnected", None, ttft, pieces)
            if getattr(chunk, "usage", None):
                tokens = chunk.usage.completion_tokens
        return Outcome("done", time.perf_counter() - start, ttft, tokens or pieces)
    except openai.APIStatusError as e:
        return Outcome("refused" if e.status_code < 500 else "lost", why=f"{e.status_code} {str(e)[:120]}")
    except (openai.APIConnectionError, openai.APITimeoutError) as e:
        return Outcome("lost", why=f"{type(e).__name__}: {str(e)[:120]}")


async def load(url: str, model: str, todo: list[Spec], concurrency: int, timeout: float) -> tuple[list[Outcome], float]:
    """Run `todo` from `concurrency` clients; returns the outcomes and the wall-clock seconds."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=timeout)
    queue: asyncio.Queue[Spec] = asyncio.Queue()
    for spec in todo:
        queue.put_nowait(spec)
    outcomes: list[Outcome] = []

    async def worker() -> None:
        while not queue.empty():
            outcomes.append(await ask(client, model, queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    await client.close()
    return outcomes, wall


def live_requests(url: str, wait: float = 10.0) -> float | None:
    """Running + queued engine requests in tinylm's /metrics once they settle (None: no tinylm metrics)."""
    deadline, live = time.monotonic() + wait, None
    while time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
        except OSError:
            return None
        found = [re.search(rf"^{name} (\S+)$", text, re.M) for name in ("tinylm_running_requests", "tinylm_queue_depth")]
        if not all(found):
            return None
        live = sum(float(m.group(1)) for m in found)
        if live == 0:
            return 0.0
        time.sleep(0.1)
    return live


def first_model(url: str, client_timeout: float = 30) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=client_timeout)
    return client.models.list().data[0].id


@contextmanager
def started(model: str, extra: list[str]) -> Iterator[str]:
    """`tinylm serve MODEL --port 0` in a subprocess; yields its base URL."""
    words = [sys.executable, "-m", "tinylm", "serve", model, "--port", "0", "--log-level", "warning", *extra]
    proc = subprocess.Popen(words, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        line = proc.stderr.readline()
        found = re.search(r"at (http://\S+)/v1", line)
        if not found:
            raise SystemExit(f"tinylm serve did not start: {line}{proc.stderr.read() if proc.poll() is not None else ''}")
        threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stderr], daemon=True).start()
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0.0])[0]


def report(outcomes: list[Outcome], wall: float) -> dict[str, float]:
    done = [o for o in outcomes if o.kind == "done"]
    lat, ttft = [o.latency for o in done], [o.ttft for o in outcomes if o.ttft is not None]
    count = {k: sum(o.kind == k for o in outcomes) for k in ("done", "disconnected", "refused", "lost")}
    return {**count, "p50": percentile(lat, 50), "p99": percentile(lat, 99), "ttft50": percentile(ttft, 50),
            "ttft99": percentile(ttft, 99), "tok/s": sum(o.tokens for o in outcomes) / wall}


def load_test(url: str, model: str, args: argparse.Namespace) -> int:
    todo = specs(args.requests, args.max_prompt_words, args.max_tokens, args.disconnect, args.seed)
    outcomes, wall = asyncio.run(load(url, model, todo, args.concurrency, args.timeout))
    r = report(outcomes, wall)
    leaked = live_requests(url)
    print("| requests | concurrency | done | disconnected | refused | lost | p50 s | p99 s | TTFT p50 s | TTFT p99 s "
          "| generated tok/s | leaked slots |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(todo)} | {args.concurrency} | {r['done']} | {r['disconnected']} | {r['refused']} | {r['lost']} | "
          f"{r['p50']:.3f} | {r['p99']:.3f} | {r['ttft50']:.3f} | {r['ttft99']:.3f} | {r['tok/s']:.1f} | "
          f"{'n/a' if leaked is None else f'{leaked:g}'} |")
    for o in [o for o in outcomes if o.why][:5]:
        print(f"  {o.kind}: {o.why}")
    return 1 if r["lost"] or leaked else 0


def sweep(url: str, model: str, args: argparse.Namespace) -> int:
    other = None
    if args.compare_url:
        other = (args.compare_url.rstrip("/"), args.compare_model or first_model(args.compare_url.rstrip("/")))
    print(f"| concurrency | {model} tok/s |" + (f" {args.compare_url} tok/s | ratio |" if other else ""))
    print("|---:|---:|" + ("---:|---:|" if other else ""))
    for c in [int(x) for x in args.sweep.split(",")]:
        todo = specs(args.requests, args.max_prompt_words, args.max_tokens, 0.0, args.seed)
        mine = report(*asyncio.run(load(url, model, todo, c, args.timeout)))["tok/s"]
        row = f"| {c} | {mine:.1f} |"
        if other:
            theirs = report(*asyncio.run(load(*other, todo, c, args.timeout)))["tok/s"]
            row += f" {theirs:.1f} | {mine / theirs:.2f}x |" if theirs else " 0 | n/a |"
        print(row, flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server's base URL (without /v1)")
    where.add_argument("--model", help="start `tinylm serve MODEL` for the run")
    parser.add_argument("--model-name", help="the model id to send (default: the server's first)")
    parser.add_argument("--server-args", default="", help="more `tinylm serve` options, e.g. '--max-concurrent 32'")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect", type=float, default=0.1, help="share of requests hung up after 1-5 tokens")
    parser.add_argument("--max-prompt-words", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=128, help="each request asks for 1..this many tokens")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a request counts as lost")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sweep", help="throughput at these concurrencies instead, e.g. 1,4,16,64")
    parser.add_argument("--compare-url", help="with --sweep: another OpenAI-compatible server to run beside it")
    parser.add_argument("--compare-model", help="the model id to send to --compare-url (default: its first)")
    args = parser.parse_args()
    print("$ python bench/bench_serve.py " + shlex.join(sys.argv[1:]))
    run = sweep if args.sweep else load_test
    if args.url:
        url = args.url.rstrip("/")
        return run(url, args.model_name or first_model(url), args)
    with started(args.model, shlex.split(args.server_args)) as url:
        return run(url, args.model_name or first_model(url), args)


if __name__ == "__main__":
    sys.exit(main())
